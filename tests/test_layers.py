"The library's modules import one way, down the stack, and use no module's private names."
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "vlwb"
# bottom to top: a module may import only modules to its left
LAYERS = ["core", "provenance", "text", "images", "records", "shards", "data", "shapes", "vlmodel", "builtin",
          "openclip", "hf", "towers", "models", "contrast", "pairloss", "losses", "align", "train", "frozen",
          "textonly", "lm", "captioner", "eval", "interpret", "viz", "report", "widgets", "demo", "recipes", "verdicts",
          "study", "userbench", "bench", "cli"]
RANK = {m: i for i, m in enumerate(LAYERS)}


def vlwb_imports(source: str, module: str) -> list[tuple[int, str, list[str]]]:
    "Every import of a vlwb module in `source` (function bodies included): (line, module imported, names imported)."
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "vlwb" and len(parts) > 1: out.append((node.lineno, parts[1], []))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod == "vlwb" or mod.startswith("vlwb."):
                sub = mod[len("vlwb"):].lstrip(".") if node.level == 0 else mod
                names = [a.name for a in node.names]
                if sub: out.append((node.lineno, sub.split(".")[0], names))
                # from vlwb import viz / from . import viz
                else: out += [(node.lineno, n, []) for n in names if not n.startswith("__")]
    return out


def private_uses(source: str) -> list[tuple[int, str]]:
    "`module._name` attribute uses on vlwb modules imported as names (e.g. `viz._vocab`)."
    tree = ast.parse(source)
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and (n.level == 1 and not n.module or n.module == "vlwb") for a in n.names}
    return [(n.lineno, f"{n.value.id}.{n.attr}") for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules
            and n.attr.startswith("_") and not n.attr.startswith("__")]


def violations(source: str, module: str) -> list[str]:
    bad = []
    for line, target, names in vlwb_imports(source, module):
        if target not in RANK: bad.append(f"{module}:{line} imports vlwb.{target}, which has no place in the layers")
        elif RANK[target] >= RANK[module]: bad.append(f"{module}:{line} imports vlwb.{target} (up the stack or itself)")
        bad += [f"{module}:{line} imports the private name {target}.{n}" for n in names if n.startswith("_")]
    bad += [f"{module}:{line} uses the private name {name}" for line, name in private_uses(source)]
    return bad


def test_every_module_has_a_layer():
    mods = {p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_")}
    assert mods == set(LAYERS), \
        f"modules without a layer: {mods - set(LAYERS)}; layers without a module: {set(LAYERS) - mods}"


@pytest.mark.parametrize("module", LAYERS)
def test_imports_point_down(module):
    assert violations((PKG / f"{module}.py").read_text(), module) == []


def test_the_checker_catches_what_it_should():
    planted = ("from .core import l2norm\ndef f():\n    from vlwb.cli import main\n    from vlwb.text import _x\n"
               "    from . import viz\n    return viz._vocab\n")
    got = violations(planted, "data")
    assert any("vlwb.cli (up the stack" in v for v in got), got  # a lazy import inside a function
    assert any("private name text._x" in v for v in got), got
    assert any("vlwb.viz (up the stack" in v for v in got) and any("viz._vocab" in v for v in got), got
    assert not any("vlwb.core" in v for v in got), got


def test_no_module_is_over_500_lines():
    long = {p.name: n for p in PKG.glob("*.py")
            if p.name != "_modidx.py" and (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"


def test_lint():
    """ruff with the project's `.ruff.toml` over the notebooks (every code cell), the exported library and the tests:
    no line over 120 characters, no `a; b` chains, no undefined or unused names (pyflakes' F rules)."""
    import subprocess, sys
    root = PKG.parent
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "nbs", "vlwb", "tests"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    config = (root / ".ruff.toml").read_text()
    assert "line-length = 120" in config and '"E702"' in config and '"F"' in config, "the lint rules were loosened"
