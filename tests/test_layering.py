"""Layers that point one way (issue 9): the import graph of ``src/declens`` read with ``ast``.

Every ``import`` counts, at module level or inside a function (lazy imports are dependencies too), and so
does ``importlib.import_module("declens...")``. The graph is taken between top-level units: a module
(``declens.scoring``), a subpackage (``declens.analyses``) or the package facade (``declens/__init__.py``).

Four rules:
1. no cycle between units;
2. no unit imports a unit of a higher layer (:data:`LAYERS`, lowest first);
3. compute code neither draws nor prints: outside the presentation units (:data:`PRESENTATION`) no
   module imports matplotlib, rich or typer, calls ``print(...)``, ``<anything>.print(...)`` or writes to
   ``sys.stdout`` / ``sys.stderr``. Figures live in :mod:`declens.plots`, text on the console in the CLI;
4. no execution switch hides in the environment: ``os.environ`` / ``os.getenv`` are read only where
   :data:`ENVIRONMENT_READS` allows, and only the variables it names (execution options are
   :class:`declens.execution.ExecutionOptions`, passed explicitly and recorded in results).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "declens"
FACADE = PACKAGE  #: the unit of ``declens/__init__.py``

#: The layers, lowest first; a unit may import units of its own layer (without a cycle) and of lower ones.
#: This is the flow models -> tasks -> formats -> execution/lens/scoring -> metrics -> analyses and pruning
#: -> plots and report -> cli. ``results`` is the result contract (writer, reader, provenance, checkpoints)
#: that analyses and pruning write through, so it sits below them.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("base", frozenset({"_version", "errors", "distributed", "execution", "fastpath", "kernels", "presets"})),
    ("models", frozenset({"architectures", "models", "surgery"})),
    ("tasks", frozenset({"tasks"})),
    ("formats", frozenset({"formats"})),
    ("execution", frozenset({"runner", "lens", "scoring"})),
    ("metrics", frozenset({"metrics"})),
    ("results", frozenset({"results", "runconfig"})),
    ("analyses", frozenset({"analyses", "pruning", "finetune", "checks"})),
    ("presentation", frozenset({"plots", "report"})),
    ("cli", frozenset({"cli", "cli_tables", "__main__", FACADE})),
)
#: units that may draw and print
PRESENTATION = frozenset({"plots", "report", "cli", "cli_tables", "__main__"})
#: libraries whose import means drawing or console output
DRAWING_OR_CONSOLE = ("matplotlib", "rich", "typer")
#: the only environment reads in the package: file -> the variables it may read (a read whose name is not a
#: string constant counts as ``?``, and is refused)
ENVIRONMENT_READS: dict[str, frozenset[str]] = {
    # the deprecated fallback of the execution options, read once when a model loads
    f"{PACKAGE}/execution.py": frozenset({"?"}),
    # where the model cache lives (a location, not how anything runs)
    f"{PACKAGE}/presets.py": frozenset({"DECLENS_CACHE"}),
    # Hugging Face's own hub settings, read before loading (whether the hub may be reached)
    f"{PACKAGE}/models.py": frozenset({"HF_HUB_OFFLINE", "HF_ENDPOINT"}),
    # torchrun's contract with the processes it starts
    f"{PACKAGE}/distributed.py": frozenset({"WORLD_SIZE", "LOCAL_RANK"}),
}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str | None:
    """The top-level unit of a dotted module name inside the package, None outside it."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else FACADE


def imported_modules(path: Path, src: Path = SRC) -> list[tuple[str, int]]:
    """``(dotted module, line)`` of every import in a file (any depth; ``from p import m`` counts as
    ``p.m`` when ``m`` is a module or package of ``p``)."""
    mod = module_name(path, src)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[str, int]] = []

    def is_module(dotted: str) -> bool:
        base = src.joinpath(*dotted.split("."))
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")]
            if len(subs) < len(node.names):
                out.append((target, node.lineno))
            out += [(s, node.lineno) for s in subs]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            name = node.args[0].value
            if name.startswith(".") and len(node.args) > 1:
                name = (node.args[1].value if isinstance(node.args[1], ast.Constant) else pkg) + name
            out.append((name, node.lineno))
    return out


def source_files(src: Path = SRC) -> list[Path]:
    return sorted((src / PACKAGE).rglob("*.py"))


