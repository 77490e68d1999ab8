"""Tiny builds inside an initialised process group (regression: transformers skips saving on ranks > 0)."""

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from ftmods.models.tiny import TINY_MODELS


def test_build_on_rank_one_writes_weights(tmp_path):
    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        folder = TINY_MODELS["causal-lm"](tmp_path / "lm")
    finally:
        dist.destroy_process_group()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "config.json").is_file()
