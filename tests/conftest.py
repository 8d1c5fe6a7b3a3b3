"""Shared test helpers: load a numbered script as a module, or run it as a user would."""
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(name):
    """Import a numbered stage script, e.g. load("01_clean")."""
    return importlib.import_module(name)


def run(name, *args, cwd=None, timeout=600):
    """Run `python NN_name.py args...` in a subprocess; returns the CompletedProcess."""
    cmd = [sys.executable, str(ROOT / f"{name}.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
