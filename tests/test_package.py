"""The package's shape: the core stays framework-free, the public API and the commands are where
the docs say they are (docs/layout.md, docs/api.md, the commands table of docs/getting-started.md)."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import spark_det

ADAPTERS = ("spark_det.d2", "spark_det.mmdet")
FRAMEWORKS = ("detectron2", "mmdet", "mmcv", "mmengine")
ROOT = Path(__file__).resolve().parents[1]


def core_modules() -> list[str]:
    """Every module of spark_det outside the framework adapters, found by walking the package's
    folders (without importing anything, so the adapters are never touched)."""
    found = ["spark_det"]

    def walk(path: list[str], prefix: str) -> None:
        for info in pkgutil.iter_modules(path, prefix):
            if info.name.startswith(ADAPTERS) or info.name == "spark_det.__main__":
                continue
            found.append(info.name)
            if info.ispkg:
                walk([str(Path(path[0]) / info.name.rsplit(".", 1)[-1])], info.name + ".")

    walk(list(spark_det.__path__), "spark_det.")
    return sorted(found)


def test_the_walk_finds_every_subpackage_of_the_core():
    found = set(core_modules())
    for module in ("spark_det.sparse.norms", "spark_det.model.spark", "spark_det.data.source",
                   "spark_det.train.pretrainer", "spark_det.transfer.convert", "spark_det.cli.pretrain",
                   "spark_det.demo.pipeline"):
        assert module in found


def test_core_modules_import_neither_detectron2_nor_mmdet():
    code = (f"import importlib, sys\nfor m in {core_modules()!r}: importlib.import_module(m)\n"
            f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FRAMEWORKS!r})\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_core_check_fails_when_a_core_module_imports_a_framework(tmp_path):
    """The check above can fail: a core module that imports mmengine is caught."""
    (tmp_path / "leaky.py").write_text("import mmengine\n")
    code = ("import importlib, sys\nimportlib.import_module('leaky')\n"
            f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FRAMEWORKS!r})\nassert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "mmengine" in proc.stderr


def test_the_console_script_lists_every_tool_and_each_tool_has_a_shim():
    from spark_det.cli import COMMANDS

    proc = subprocess.run([sys.executable, "-m", "spark_det", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout
    shims = {p.stem for p in (ROOT / "tools").glob("*.py")}
    assert shims == {"pretrain", "pack_shards", "convert_weights", "visualize", "demo", "collect_env",
                     "make_synthetic_data", "train_det2", "train_mmdet"}
    for shim in (ROOT / "tools").glob("*.py"):
        assert len(shim.read_text().splitlines()) <= 10, f"{shim.name} holds logic; it belongs in spark_det/"


# --------------------------------------------------------------------------------------------
# No import cycle: read from the source with ast, nothing imported


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (a folder under ``root``) by dotted name; a package is its ``__init__.py``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """The import statements a module runs when it is imported: at its top level, and inside the
    ``if``/``try``/``with``/``for``/class bodies there. Not those in functions (they run when
    called), nor those under ``if TYPE_CHECKING:`` (never run; its ``else:`` does run)."""
    found: list[ast.stmt] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.ClassDef)):
                visit(node.body)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
                visit(node.body)
                visit(node.orelse)

    visit(tree.body)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports at module level (:func:`module_level_imports`).

    Relative imports are resolved against the importing module's package. ``from p import n``
    is an edge to the module ``p.n`` when there is one, else to ``p``. Importing ``a.b.c`` also
    runs the packages ``a.b`` and ``a`` first: an edge goes to each of them too, except to the
    packages the importer itself lies in (Python has started those before the importer runs;
    counting them would make every package that imports its own modules a cycle)."""
    modules = module_files(root, package)

    def known(name: str) -> Optional[str]:  # the module an import of ``name`` runs last, if ours
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # the importer's package
        targets: set[str] = set()
        for node in module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                wanted = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names]
            for target in filter(None, map(known, wanted)):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    step = ".".join(parts[:i])
                    if step in modules and not (name == step or name.startswith(step + ".")):
                        targets.add(step)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_module_of_spark_det_imports_itself_back_at_module_level():
    graph = import_graph(ROOT, "spark_det")
    assert "spark_det.data.folder" in graph["spark_det.data.source"]  # the walk sees the modules and their edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_through_relative_imports_and_ignores_deferred_ones(tmp_path):
    """The check above can fail: two modules that import each other (one relatively by name, one
    with a dotted relative import) are a cycle; imports in functions or under TYPE_CHECKING are not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import x\n")
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b"}, cycle

    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import x\n\n"
                                      "def late():\n    from .. import a\n")
    assert import_graph(tmp_path, "pkg")["pkg.sub.b"] == set()
    assert find_cycle(import_graph(tmp_path, "pkg")) is None

    # importing pkg.sub.b runs pkg/sub/__init__.py first: a cycle through it counts
    (pkg / "sub" / "__init__.py").write_text("import pkg.a\n")
    (pkg / "sub" / "b.py").write_text("")
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub"}, cycle
