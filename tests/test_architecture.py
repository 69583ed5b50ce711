"""The layers hold: passes and backends build on the vocabulary and never load the driver.

`lint-imports` checks the contracts in pyproject.toml statically (every import, function-level
ones included); the subprocess test checks what an import really loads at run time, which the
lazy ``compiler/__init__`` is there to keep small.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ("compiler.api", "compiler.cli", "compiler.driver.pipeline", "compiler.driver.auto", "compiler.driver.capture",
          "compiler.driver.generate", "compiler.driver.onnx_program", "compiler.report.html")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    r = _run("import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module", ["passes.attention_discovery", "passes.attention_variants", "backends.planner"])
def test_lower_layers_do_not_load_the_driver(module):
    r = _run(f"import sys, {module}; print(sorted(m for m in {DRIVER!r} if m in sys.modules))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", f"importing {module} loaded the driver: {r.stdout.strip()}"


def test_public_api_still_loads_on_demand():
    r = _run("import compiler, sys; assert 'compiler.api' not in sys.modules; "
             "from compiler import compile, Report, Fidelity, PolicyError; import compiler.api; "
             "assert compile is compiler.api.compile; "
             # compiler.driver.capture, the module, loaded by compiler.api, does not hide compiler.capture
             "import types; assert not isinstance(compiler.capture, types.ModuleType); "
             "print(sorted(compiler.__all__) == sorted(set(compiler.__all__)))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "True"
