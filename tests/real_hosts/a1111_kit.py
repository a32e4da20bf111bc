"""The real AUTOMATIC1111 web UI v1.10.1 as a test fixture, built from the a1111 host kit.

The kit (`../shared/hosts/a1111` beside the repository, or $TI_A1111_KIT) builds a copy of the web UI with
its own venv (`setup.sh DEST`), writes random-weight SD1 checkpoints (`make_checkpoint.py`) and starts and
stops the server (`DEST/run_server.sh`, `DEST/stop_server.sh`). This module drives it: build DEST once and
reuse it ($TI_A1111_DEST, else a folder in the temp dir named by the kit's hash), put the extension in from
the working tree (`git archive`), run its install.py as the web UI does, start the server and talk to it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT_ENV, DEST_ENV, REQUIRE_ENV, PORT_ENV = "TI_A1111_KIT", "TI_A1111_DEST", "TI_REQUIRE_A1111", "TI_A1111_PORT"
EXTENSION_NAME = "textual-inversion-trainer"
PROBE_NAME = "ti-test-probe"
PROBE_SOURCE = Path(__file__).resolve().parent / "probe_extension"
FULL_CHECKPOINT = "sd15-random.safetensors"
TINY_CHECKPOINT = "tiny-sd1.safetensors"  # written by setup.sh, with tiny-sd1.yaml beside it
BASELINE_PROMPT = "a lighthouse on a cliff at dusk"  # txt2img before and after training: the same image
# What the web UI pinned and an extension's install.py must leave as it found it.
HOST_PACKAGES = (
    "torch",
    "torchvision",
    "gradio",
    "transformers",
    "numpy",
    "safetensors",
    "accelerate",
    "fastapi",
    "pydantic",
)


def kit_folder() -> Path:
    return Path(os.environ.get(KIT_ENV) or ROOT.parent / "shared" / "hosts" / "a1111")


def required() -> bool:
    """CI sets TI_REQUIRE_A1111=1: a missing kit is then a failure, not a skip."""
    return os.environ.get(REQUIRE_ENV) == "1"


def kit_hash(kit: Path) -> str:
    digest = hashlib.sha256()
    for path in [kit / "setup.sh", *sorted((kit / "src").glob("*.tar.gz"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def default_dest(kit: Path) -> Path:
    """A build cached between local runs, one per version of the kit."""
    return Path(tempfile.gettempdir()) / f"ti-a1111-{kit_hash(kit)}"


@contextlib.contextmanager
def build_lock(dest: Path):
    """Hold `<dest>.lock` while a kit is built, so a build started beforehand (CI starts the kits' setup.sh in
    the background with `flock <dest>.lock`, while other suites run) is waited for instead of run twice."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{dest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(command: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class InstallRun:
    """One `python install.py` as the web UI runs it."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


class Kit:
    """A built copy of the web UI (DEST) and what can be done to it."""

    def __init__(self, kit: Path, dest: Path) -> None:
        self.kit, self.dest = kit, dest
        self.python = dest / "venv" / "bin" / "python"
        self.webui = dest / "webui"
        self.extension = self.webui / "extensions" / EXTENSION_NAME
        self.models = dest / "models"
        self.full_checkpoint = self.models / FULL_CHECKPOINT
        self.tiny_checkpoint = self.models / TINY_CHECKPOINT

    # ---- building -------------------------------------------------------------------------------------

    def build(self) -> list[str]:
        """setup.sh once (a finished DEST is reused as it is); returns what was done, for the log."""
        started = time.monotonic()
        with build_lock(self.dest):
            waited = time.monotonic() - started
            if (self.dest / "setup-state" / "tiny-ckpt.ok").is_file() and self.python.is_file():
                return [f"built beforehand, waited {waited:.0f} s for it"] if waited > 1 else []
            result = _run(["bash", str(self.kit / "setup.sh"), str(self.dest)], timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"the kit's setup.sh failed:\n{_tail(result.stdout + result.stderr)}")
        return [f"setup.sh {time.monotonic() - started:.0f} s"]

    def make_full_checkpoint(self) -> list[str]:
        """The random full-size SD1.5 checkpoint, once per DEST (~30 s, 4.6 GB of memory at its peak)."""
        if self.full_checkpoint.is_file():
            return []
        started = time.monotonic()
        if not self.has("diffusers"):  # make_checkpoint.py builds the model with diffusers (the kit's pin)
            self.pip("install", "diffusers==0.31.0", "-c", str(self.dest / "constraints-kit.txt"))
        partial = self.full_checkpoint.with_suffix(".partial.safetensors")
        result = _run([str(self.python), str(self.dest / "tools" / "make_checkpoint.py"), str(partial)], timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"make_checkpoint.py failed:\n{_tail(result.stdout + result.stderr)}")
        partial.replace(self.full_checkpoint)
        return [f"full-size checkpoint {time.monotonic() - started:.0f} s"]

    # ---- the venv -------------------------------------------------------------------------------------

    def pip(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        result = _run(
            [str(self.python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args], timeout=timeout
        )
        if result.returncode != 0 and args[0] != "check":
            raise RuntimeError(f"pip {' '.join(args)} failed:\n{_tail(result.stdout + result.stderr)}")
        return result

    def versions(self) -> dict[str, str]:
        """Every installed distribution by normalized name."""
        listed = json.loads(self.pip("list", "--format=json").stdout)
        return {item["name"].lower().replace("_", "-"): item["version"] for item in listed}

    def has(self, name: str) -> bool:
        return name in self.versions()

    def python_ok(self, code: str) -> tuple[bool, str]:
        """Run `code` in the web UI's Python (as it would run inside the web UI: from its folder)."""
        result = _run([str(self.python), "-c", code], timeout=900, cwd=self.webui, env=self.env())
        return result.returncode == 0, _tail(result.stdout + result.stderr, 5)

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env.update(HF_HOME=str(self.dest / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        return env

    # ---- extensions -----------------------------------------------------------------------------------

    def install_extension(self, source: Path = ROOT) -> str:
        """This checkout's working tree as `git archive` gives it (every file git does not ignore, committed or
        not) into the web UI's extensions/, with the test probe beside it; returns the archived tree's id."""
        with tempfile.TemporaryDirectory(prefix="ti-index-") as folder:
            env = {**os.environ, "GIT_INDEX_FILE": str(Path(folder) / "index")}
            for command in (["git", "read-tree", "HEAD"], ["git", "add", "-A"]):
                step = _run(command, timeout=120, cwd=source, env=env)
                if step.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed in {source}: {step.stderr.strip()}")
            tree = _run(["git", "write-tree"], timeout=60, cwd=source, env=env).stdout.strip()
        archive = subprocess.run(
            ["git", "archive", "--format=tar", tree], capture_output=True, cwd=source, timeout=120
        )
        if archive.returncode != 0 or not tree:
            raise RuntimeError(f"git archive failed in {source}: {archive.stderr.decode(errors='replace')}")
        shutil.rmtree(self.extension, ignore_errors=True)
        self.extension.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as bundle:
            bundle.extractall(self.extension, filter="data")
        probe = self.webui / "extensions" / PROBE_NAME
        shutil.rmtree(probe, ignore_errors=True)
        shutil.copytree(PROBE_SOURCE, probe, ignore=shutil.ignore_patterns("__pycache__"))
        return tree

    def run_installer(self, **extra_env: str) -> InstallRun:
        """The extension's install.py exactly as A1111's launch_utils.run_extension_installer runs it: the web
        UI's Python, from the web UI's folder, with the web UI's folder first on PYTHONPATH."""
        env = {**self.env(), **extra_env}
        env["PYTHONPATH"] = f"{self.webui}{os.pathsep}{env.get('PYTHONPATH', '')}"
        started = time.monotonic()
        result = _run([str(self.python), str(self.extension / "install.py")], timeout=1800, cwd=self.webui, env=env)
        return InstallRun(result.returncode, result.stdout, result.stderr, time.monotonic() - started)

    # ---- the server -----------------------------------------------------------------------------------

    def start(self, port: int, embeddings_dir: Path, checkpoint: Path | None = None) -> Server:
        stopped = _run([str(self.dest / "stop_server.sh")], timeout=120)  # a server an aborted run left behind
        if "stopped" in stopped.stdout or "killed" in stopped.stdout:
            print(f"stopped a web UI left running: {stopped.stdout.strip()}")
        env = self.env()
        env.update(
            CKPT=str(checkpoint or self.full_checkpoint),
            PORT=str(port),
            # --disable-nan-check: A1111 refuses a txt2img on the kit's random-weight tiny checkpoint with NaNs in its
            # UNet (seen with the extension as it was before too); the checks read the infotext and compare bytes.
            EXTRA_ARGS=f"--embeddings-dir {embeddings_dir} --ckpt-dir {self.models} --disable-nan-check",
        )
        result = _run([str(self.dest / "run_server.sh")], timeout=120, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"run_server.sh failed: {result.stdout}{result.stderr}")
        pid = int((self.dest / "server.pid").read_text().strip())
        return Server(self, f"http://127.0.0.1:{port}", pid)

    def stop(self) -> None:
        _run([str(self.dest / "stop_server.sh")], timeout=120)


class Server:
    """A running web UI: its HTTP API, its process and its log."""

    def __init__(self, kit: Kit, url: str, pid: int) -> None:
        self.kit, self.url, self.pid = kit, url, pid
        self.log = kit.dest / "server.log"

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log.read_text(errors="replace"), lines) if self.log.is_file() else "(no log)"

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 900) -> dict:
        """A JSON request; an HTTP error raises HttpError with the status and the body's error text."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise HttpError(error.code, error.read().decode("utf-8", "replace")) from None

    def wait_ready(self, timeout: float = 900) -> dict:
        """Until the API answers and the checkpoint is loaded (the API is up seconds before the model is)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the web UI exited during startup:\n{self.log_tail()}")
            try:
                state = self.call("GET", "/ti-test/v1/state", timeout=10)
                if state.get("model_loaded"):
                    return state
            except (OSError, HttpError, ValueError):
                pass  # connection refused, then 404 until the routes are added
            time.sleep(0.5)
        raise TimeoutError(f"the web UI did not load its model within {timeout:.0f} s:\n{self.log_tail()}")

    def embeddings(self) -> dict:
        return self.call("GET", "/sdapi/v1/embeddings", timeout=60)

    def txt2img(self, prompt: str, seed: int = 1234) -> tuple[dict, bytes]:
        """64x64, 2 Euler steps: the info and the decoded PNG's RGB bytes."""
        from PIL import Image

        answer = self.call(
            "POST",
            "/sdapi/v1/txt2img",
            {
                "prompt": prompt,
                "negative_prompt": "",
                "width": 64,
                "height": 64,
                "steps": 2,
                "sampler_name": "Euler",
                "cfg_scale": 7,
                "seed": seed,
                "batch_size": 1,
                "n_iter": 1,
            },
        )
        png = base64.b64decode(answer["images"][0].split(",", 1)[-1])
        with Image.open(io.BytesIO(png)) as image:
            pixels = image.convert("RGB").tobytes()
        return json.loads(answer["info"]), pixels

    def progress(self) -> dict:
        return self.call("GET", "/ti/v1/progress", timeout=60)

    def wait_run(self, started_after: float, timeout: float = 1800) -> dict:
        """The snapshot of the training run that started after `started_after` (time.time()), once it ended."""
        deadline = time.monotonic() + timeout
        snapshot: dict = {}
        while time.monotonic() < deadline:
            snapshot = self.progress()
            if (snapshot.get("started_at") or 0) >= started_after and not snapshot.get("running"):
                return snapshot
            time.sleep(0.5)
        raise TimeoutError(f"the training run did not end within {timeout:.0f} s: {snapshot}")


class HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status, self.body = status, body
