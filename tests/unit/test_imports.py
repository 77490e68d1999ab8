"""Every module of the installed package imports, and pyproject lists every subpackage (§1.2 of STYLE.md)."""

import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import ftmods
import ftmods.callbacks
import ftmods.datamodules

REPO = Path(__file__).resolve().parents[2]
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _modules() -> list[str]:
    names = []
    for package in (ftmods, ftmods.callbacks, ftmods.datamodules):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name):
    importlib.import_module(name)


def test_mapped_packages_are_the_installed_ones():
    """``ftmods.callbacks`` / ``ftmods.datamodules`` come from the top-level folders, and no bare ``callbacks`` /
    ``datamodules`` module is imported as a second copy."""
    assert Path(ftmods.callbacks.__file__).parent == REPO / "callbacks"
    assert Path(ftmods.datamodules.__file__).parent == REPO / "datamodules"
    assert "callbacks" not in sys.modules
    assert "datamodules" not in sys.modules


def test_pyproject_lists_every_subpackage():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        "ftmods." + ".".join(p.parent.relative_to(REPO / "ftmods").parts)
        for p in (REPO / "ftmods").rglob("__init__.py")
    }
    on_disk = {name.rstrip(".") for name in on_disk} | {"ftmods.callbacks", "ftmods.datamodules"}
    assert listed == on_disk
