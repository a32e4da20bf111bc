"""The real SD.Next web UI (vladmandic/sdnext 058a7f0, diffusers backend) as a test fixture, from its host kit.

The kit (`../shared/hosts/sdnext` beside the repository, or $TI_SDNEXT_KIT) builds SD.Next with its own venv
(`setup.sh DEST`, idempotent), writes random-weight diffusers models and starts and stops the server
(`DEST/run_server.sh`, `DEST/stop_server.sh`). This module drives it: build DEST once and reuse it
($TI_SDNEXT_DEST, else a folder in the temp dir named by the kit's hash), put the extension in from the working
tree, start SD.Next as a user does (its launcher runs every extension's install.py) and talk to it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from a1111_kit import ROOT, Server, _run, _tail, build_lock, kit_hash
from a1111_kit import Kit as A1111Kit

KIT_ENV, DEST_ENV, REQUIRE_ENV, PORT_ENV = "TI_SDNEXT_KIT", "TI_SDNEXT_DEST", "TI_REQUIRE_SDNEXT", "TI_SDNEXT_PORT"
EXTENSION_NAME = "textual-inversion-trainer"
PROBE_NAME = "ti-test-probe"
PROBE_SOURCE = Path(__file__).resolve().parent / "sdnext_probe"
TINY_SD15, TINY_SDXL, FULL_SD15 = "Diffusers/tiny-sd15", "Diffusers/tiny-sdxl", "Diffusers/sd15-random"
# What SD.Next pinned and an extension's install.py must leave as it found it.
HOST_PACKAGES = ("torch", "torchvision", "gradio", "diffusers", "transformers", "numpy", "safetensors", "accelerate")


def kit_folder() -> Path:
    return Path(os.environ.get(KIT_ENV) or ROOT.parent / "shared" / "hosts" / "sdnext")


def required() -> bool:
    """CI sets TI_REQUIRE_SDNEXT=1: a missing kit is then a failure, not a skip."""
    return os.environ.get(REQUIRE_ENV) == "1"


def default_dest(kit: Path) -> Path:
    return Path(tempfile.gettempdir()) / f"ti-sdnext-{kit_hash(kit)}"


class Kit(A1111Kit):
    """A built copy of SD.Next (DEST): `sdnext/` (the web UI), `venv/`, the kit's scripts."""

    def __init__(self, kit: Path, dest: Path) -> None:
        super().__init__(kit, dest)
        self.webui = dest / "sdnext"
        self.extension = self.webui / "extensions" / EXTENSION_NAME
        self.models = self.webui / "models"
        self.config = self.webui / "config.json"

    def build(self, *, sdxl: bool = True) -> list[str]:
        """setup.sh (idempotent: a finished DEST takes seconds); with the tiny SDXL model by default."""
        started = time.monotonic()
        with build_lock(self.dest):
            waited = time.monotonic() - started
            if (self.models / TINY_SD15).is_dir() and (not sdxl or (self.models / TINY_SDXL).is_dir()):
                return [f"built beforehand, waited {waited:.0f} s for it"] if waited > 1 else []
            env = {**os.environ, "WITH_SDXL": "1" if sdxl else "0"}
            result = _run(["bash", str(self.kit / "setup.sh"), str(self.dest)], timeout=3600, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"the kit's setup.sh failed:\n{_tail(result.stdout + result.stderr)}")
        return [f"setup.sh {time.monotonic() - started:.0f} s"]

    def install_extension(self, source: Path = ROOT) -> str:
        """The working tree into extensions/ (as A1111's kit does), the SD.Next probe beside it, and SD.Next's
        installer state cleared, so its launcher runs every extension's install.py at the next start."""
        tree = super().install_extension(source)
        probe = self.webui / "extensions" / PROBE_NAME
        shutil.rmtree(probe, ignore_errors=True)
        shutil.copytree(PROBE_SOURCE, probe, ignore=shutil.ignore_patterns("__pycache__"))
        (self.webui / "data" / "installer.json").unlink(missing_ok=True)
        return tree

    def set_options(self, **values) -> None:
        """Settings in SD.Next's config.json (read at start), e.g. the embeddings folder."""
        config = json.loads(self.config.read_text(encoding="utf-8")) if self.config.is_file() else {}
        for key, value in values.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        self.config.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def start(self, port: int, embeddings_dir: Path, model: str = TINY_SD15, theme: str = "modern") -> Server:
        """SD.Next as a user starts it (MODE=user: its installer and extension installers run); `theme`
        "modern" (its default UI) or "standard" (`--theme standard`)."""
        stopped = _run([str(self.dest / "stop_server.sh")], timeout=120)
        if "stopped" in stopped.stdout or "killed" in stopped.stdout:
            print(f"stopped a web UI left running: {stopped.stdout.strip()}")
        # A --theme standard start saves theme_type into config.json; a Modern start must not inherit it.
        self.set_options(embeddings_dir=str(embeddings_dir), theme_type=None)
        env = self.env()
        env.update(
            MODEL=model, PORT=str(port), MODE="user", EXTRA_ARGS="--theme standard" if theme == "standard" else ""
        )
        result = _run([str(self.dest / "run_server.sh")], timeout=120, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"run_server.sh failed: {result.stdout}{result.stderr}")
        pid = int((self.dest / "server.pid").read_text().strip())
        server = Server(self, f"http://127.0.0.1:{port}", pid)
        server.log = self.dest / "server.log"
        return server

    def installed_line(self) -> str:
        """SD.Next's log line naming what our install.py added ("Extension installed packages: ...")."""
        text = (self.dest / "server.log").read_text(errors="replace")
        start = text.find(f"Extension installed packages: {EXTENSION_NAME}")
        return " ".join(text[start : start + 400].split()) if start >= 0 else ""
