"""The import structure DESIGN.md describes: core is importable without the app or
Textual, the CLI reaches the screens only through the app entry, and no package has
import cycles between its modules. import-linter checks the contracts in pyproject.toml
statically; a fresh interpreter checks that importing every core module at run time
brings no Textual in."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = {"core": "core is the engine", "cli": "the CLI, the reports and the analysis",
             "cycles": "no import cycles"}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the tree at `root` with its pyproject.toml."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--config", "pyproject.toml"],
                          cwd=root, capture_output=True, text=True, timeout=120)


def test_contracts_are_kept():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in CONTRACTS.values():
        assert name in proc.stdout
    assert f"{len(CONTRACTS)} kept, 0 broken" in proc.stdout, proc.stdout


@pytest.mark.parametrize("file, line, broken", [
    ("core/requests.py", "import impq_tui.report", {"core"}),
    ("core/data.py", "import textual.app", {"core", "cli"}),    # the CLI imports core.data
    ("impq_tui/cli/solve.py", "import impq_tui.screens.setup", {"cli"}),
    ("impq_tui/report.py", "from textual.widgets import Static", {"cli"}),
    ("impq_tui/report.py", "import impq_tui.cli.args", {"cycles"}),    # cli imports report
    ("core/solver.py", "import core.evaluate", {"cycles"}),          # evaluate imports solver
])
def test_a_broken_contract_fails(tmp_path, file, line, broken):
    """The contracts bite: one forbidden import in a copy of the tree breaks them."""
    for package in ("core", "impq_tui"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.tcss"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / file, "a") as f:
        f.write(f"\n{line}\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = f"{len(CONTRACTS) - len(broken)} kept, {len(broken)} broken"
    assert summary in proc.stdout, proc.stdout
    for key in broken:
        assert CONTRACTS[key] in proc.stdout.split("Broken contracts")[1], proc.stdout


def test_no_core_module_imports_textual():
    """Every module under core/ (found by walking the package, so a new one is covered
    too), and the headless CLI, imported in a fresh interpreter: no Textual module loads."""
    code = """
import importlib, pkgutil, sys
import core, impq_tui.cli
names = [m.name for p in (core, impq_tui.cli)
         for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("textual", "textual_plotext"))
assert not loaded, f"textual imported: {loaded[:5]}"
print("\\n".join(names))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = set(proc.stdout.split())
    on_disk = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in (ROOT / "core").rglob("*.py")} - {"core"}
    assert on_disk <= imported, on_disk - imported
    assert {"core.requests", "core.export.card", "impq_tui.cli.run"} <= imported


def test_the_libraries_say_nothing_the_user_cannot_act_on():
    """Importing the quantizers after quiet_libraries() (as the CLI and the app do) prints
    none of torchao's failed kernel loads nor torch's deprecation notes to torchao; the
    same import without it does print them where torchao is installed (the control)."""
    quiet = "from impq_tui.libraries import quiet_libraries; quiet_libraries(); "

    def chatter(prefix: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", prefix + "import optimum.quanto"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return [line for line in (proc.stdout + proc.stderr).splitlines()
                if "torchao" in line or "register_constant" in line]

    if not chatter(""):
        pytest.skip("importing the quantizers says nothing here even unquieted (no torchao)")
    assert chatter(quiet) == []
