"""Shared test helpers: load a numbered script as a module, or run it as a user would."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(name):
    """Import a numbered stage script, e.g. load("01_clean")."""
    return importlib.import_module(name)


def run(name, *args, cwd=None, timeout=600):
    """Run `python NN_name.py args...` in a subprocess; returns the CompletedProcess."""
    cmd = [sys.executable, str(ROOT / f"{name}.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A data folder after `pipeline.py --tiny`: every stage's outputs, as a user's would be.
    Run once per session; tests that change it work on a copy."""
    d = tmp_path_factory.mktemp("tiny_run")
    r = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--tiny", "--data", str(d)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return d
