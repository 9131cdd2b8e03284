"""Every third-party package vlwb imports at run time (lazy imports included) is a declared requirement with a minimum
version; tests and notebooks import only what the requirements and the dev extra declare; LightningCLI's own extra
requirement is declared; and what is declared is what is installed. A fresh install has nothing else."""
import ast
import configparser
import json
import re
import shlex
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def norm(name: str) -> str: return re.sub(r"[-_.]+", "-", name).lower()


def declared(key: str) -> dict[str, Requirement]:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return {norm(r.name): r for r in map(Requirement, shlex.split(cfg["DEFAULT"].get(key, "")))}


def imports(source: str) -> set[str]:
    """Top-level names of the third-party modules `source` imports anywhere (functions too), except inside a `try` that
    catches ImportError."""
    tree = ast.parse(source)
    optional = set()
    for t in ast.walk(tree):
        if isinstance(t, ast.Try) and any(isinstance(h.type, ast.Name)
                                          and h.type.id in ("ImportError", "ModuleNotFoundError")
                                          for h in t.handlers):
            optional |= {id(x) for b in t.body for x in ast.walk(b)}
    out = set()
    for n in ast.walk(tree):
        if id(n) in optional: continue
        if isinstance(n, ast.Import): names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and not n.level and n.module: names = [n.module]
        else: continue
        out |= {m.split(".")[0] for m in names}
    return {m for m in out if m not in sys.stdlib_module_names and m not in ("vlwb", "conftest", "test_demo")}


def undeclared(modules, reqs: dict) -> list[str]:
    dists = packages_distributions()
    return sorted(f"{m} (distribution {dists.get(m, ['not installed'])[0]})" for m in modules
                  if not any(norm(d) in reqs for d in dists.get(m, [m])))


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code").splitlines()
    return "\n".join(l for l in lines if not l.lstrip().startswith(("%", "!")))


def test_library_imports_are_declared_with_a_minimum_version():
    reqs = declared("requirements")
    mods = set().union(*(imports(p.read_text()) for p in (ROOT / "vlwb").rglob("*.py")))
    assert {"torch", "lightning", "gradio", "IPython"} <= mods # the scan sees imports inside functions too
    assert undeclared(mods, reqs) == [], "vlwb imports packages settings.ini's requirements do not declare"
    no_minimum = [str(r) for r in reqs.values() if not any(s.operator in (">=", "==", "~=") for s in r.specifier)]
    assert no_minimum == [], f"requirements without a minimum version: {no_minimum}"


def test_tests_and_notebooks_import_only_declared_packages():
    reqs = {**declared("requirements"), **declared("dev_requirements")}
    mods = set().union(*(imports(p.read_text()) for p in (ROOT / "tests").rglob("*.py")),
                       *(imports(notebook_code(p)) for p in (ROOT / "nbs").glob("*.ipynb")))
    assert undeclared(mods, reqs) == [], \
        "tests or notebooks import packages neither requirements nor the dev extra declare"


def test_the_checker_catches_a_missing_requirement():
    src = ("import torch\ndef f():\n    import yaml, jsonargparse\ntry:\n    import umap\nexcept ImportError:\n"
           "    umap = None\n")
    assert imports(src) == {"torch", "yaml", "jsonargparse"} # lazy imports count, guarded optional ones do not
    assert undeclared({"torch", "yaml"}, {"torch": None}) == ["yaml (distribution PyYAML)"]


def test_lightning_cli_requirement_is_declared_and_met():
    "LightningCLI (vlwb train) refuses to start without jsonargparse[signatures] at the version Lightning names."
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as cli_req
    need = Requirement(str(cli_req.requirement))
    ours = declared("requirements").get(norm(need.name))
    assert ours is not None, f"settings.ini does not declare {need}, which LightningCLI needs"
    assert need.extras <= ours.extras, f"settings.ini declares {ours}; LightningCLI needs the extras of {need}"
    lowest = lambda r: max((Version(s.version) for s in r.specifier if s.operator in (">=", "==")),
                           default=Version("0"))
    assert lowest(ours) >= lowest(need), f"settings.ini allows {ours}; LightningCLI needs {need}"
    assert bool(cli_req), str(cli_req)


def test_declared_requirements_are_installed_at_declared_versions():
    bad = []
    for key in ("requirements", "dev_requirements"):
        for name, r in declared(key).items():
            try: v = version(r.name)
            except PackageNotFoundError:
                bad.append(f"{r} is not installed")
                continue
            if not r.specifier.contains(v, prereleases=True): bad.append(f"{r}: {v} is installed")
    assert bad == []
