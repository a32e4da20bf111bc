"""The real Stable Diffusion WebUI Forge (upstream dfdcbab, gradio 4.40) as a test fixture, built from the forge
host kit.

The kit (`../shared/hosts/forge` beside the repository, or $TI_FORGE_KIT) builds the web UI with its own venv
(`setup.sh DEST`, idempotent), writes random-weight SD1 checkpoints (the tiny one with its `.yaml` at setup,
`tools/make_checkpoint.py` for the full-size one) and starts and stops the server on CPU. This module drives
it like a1111_kit does the AUTOMATIC1111 kit; what differs is Forge's: its launcher runs an extension's
install.py through `tools/run_extension_installer.py` (the kit's server skips the launcher's preparation),
the checkpoint is loaded at the first generation, not at start, and the API answers 500 while it is set up.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from a1111_kit import ROOT, HttpError, InstallRun, Kit, Server, _run, _tail, build_lock, kit_hash

KIT_ENV, DEST_ENV, REQUIRE_ENV, PORT_ENV = "TI_FORGE_KIT", "TI_FORGE_DEST", "TI_REQUIRE_FORGE", "TI_FORGE_PORT"
# What Forge pinned (requirements_versions.txt) and an extension's install.py must leave as it found it.
HOST_PACKAGES = (
    "torch",
    "gradio",
    "transformers",
    "diffusers",
    "numpy",
    "safetensors",
    "accelerate",
    "fastapi",
    "pydantic",
    "huggingface-hub",
)


def kit_folder() -> Path:
    return Path(os.environ.get(KIT_ENV) or ROOT.parent / "shared" / "hosts" / "forge")


def required() -> bool:
    """CI sets TI_REQUIRE_FORGE=1: a missing kit is then a failure, not a skip."""
    return os.environ.get(REQUIRE_ENV) == "1"


def default_dest(kit: Path) -> Path:
    return Path(tempfile.gettempdir()) / f"ti-forge-{kit_hash(kit)}"


class ForgeKit(Kit):
    """A built Forge (DEST) and what can be done to it."""

    def build(self) -> list[str]:
        """setup.sh, which reuses every finished step (a DEST built beforehand, e.g. while other suites ran,
        costs a second here)."""
        started = time.monotonic()
        with build_lock(self.dest):
            waited = time.monotonic() - started
            if (self.dest / "setup-state" / "tiny-ckpt.ok").is_file() and self.python.is_file():
                return [f"built beforehand, waited {waited:.0f} s for it"] if waited > 1 else []
            result = _run(["bash", str(self.kit / "setup.sh"), str(self.dest)], timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"the forge kit's setup.sh failed:\n{_tail(result.stdout + result.stderr)}")
        return [f"setup.sh {time.monotonic() - started:.0f} s"]

    def make_full_checkpoint(self) -> list[str]:
        if self.full_checkpoint.is_file():
            return []
        started = time.monotonic()
        partial = self.full_checkpoint.with_suffix(".partial.safetensors")
        result = _run([str(self.python), str(self.dest / "tools" / "make_checkpoint.py"), str(partial)], timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"make_checkpoint.py failed:\n{_tail(result.stdout + result.stderr)}")
        partial.replace(self.full_checkpoint)
        return [f"full-size checkpoint {time.monotonic() - started:.0f} s"]

    def run_installer(self, **extra_env: str) -> InstallRun:
        """The extension's install.py as Forge's launcher runs it (its own run_extension_installer)."""
        env = {**self.env(), **extra_env}
        started = time.monotonic()
        result = _run(
            [str(self.python), str(self.dest / "tools" / "run_extension_installer.py"), str(self.extension)],
            timeout=1800,
            env=env,
        )
        return InstallRun(result.returncode, result.stdout, result.stderr, time.monotonic() - started)

    def start(self, port: int, embeddings_dir: Path, checkpoint: Path | None = None) -> ForgeServer:
        _run([str(self.dest / "stop_server.sh")], timeout=120)  # a server an aborted run left behind
        env = self.env()
        env.update(
            CKPT=str(checkpoint or self.tiny_checkpoint),
            PORT=str(port),
            EXTRA_ARGS=f"--embeddings-dir {embeddings_dir}",
        )
        result = _run([str(self.dest / "run_server.sh")], timeout=120, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"run_server.sh failed: {result.stdout}{result.stderr}")
        pid = int((self.dest / "server.pid").read_text().strip())
        return ForgeServer(self, f"http://127.0.0.1:{port}", pid)


class ForgeServer(Server):
    def wait_ready(self, timeout: float = 900) -> dict:
        """Until the API and the probe answer (Forge loads its model at the first generation, not before)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the web UI exited during startup:\n{self.log_tail()}")
            try:
                self.call("GET", "/sdapi/v1/embeddings", timeout=10)  # 500 while the API is being set up
                return self.call("GET", "/ti-test/v1/state", timeout=10)
            except (OSError, HttpError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Forge's API did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def txt2img(self, prompt: str, seed: int = 1234) -> tuple[dict, bytes]:
        """64x64, 2 Euler steps (Forge's own defaults, 512x640 and 20 steps, take minutes on a CPU)."""
        return super().txt2img(prompt, seed)


def forge_page_class():
    """A1111Page for Forge's page (gradio 4.40): the same elem_ids, but its top tabs are "Txt2img", "Img2img"."""
    import re

    from a1111_page import A1111Page

    class ForgePage(A1111Page):
        def top_tab(self, label: str) -> None:
            self.page.locator("#tabs > .tab-nav > button").filter(
                has_text=re.compile(rf"^\s*{re.escape(label)}\s*$", re.IGNORECASE)
            ).first.click()

    return ForgePage
