"""Which parts of l2w_dist may import which: read from the source with ``ast``, nothing imported.

Every import counts, at any depth (module level, inside functions, classes, ``if`` blocks),
absolute or relative, and ``importlib.import_module("...")`` with a literal name. A boundary
names a package of l2w_dist and the parts of l2w_dist its modules must not import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "l2w_dist"

# (package, what it must not import; None: nothing of l2w_dist outside the package itself)
BOUNDARIES = [
    ("l2w_dist.models", None),
    ("l2w_dist.meta", ("l2w_dist.distributed", "l2w_dist.data", "l2w_dist.engine")),
    ("l2w_dist.evaluate", ("l2w_dist.engine", "l2w_dist.train")),
    ("l2w_dist.utils", None),
]


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> file, for every module and package under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules ``source`` (the text of ``module``) imports, as absolute dotted names.

    ``from X import name`` counts as importing ``X.name`` when that is a module in ``known``
    (a submodule), else as importing ``X`` (``name`` is an attribute of it).
    """
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            found.add(node.args[0].value)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(imports: dict[str, set[str]], package: str, forbidden: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """(module, imported name) pairs of ``package``'s modules that cross the boundary."""
    found = []
    for module, names in sorted(imports.items()):
        if not _within(module, package):
            continue
        for name in sorted(names):
            if forbidden is None:
                crosses = _within(name, "l2w_dist") and not _within(name, package)
            else:
                crosses = any(_within(name, part) for part in forbidden)
            if crosses:
                found.append((module, name))
    return found


def imports_of_tree(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    files = module_files(package_dir)
    known = set(files)
    return {
        module: imported_names(path.read_text(), module, path.name == "__init__.py", known)
        for module, path in files.items()
    }


@pytest.mark.parametrize("package, forbidden", BOUNDARIES, ids=[package for package, _ in BOUNDARIES])
def test_package_respects_its_import_boundary(package, forbidden):
    imports = imports_of_tree()
    assert any(_within(module, package) for module in imports), f"no module of {package} found"
    crossing = violations(imports, package, forbidden)
    assert not crossing, "\n".join(f"{module} imports {name}" for module, name in crossing)


def test_the_parser_finds_imports_at_every_depth_and_flags_them():
    """A synthetic module of l2w_dist.models that crosses its boundary in every way the
    parser must see; and the real tree's engine, which does import meta and models."""
    source = """
from __future__ import annotations
import torch
from . import base
from .base import MultiExitModel
from .. import utils
if True:
    import l2w_dist.data.loader as loader
class Model:
    def method(self):
        from ..engine.trainer import TrainingJob
        return TrainingJob
def build():
    import importlib
    return importlib.import_module("l2w_dist.meta")
"""
    known = {"l2w_dist", "l2w_dist.models", "l2w_dist.models.base", "l2w_dist.utils", "l2w_dist.engine.trainer"}
    names = imported_names(source, "l2w_dist.models.fake", is_package=False, known=known)
    assert names == {
        "__future__",
        "torch",
        "l2w_dist.models.base",
        "l2w_dist.utils",
        "l2w_dist.data.loader",
        "l2w_dist.engine.trainer",
        "importlib",
        "l2w_dist.meta",
    }
    crossing = violations({"l2w_dist.models.fake": names}, "l2w_dist.models", None)
    assert [name for _, name in crossing] == [
        "l2w_dist.data.loader",
        "l2w_dist.engine.trainer",
        "l2w_dist.meta",
        "l2w_dist.utils",
    ]
    meta_rule = violations({"l2w_dist.meta.fake": names}, "l2w_dist.meta", BOUNDARIES[1][1])
    assert [name for _, name in meta_rule] == ["l2w_dist.data.loader", "l2w_dist.engine.trainer"]
    # a package's own relative imports resolve against the package, not its parent
    assert imported_names("from . import base", "l2w_dist.models", is_package=True, known=known) == {
        "l2w_dist.models.base"
    }
    # the real tree is parsed: the trainer's imports of meta and models are seen
    trainer = imports_of_tree()["l2w_dist.engine.trainer"]
    assert any(_within(name, "l2w_dist.meta") for name in trainer)
    assert any(_within(name, "l2w_dist.models") for name in trainer)
