"""No module of sdft_jax uses a private name of another.

A leading underscore marks what a module may change without telling anyone; a second module that
imports `_name` or reads `module._name` ties itself to that detail. The check reads the source (ast),
imports nothing, and names the file and line of every use: `from sdft_jax.x import _name`, and
`m._name` (or a chain such as `sdft_jax.x._name`) where `m` is bound by an import from sdft_jax
(a module, or a class or function imported from one). Dunder names (`__version__`) are public.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "sdft_jax"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_names(root: pathlib.Path = ROOT) -> set[str]:
    """Dotted names of every module and package under `root/sdft_jax`."""
    names = set()
    for path in (root / PACKAGE).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ImportFrom reads from (resolving `from . import x`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def private_uses(source: str, module: str, modules: set[str], *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, what) of each use in `source` (the code of `module`) of another sdft_jax module's private name."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> what it is bound to: an sdft_jax module or `module.member`
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != PACKAGE:
                    continue
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[PACKAGE] = PACKAGE
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute(node, module, is_package)
            if source_module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                if alias.name == "*":
                    continue
                if is_private(alias.name) and source_module != module:
                    uses.append((node.lineno, f"imports {alias.name} from {source_module}"))
                bound[alias.asname or alias.name] = f"{source_module}.{alias.name}"
    parents = {id(child): parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        # `node` is the first attribute of a chain `name.a.b...`; follow it while it names modules.
        if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Name) or node.value.id not in bound:
            continue
        target = bound[node.value.id]
        chain, attribute = [], node
        while isinstance(attribute, ast.Attribute):
            chain.append(attribute.attr)
            parent = parents.get(id(attribute))
            attribute = parent if isinstance(parent, ast.Attribute) and parent.value is attribute else None
        for attr in chain:
            if is_private(attr) and target != module:
                uses.append((node.lineno, f"reads {attr} of {target}"))
                break
            if f"{target}.{attr}" not in modules:
                break
            target = f"{target}.{attr}"
    return sorted(set(uses))


def package_private_uses(root: pathlib.Path = ROOT) -> list[str]:
    modules = module_names(root)
    found = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        for line, what in private_uses(path.read_text(encoding="utf-8"), module, modules, is_package=is_package):
            found.append(f"{path.relative_to(root)}:{line}: {what}")
    return found


def test_no_module_uses_a_private_name_of_another():
    found = package_private_uses()
    assert not found, "private names used across modules:\n" + "\n".join(found)


MODULES = {"sdft_jax", "sdft_jax.models", "sdft_jax.models.transformer", "sdft_jax.distributed", "sdft_jax.a"}


@pytest.mark.parametrize("source, expected", [
    ("from sdft_jax.models.transformer import _layer", [(1, "imports _layer from sdft_jax.models.transformer")]),
    ("from sdft_jax.models import transformer\nx = transformer._layer(1)",
     [(2, "reads _layer of sdft_jax.models.transformer")]),
    ("import sdft_jax.models.transformer as t\nt._layer", [(2, "reads _layer of sdft_jax.models.transformer")]),
    ("import sdft_jax.models.transformer\nsdft_jax.models.transformer._layer.x",
     [(2, "reads _layer of sdft_jax.models.transformer")]),
    ("from sdft_jax.models.transformer import Transformer\nTransformer._layer",
     [(2, "reads _layer of sdft_jax.models.transformer.Transformer")]),
    ("from .transformer import _layer", [(1, "imports _layer from sdft_jax.models.transformer")]),
    # Public names, dunders, other packages and a module's own private names are fine.
    ("from sdft_jax.models import transformer\ntransformer.Transformer.__init__", []),
    ("from sdft_jax import distributed\ndistributed.put(1)", []),
    ("import numpy as np\nnp._private", []),
    ("from sdft_jax.a import _mine", []),
])
def test_private_uses_finds_imports_and_attributes(source, expected):
    module = "sdft_jax.models.lora" if source.startswith("from .") else "sdft_jax.a"
    assert private_uses(source, module, MODULES) == expected


# What each part of the package may import (docs/architecture.md says why). A part is a top-level module
# or subpackage of sdft_jax; entry points (`train`, `generate`, ...), `bench`, `testing` and `trainer`
# sit on top and may import anything. A new dependency is a decision: make it here, on purpose.
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "errors": set(),
    "validation": set(),
    "pytrees": set(),
    "rendezvous": set(),
    "tokenization": set(),
    "cache": set(),
    "padding": {"validation"},
    "storage": {"cache"},
    "models": {"pytrees", "validation"},
    "distributed": {"models", "rendezvous", "validation"},
    "sampling": {"distributed", "models", "padding", "pytrees", "validation"},
    "distill": {"distributed", "models", "padding", "pytrees", "validation"},
    "data": {"storage", "tokenization", "validation"},
    "eval": {"data", "models", "sampling", "storage"},
    "checkpoints": {"cache", "distributed", "errors", "models", "storage"},
    "metrics": {"storage"},
    "checkpointing": {"storage"},
    "config": {"data", "distill", "distributed", "models", "sampling", "validation"},
    "cli": {"config", "errors"},
    "continual": {"checkpoints", "cli", "config", "distributed", "eval", "metrics", "models", "sampling",
                  "storage", "tokenization", "trainer", "validation"},
}
TOP_LEVEL = {"trainer", "train", "generate", "evaluate", "score", "convert", "bench", "testing"}


def part_imports(root: pathlib.Path = ROOT) -> dict[str, dict[str, str]]:
    """Part -> {imported part: 'file:line' of its first import}, parts as in ALLOWED_IMPORTS."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root / PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        part = parts[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == PACKAGE else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                dotted = name.split(".")
                if dotted[0] == PACKAGE and len(dotted) > 1 and dotted[1] != part:
                    found.setdefault(part, {}).setdefault(dotted[1], f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_every_part_imports_only_what_it_may():
    imports = part_imports()
    unknown = sorted(set(imports) - set(ALLOWED_IMPORTS) - TOP_LEVEL)
    assert not unknown, f"parts missing from ALLOWED_IMPORTS (add them with what they may import): {unknown}"
    broken = [f"{where}: {part} imports {other}" for part, others in imports.items() if part not in TOP_LEVEL
              for other, where in others.items() if other not in ALLOWED_IMPORTS[part]]
    assert not broken, "imports against the layering (tests/imports_test.py ALLOWED_IMPORTS):\n" + "\n".join(broken)


def test_the_allowed_imports_have_no_cycle():
    def visit(part: str, path: tuple[str, ...]) -> None:
        assert part not in path, f"import cycle: {' -> '.join(path + (part,))}"
        for other in ALLOWED_IMPORTS.get(part, ()):
            if other not in TOP_LEVEL:
                visit(other, path + (part,))

    for part in ALLOWED_IMPORTS:
        visit(part, ())


def test_part_imports_names_the_first_import_of_each_part(tmp_path):
    (tmp_path / PACKAGE / "models").mkdir(parents=True)
    (tmp_path / PACKAGE / "models" / "x.py").write_text(
        "import os\nfrom sdft_jax import trainer\nfrom sdft_jax.models import lora\nimport sdft_jax.trainer\n")
    (tmp_path / PACKAGE / "cli.py").write_text("from sdft_jax.config import load_train_config\n")
    assert part_imports(tmp_path) == {"models": {"trainer": "sdft_jax/models/x.py:2"},
                                      "cli": {"config": "sdft_jax/cli.py:1"}}
