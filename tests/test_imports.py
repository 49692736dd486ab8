"""Imports point down: each package of basis_sharing imports only its own layer and the ones below.

The layers, lowest first, follow the architecture's order (linalg -> modules -> models ->
runtime/calibration -> methods/finetune -> evaluation -> record -> stages -> pipeline), with the
leaf utilities at the bottom. ``runtime``, ``finetune`` and ``stages`` are placed before they
exist so that the packages planned for them land in the right layer. Imports are read with
``ast``, never executed: module-level and function-level ones count, those under
``if TYPE_CHECKING:`` do not (they run only for the type checker).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "basis_sharing"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
ROOT_MODULE = "__init__"  # the package's own __init__.py: the public facade, at the top

LAYERS: list[tuple[str, ...]] = [
    ("errors", "hashing", "files", "hub", "provenance", "threads"),  # leaf utilities
    ("linalg",),  # pure tensor functions: no model, no config, no Hydra
    ("modules",),  # compressed projection types
    ("config",),  # Hydra schemas: every group's settings (imports Hydra and OmegaConf)
    ("models",),  # loading, family adapters, saved compressed models
    ("data",),  # corpora, tokenization, calibration sampler
    ("runtime", "calibration"),  # running the model over data; calibration statistics
    ("methods", "finetune"),
    ("evaluation",),
    ("tracking",),  # the record: results.json, environment, stores, loggers
    ("tables",),  # built from the record store
    ("stages",),  # one file per stage, over one typed run state
    ("preflight", "pipeline", ROOT_MODULE),
]
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    target: str  # absolute dotted name, e.g. basis_sharing.tracking.environment


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted module name, is a package's __init__) of a file under ``root``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk_runtime(node: ast.AST):
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` (their else runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from walk_runtime(other)
            continue
        yield child
        yield from walk_runtime(child)


def imports_of(path: Path, root: Path) -> list[Import]:
    """The project imports of one file, relative ones resolved to absolute names."""
    name, is_package = module_name(path, root)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in walk_runtime(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base == root.name:  # `from basis_sharing import x`: a submodule or a root name
                targets = [submodule_or_root(root, a.name) for a in node.names]
            else:
                targets = [base]
        else:
            continue
        found += [Import(path, node.lineno, t) for t in targets if t.split(".")[0] == root.name]
    return found


def submodule_or_root(root: Path, name: str) -> str:
    """What `from basis_sharing import name` imports: the submodule, else the root's attribute."""
    if (root / name / "__init__.py").is_file() or (root / f"{name}.py").is_file():
        return f"{root.name}.{name}"
    return root.name


