"""Launcher for ``ftmods.cli``: ``python cli.py fit -c configs/sft/tiny.yaml``."""

from ftmods.cli import main

if __name__ == "__main__":
    main()
