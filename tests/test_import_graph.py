"""The import graph of `trl_arcopo`, read with `ast`: no import cycle, and imports only down the layers of `LAYERS`.

An edge is an import that runs when its module is imported: module-level imports of `trl_arcopo` (absolute or
relative), also inside module-level `if`, `try`, `with` and class bodies. Left out, as deliberate lazy imports: those
under `if TYPE_CHECKING:`, those inside functions, and the lazy export tables of `trl_arcopo/__init__.py` and
`trl_arcopo/rewards/__init__.py` (`import_utils.lazy_exports`: a name is imported on first use). A name read from such
a table at import time (`from trl_arcopo import ARCoPOConfig`) is an edge to the module that defines it.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest


PACKAGE = "trl_arcopo"
SRC = Path(__file__).resolve().parents[1] / "src"

#: The layers, from the bottom up: a module imports only from its own layer or below. A subpackage (its `__init__`
#: and every module in it) is one entry; `trl_arcopo` is the package's own `__init__`, whose eager imports are the two
#: utilities beside it (the rest of it is lazy).
LAYERS: list[tuple[str, set[str]]] = [
    (
        "utilities",
        {
            PACKAGE,
            "dependency_logging",
            "import_utils",
            "io_utils",
            "attention_window",
            "latent_frames",
            "nonfinite",
            "run_checks",
        },
    ),
    ("numerics and models", {"sampling", "loss", "kv_cache", "models", "quantization", "text_encoders"}),
    ("generation and rewards", {"generator", "pipelines", "rollout_group", "rollout", "rewards"}),
    ("training helpers", {"policy", "data", "prompt_cache", "tracker_callbacks", "ema", "split_groups"}),
    ("saved files", {"completions", "merging", "lora_files", "hub", "checkpointing", "replay_buffer"}),
    ("config", {"arcopo_config"}),
    ("trainer", {"arcopo_trainer"}),
    ("tools", {"cli", "convert", "planning", "shapes", "testing_utils"}),
]


# ---------------------------------------------------------------------------------------------------- the graph
def find_modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package by the name of its `__init__`)."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def eager_imports(body: Iterable[ast.stmt]) -> Iterable[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module runs `body`: not in functions, not under `TYPE_CHECKING`."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from eager_imports(node.body)
            yield from eager_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from eager_imports(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from eager_imports(node.body)


def lazy_export_table(tree: ast.Module, package: str) -> dict[str, str]:
    """Name -> owning module of a package's `lazy_exports(__name__, table)` (empty for a package without one)."""
    literals = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    for node in tree.body:
        call = node.value if isinstance(node, ast.Assign) else None
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "lazy_exports":
            table = ast.literal_eval(literals[call.args[1].id])
            return {name: package + module for module, names in table.items() for name in names}
    return {}


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the package its eager imports run (see the module docstring)."""
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    lazy = {name: lazy_export_table(tree, name) for name, tree in trees.items()}

    def owner(target: str, name: str) -> str:
        """The module `from target import name` runs: a submodule, a lazy export's module, else `target` itself."""
        if f"{target}.{name}" in modules:
            return f"{target}.{name}"
        if name in lazy.get(target, {}):
            return owner(lazy[target][name], name)  # `trl_arcopo.RewardFunc`: `rewards`, whose table says `base`
        return target

    def ours(target: str) -> bool:
        return target == PACKAGE or target.startswith(PACKAGE + ".")

    graph = {}
    for name, tree in trees.items():
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in eager_imports(tree.body):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if ours(alias.name)}
                continue
            target = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*parts, node.module] if node.module else parts)
            if ours(target):
                edges |= {owner(target, alias.name) for alias in node.names}
        graph[name] = edges - {name}
    return graph


# ---------------------------------------------------------------------------------------------------- the checks
def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of `graph` as `[a, b, ..., a]` (the first found, visiting nodes in sorted order), else `None`."""
    done, path, on_path = set(), [], set()
    for root in sorted(graph):
        if root in done:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path.append(root)
        on_path.add(root)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return path[path.index(child) :] + [child]
            elif child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
                on_path.add(child)
    return None


def layer_key(module: str) -> str:
    """The entry of `LAYERS` a module belongs to: its top-level module or subpackage (`trl_arcopo` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else module


def upward_edges(graph: Mapping[str, Iterable[str]], layers: list[tuple[str, set[str]]]) -> list[str]:
    """Each edge of `graph` into a higher layer, as `a (layer) -> b (layer)`."""
    index = {key: i for i, (_, keys) in enumerate(layers) for key in keys}
    return [
        f"{a} ({layers[index[layer_key(a)]][0]}) -> {b} ({layers[index[layer_key(b)]][0]})"
        for a in sorted(graph)
        for b in sorted(graph[a])
        if index[layer_key(b)] > index[layer_key(a)]
    ]


# ---------------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(find_modules())


def test_the_checks_flag_a_cycle_and_an_upward_import():
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(cyclic) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    layers = [("low", {"low"}), ("high", {"high"})]
    assert upward_edges({"p.low": {"p.high.x"}, "p.high.x": {"p.low"}}, layers) == ["p.low (low) -> p.high.x (high)"]


def test_the_graph_follows_eager_imports_only(tmp_path):
    lazy = "__getattr__, __dir__, __all__ = lazy_exports(__name__, _import_structure)"
    files = {
        "__init__.py": f"""
            from typing import TYPE_CHECKING
            from .import_utils import lazy_exports
            _import_structure = {{".sub": ["Thing"]}}
            if TYPE_CHECKING:
                from .top import Top
            {lazy}
        """,
        "import_utils.py": "import importlib",
        "sub/__init__.py": f"""
            from ..import_utils import lazy_exports
            _import_structure = {{".impl": ["Thing"]}}
            {lazy}
        """,
        "sub/impl.py": "Thing = 1",
        "low.py": """
            from trl_arcopo import Thing
            def later():
                from .top import Top
        """,
        "top.py": """
            import trl_arcopo.low
            from . import sub
            try:
                from .sub.impl import Thing
            except ImportError:
                Thing = None
        """,
    }
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    assert import_graph(find_modules(tmp_path)) == {
        PACKAGE: {"trl_arcopo.import_utils"},
        "trl_arcopo.import_utils": set(),
        "trl_arcopo.sub": {"trl_arcopo.import_utils"},
        "trl_arcopo.sub.impl": set(),
        "trl_arcopo.low": {"trl_arcopo.sub.impl"},  # `Thing` through both lazy tables; not the function's import
        "trl_arcopo.top": {"trl_arcopo.low", "trl_arcopo.sub", "trl_arcopo.sub.impl"},
    }


def test_the_graph_names_modules_that_exist(graph):
    assert graph[PACKAGE] == {"trl_arcopo.dependency_logging", "trl_arcopo.import_utils"}  # the rest is lazy
    assert "trl_arcopo.kv_cache.full" in graph["trl_arcopo.kv_cache.rolling"]
    for module, targets in graph.items():
        assert targets <= graph.keys(), f"{module} imports modules that do not exist: {targets - graph.keys()}"


def test_every_module_has_a_layer(graph):
    keys = [key for _, layer in LAYERS for key in layer]
    assert len(keys) == len(set(keys)), "a module is in two layers"
    missing = sorted({layer_key(module) for module in graph} - set(keys))
    assert not missing, f"add {missing} to LAYERS in {__file__}"


def test_imports_have_no_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_the_layers(graph):
    upward = upward_edges(graph, LAYERS)
    assert not upward, "imports into a higher layer (move the code, or import it lazily):\n" + "\n".join(upward)
