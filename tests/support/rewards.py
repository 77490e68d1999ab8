"""Reward functions for module tests, importable by path (``support.rewards.<name>``) like a user's own rewards."""

from __future__ import annotations

from collections.abc import Sequence


def length_parity(completions: Sequence[str | None], labels: Sequence[str]) -> list[float]:
    """1.0 for completions of even length: varies within a group, so GRPO always has a signal."""
    return [float(len(c or "") % 2 == 0) for c in completions]


def constant(completions: Sequence[str | None], labels: Sequence[str]) -> list[float]:
    """1.0 for everything: every group has zero advantage."""
    return [1.0 for _ in completions]


def wrong_length(completions: Sequence[str | None], labels: Sequence[str]) -> list[float]:
    """One value too few (a broken user reward)."""
    return [1.0 for _ in completions][1:]
