"""Helpers shared by tests (importable as ``support`` when ``tests/`` is on ``sys.path``)."""