def import_graph(src: Path = SRC) -> dict[tuple[str, str], list[str]]:
    """``{(unit, imported unit): ["file:line", ...]}`` between distinct units of the package."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in source_files(src):
        a = unit_of(module_name(path, src))
        for target, line in imported_modules(path, src):
            b = unit_of(target)
            if b is not None and b != a:
                edges.setdefault((a, b), []).append(f"{path.relative_to(src)}:{line}")
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_index() -> dict[str, int]:
    return {u: i for i, (_, units) in enumerate(LAYERS) for u in units}


def upward_imports(edges) -> list[str]:
    """One line per import of a higher layer (units without a layer are reported by their own test)."""
    rank = layer_index()
    names = [name for name, _ in LAYERS]
    return [f"{a} ({names[rank[a]]}) imports {b} ({names[rank[b]]}) at {', '.join(where)}"
            for (a, b), where in sorted(edges.items()) if a in rank and b in rank and rank[a] < rank[b]]


def drawing_or_printing(path: Path, src: Path = SRC) -> list[str]:
    """One line per drawing/console import or print call in a file."""
    found = []
    for target, line in imported_modules(path, src):
        if target.split(".")[0] in DRAWING_OR_CONSOLE:
            found.append(f"imports {target} at line {line}")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "print":
            found.append(f"calls print() at line {node.lineno}")
        elif isinstance(f, ast.Attribute) and f.attr == "print":
            found.append(f"calls {ast.unparse(f)}() at line {node.lineno}")
        elif isinstance(f, ast.Attribute) and ast.unparse(f.value) in ("sys.stdout", "sys.stderr"):
            found.append(f"writes to {ast.unparse(f.value)} at line {node.lineno}")
    return found


def environment_reads(path: Path, src: Path = SRC) -> list[tuple[str, int]]:
    """``(variable, line)`` of every ``os.environ`` / ``os.getenv`` / ``environ`` / ``getenv`` use in a file
    (``?`` where the variable is not a string constant, e.g. ``os.environ`` passed on or iterated)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def const(node) -> str:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else "?"

    found = []
    for node in ast.walk(tree):
        text = ast.unparse(node) if isinstance(node, (ast.Attribute, ast.Name)) else ""
        if text in ("os.environ", "environ"):
            up = parent.get(node)
            if isinstance(up, ast.Subscript):
                found.append((const(up.slice), node.lineno))
            elif isinstance(up, ast.Attribute) and isinstance(parent.get(up), ast.Call) and parent[up].args:
                found.append((const(parent[up].args[0]), node.lineno))
            else:
                found.append(("?", node.lineno))
        elif text in ("os.getenv", "getenv", "os.putenv") and isinstance(parent.get(node), ast.Call):
            call = parent[node]
            found.append((const(call.args[0]) if call.args else "?", node.lineno))
    return sorted(found, key=lambda f: f[1])


# --- the rules on the package ---------------------------------------------------------------------------


def test_graph_sees_module_level_and_function_level_imports():
    edges = import_graph()
    assert ("scoring", "formats") in edges  # module level
    assert ("cli", "analyses") in edges  # the CLI imports its commands inside functions
    assert ("metrics", "scoring") not in edges


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in source_files()}
    unplaced = sorted(units - set(layer_index()))
    assert not unplaced, f"declare the layer of {unplaced} in LAYERS of tests/test_layering.py"


def test_no_import_cycle():
    edges = import_graph()
    found = cycles(edges)
    detail = [f"{' <-> '.join(c)}: " + "; ".join(f"{a}->{b} at {', '.join(edges[a, b])}"
                                                 for a in c for b in c if (a, b) in edges) for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_no_lower_layer_imports_a_higher_one():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_compute_code_neither_draws_nor_prints():
    bad = [f"{p.relative_to(SRC)}: {line}" for p in source_files()
           if unit_of(module_name(p)) not in PRESENTATION for line in drawing_or_printing(p)]
    assert not bad, "compute modules that draw or print (move figures to plots.py, text to the CLI):\n" + "\n".join(bad)


def test_no_environment_switch_outside_the_declared_reads():
    bad = []
    for p in source_files():
        rel = p.relative_to(SRC).as_posix()
        allowed = ENVIRONMENT_READS.get(rel, frozenset())
        bad += [f"{rel}:{line} reads {var}" for var, line in environment_reads(p)
                if not ("?" in allowed or var in allowed)]
    assert not bad, ("environment reads outside tests/test_layering.py's ENVIRONMENT_READS (make an execution "
                     "switch a field of declens.execution.ExecutionOptions):\n" + "\n".join(bad))


def test_the_execution_options_read_the_environment_only_at_load_time():
    """Nothing in the hot paths (runner, fast path, kernels, lens, scoring) touches the environment."""
    for name in ("runner", "fastpath", "kernels", "lens", "scoring"):
        assert environment_reads(SRC / PACKAGE / f"{name}.py") == [], name


# --- the checker itself, on a small package written here ----------------------------------------------


@pytest.fixture
def toy(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "analyses").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "metrics.py").write_text("import numpy\n")
    (pkg / "analyses" / "__init__.py").write_text("")
    (pkg / "analyses" / "noise.py").write_text("from .. import metrics\n")
    return tmp_path


def test_checker_finds_a_function_level_cycle_and_an_upward_import(toy):
    (toy / PACKAGE / "metrics.py").write_text("def f():\n    from .analyses import noise\n    return noise\n")
    edges = import_graph(toy)
    assert edges == {("analyses", "metrics"): [f"{PACKAGE}/analyses/noise.py:1"],
                     ("metrics", "analyses"): [f"{PACKAGE}/metrics.py:2"]}
    assert cycles(edges) == [["analyses", "metrics"]]
    assert len(upward_imports(edges)) == 1 and upward_imports(edges)[0].startswith("metrics (metrics) imports analyses")
    assert cycles({("analyses", "metrics"): []}) == []


def test_checker_sees_a_dynamic_import(toy):
    (toy / PACKAGE / "metrics.py").write_text("import importlib\nnoise = importlib.import_module('declens.analyses.noise')\n")
    assert ("metrics", "analyses") in import_graph(toy)


def test_checker_finds_environment_reads(toy):
    f = toy / PACKAGE / "metrics.py"
    f.write_text("import os\nfrom os import environ, getenv\na = os.environ.get('DECLENS_X', '0')\n"
                 "b = os.environ['Y']\nc = getenv('Z')\nd = dict(environ)\ne = os.getenv(name)\n")
    assert environment_reads(f, toy) == [("DECLENS_X", 3), ("Y", 4), ("Z", 5), ("?", 6), ("?", 7)]


def test_checker_finds_drawing_and_printing(toy):
    f = toy / PACKAGE / "metrics.py"
    f.write_text("import sys\ndef f(console):\n    from matplotlib import pyplot\n    print(1)\n"
                 "    console.print(2)\n    sys.stderr.write('x')\n")
    assert drawing_or_printing(f, toy) == ["imports matplotlib at line 3", "calls print() at line 4",
                                           "calls console.print() at line 5", "writes to sys.stderr at line 6"]
