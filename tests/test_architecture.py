"""The layering of docs/architecture.md holds: every import of the package (lazy ones inside functions included)
goes to a lower layer, or sideways within a layer without a cycle."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
# Lowest first. A unit is a subpackage (io, quant, ...) or a top-level module (cli, generation, ...).
LAYERS = [
    ("base", {"version", "validation", "kernels"}),
    ("io", {"io"}),
    ("quant and data", {"quant", "data"}),
    ("models", {"models"}),
    ("uses of a model", {"tokenizer", "generation", "evaluation", "lm_eval_model"}),
    ("formats", {"formats"}),
    ("tuning", {"tuning"}),
    ("commands", {"default_model", "eval_cli", "cli", "__init__"}),  # __init__: the package root's public API
]
LEVEL = {u: i for i, (_, units) in enumerate(LAYERS) for u in units}


def _unit_of_file(rel: str) -> str:
    parts = rel.split(os.sep)
    if parts[0] == "kernels":
        return "kernels"
    parts = parts[1:]  # below autoround_jax/
    return parts[0] if len(parts) > 1 else parts[0][:-3]


def _files():
    for top in ("autoround_jax", "kernels"):
        for d, _, fs in os.walk(os.path.join(ROOT, top)):
            for f in fs:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    yield path, os.path.relpath(path, ROOT)


def _imported_units(path: str, rel: str):
    """(line, unit) for every import of our own package in a file."""
    pkg = os.path.dirname(rel).split(os.sep)
    if pkg[0] == "kernels":
        pkg = ["autoround_jax", "kernels"] + pkg[1:]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mods = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
            else:
                mods = [node.module or ""]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        for m in mods:
            parts = m.split(".")
            if parts[0] == "autoround_jax" and len(parts) > 1:
                # `from .. import load_model` imports a name of the package root, which re-exports the public API
                yield node.lineno, parts[1] if parts[1] in LEVEL else "__init__"


def _edges():
    edges = {}
    for path, rel in _files():
        unit = _unit_of_file(rel)
        for line, target in _imported_units(path, rel):
            if target != unit:
                edges.setdefault((unit, target), f"{rel}:{line}")
    return edges


def test_every_unit_has_a_layer():
    units = {_unit_of_file(rel) for _, rel in _files()}
    assert units <= set(LEVEL), f"units without a layer (add them to LAYERS and docs/architecture.md): {units - set(LEVEL)}"


def test_imports_run_downward():
    upward = [f"{where}: {a} ({LAYERS[LEVEL[a]][0]}) imports {b} ({LAYERS[LEVEL[b]][0]})"
              for (a, b), where in _edges().items() if LEVEL[b] > LEVEL[a]]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_cycles_within_a_layer():
    graph = {}
    for a, b in _edges():
        graph.setdefault(a, set()).add(b)

    def reach(start, seen):
        for nxt in graph.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    cycles = [u for u in graph if u in reach(u, set())]
    assert not cycles, f"import cycles through {cycles}"


@pytest.mark.parametrize("lower, upper", [("formats", "tuning"), ("quant", "models"), ("models", "formats"),
                                          ("io", "models")])
def test_named_rules_of_the_issue(lower, upper):
    assert (lower, upper) not in _edges(), _edges().get((lower, upper))


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The scan sees a lazy import inside a function (so the test above can fail)."""
    bad = tmp_path / "autoround_jax" / "quant" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from ..tuning import autoround\n")
    assert list(_imported_units(str(bad), os.path.join("autoround_jax", "quant", "bad.py"))) == [(2, "tuning")]