def unit_of(dotted: str) -> str:
    """The top-level unit a module belongs to: its first component under the package."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ROOT_MODULE


def upward_imports(root: Path, layer_of: dict[str, int]) -> tuple[list[str], list[str]]:
    """(upward imports as 'file:line: from (layer i) -> to (layer j)', files in no layer)."""
    upward, unplaced = [], set()
    for path in sorted(root.rglob("*.py")):
        source = unit_of(module_name(path, root)[0])
        if source not in layer_of:
            unplaced.add(f"{path.relative_to(root.parent)} ({source})")
            continue
        for imp in imports_of(path, root):
            target = unit_of(imp.target)
            if target not in layer_of:
                unplaced.add(f"{imp.target} imported at {path.relative_to(root.parent)}")
            elif layer_of[target] > layer_of[source]:
                upward.append(
                    f"{path.relative_to(root.parent)}:{imp.line}: {source} (layer "
                    f"{layer_of[source]}) -> {target} (layer {layer_of[target]}) via {imp.target}"
                )
    return upward, sorted(unplaced)


def test_every_import_points_down():
    upward, unplaced = upward_imports(ROOT, LAYER_OF)
    assert not unplaced, "not in any layer of tests/test_imports.py LAYERS:\n" + "\n".join(unplaced)
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_every_existing_unit_has_a_layer():
    units = {p.stem for p in ROOT.glob("*.py")} | {
        p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()
    }
    assert units - set(LAYER_OF) == set()


def unit_graph(root: Path) -> dict[str, set[str]]:
    """unit -> the other units it imports (same-layer imports included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        source = unit_of(module_name(path, root)[0])
        targets = {unit_of(imp.target) for imp in imports_of(path, root)}
        graph.setdefault(source, set()).update(targets - {source})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_no_cycle_between_packages():
    # Layers forbid upward edges; this also catches two units of one layer importing each other.
    assert find_cycle(unit_graph(ROOT)) is None


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# ---- the checker itself, on a package written for the purpose ----------------------------------


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def test_checker_names_each_upward_import(tmp_path):
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "linalg/__init__.py": "",
            "linalg/a.py": """\
                from typing import TYPE_CHECKING
                import torch
                from basis_sharing.errors import UserError
                from . import b
                from .b import f
                if TYPE_CHECKING:
                    from basis_sharing.models import families
                else:
                    import basis_sharing.modules


                def g():
                    from ..models.families import FAMILIES
                    from basis_sharing import __version__
                    from basis_sharing import pipeline
                """,
            "linalg/b.py": "def f(): ...\n",
            "models/__init__.py": "",
            "models/families.py": "from basis_sharing.linalg import a\n",
            "modules.py": "",
            "pipeline.py": "",
        },
    )
    upward, unplaced = upward_imports(root, LAYER_OF)
    assert unplaced == []
    assert upward == [
        "basis_sharing/linalg/a.py:9: linalg (layer 1) -> modules (layer 2) via "
        "basis_sharing.modules",
        "basis_sharing/linalg/a.py:13: linalg (layer 1) -> models (layer 4) via "
        "basis_sharing.models.families",
        "basis_sharing/linalg/a.py:14: linalg (layer 1) -> __init__ (layer 12) via basis_sharing",
        "basis_sharing/linalg/a.py:15: linalg (layer 1) -> pipeline (layer 12) via "
        "basis_sharing.pipeline",
    ]


def test_checker_refuses_a_package_in_no_layer(tmp_path):
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "widgets/__init__.py": "",
            "linalg.py": "import basis_sharing.gadgets\n",
        },
    )
    assert upward_imports(root, LAYER_OF) == (
        [],
        [
            "basis_sharing.gadgets imported at basis_sharing/linalg.py",
            "basis_sharing/widgets/__init__.py (widgets)",
        ],
    )


# ---- what importing a low layer costs ----------------------------------------------------------

HEAVY = ("hydra", "omegaconf", "transformers")


def loaded_after(statement: str, modules: tuple[str, ...] = HEAVY) -> dict[str, bool]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``statement``."""
    report = f"print(json.dumps({{m: m in sys.modules for m in {modules!r}}}))"
    code = f"import json, sys\n{statement}\n{report}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import basis_sharing.linalg",
        "import basis_sharing.linalg.factorization, basis_sharing.linalg.refit, "
        "basis_sharing.linalg.whitening",
        "import basis_sharing",
    ],
)
def test_the_pure_layers_import_neither_hydra_nor_transformers(statement):
    assert loaded_after(statement) == dict.fromkeys(HEAVY, False)


IO = "basis_sharing.models.compressed_io"


def test_the_public_api_is_loaded_on_first_use():
    assert loaded_after("import basis_sharing", (IO,)) == {IO: False}
    # Each name is the function of compressed_io itself (the assertions run in the child).
    statement = (
        "import basis_sharing\n"
        "from basis_sharing import load_compressed, save_compressed\n"
        "from basis_sharing.models import compressed_io\n"
        "assert basis_sharing.save_compressed is compressed_io.save_compressed\n"
        "assert load_compressed is compressed_io.load_compressed\n"
        "assert save_compressed is compressed_io.save_compressed\n"
        "assert {'load_compressed', 'save_compressed'} <= set(dir(basis_sharing))"
    )
    assert loaded_after(statement, (IO,)) == {IO: True}


def test_an_unknown_attribute_of_the_package_is_an_attribute_error():
    import basis_sharing

    with pytest.raises(AttributeError, match="module 'basis_sharing' has no attribute 'nope'"):
        _ = basis_sharing.nope
