"""ti_core is a library: importing all of it must never import gradio or a web UI's modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, pkgutil, sys

class Forbidden:
    # A meta-path finder that fails loudly on any host or gradio import.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"gradio", "modules", "launch", "webui", "backend", "modules_forge"}:
            raise ImportError(f"ti_core imported {name}")
        return None

sys.meta_path.insert(0, Forbidden())
import ti_core
names = [m.name for m in pkgutil.walk_packages(ti_core.__path__, "ti_core.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names), "modules imported")
"""


def test_no_module_of_ti_core_imports_gradio_or_a_host():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "modules imported" in result.stdout


def test_requirements_do_not_pin_or_require_torch():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    packages = [line.split("#")[0].strip().lower() for line in lines]
    assert not any(p.startswith(("torch", "torchvision", "open_clip_torch", "open-clip-torch")) for p in packages)
