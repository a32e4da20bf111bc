"""Set up and start the standalone app, or run the test suite: one command each, from a fresh clone.

    python run.py [--cpu | --cuda] [APP OPTIONS]        set up, then `python extension.py APP OPTIONS`
    python run.py test [--cpu | --cuda] [PYTEST ARGS]   set up, then `python -m pytest PYTEST ARGS`

Setting up: a virtual environment in `.venv` (or the one that is active), PyTorch, then the requirements
(requirements-app.txt, which adds gradio; for `test` also the test requirements). What was set up is
recorded in the environment as a hash of the requirement files, so the next run installs nothing.

PyTorch: the CUDA build when `nvidia-smi` finds an NVIDIA GPU, else the CPU build; `--cpu`, `--cuda` or
TI_TORCH=cpu|cuda choose. A torch already in the environment is kept unless a choice it does not match
is given, so any other build (ROCm, another CUDA) can be installed by hand into an active environment.

Only the standard library is used here: this runs before anything is installed. Inside a web UI none of
this runs; the web UI runs install.py, which never installs gradio.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"  # the release the test suite runs on
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's index of CPU-only builds
REQUIREMENTS = {
    "app": ["requirements-app.txt"],
    "test": ["requirements-app.txt", "requirements-test.txt", "tests/requirements-ui.txt"],
}
# Every file the fingerprint covers: the ones above and those they include.
FINGERPRINTED = (
    "run.py",
    "requirements.txt",
    "requirements-app.txt",
    "requirements-test.txt",
    "tests/requirements-ui.txt",
)
STAMP = "ti-setup.json"
BUILDS = ("cpu", "cuda")


class SetupError(Exception):
    """Setting up failed; the message says what to do."""


def say(message: str) -> None:
    print(f"[run.py] {message}", flush=True)


# ------------------------------------------------------------------------------------------ deciding


def parse(argv: list[str], environ: dict[str, str]) -> tuple[str, str | None, list[str]]:
    """(mode "app" or "test", the torch build asked for or None, the arguments for the app or pytest)."""
    mode = "test" if argv[:1] == ["test"] else "app"
    rest = argv[1:] if mode == "test" else list(argv)
    flags = [arg for arg in rest if arg in ("--cpu", "--cuda")]
    if len(set(flags)) > 1:
        raise SetupError("give --cpu or --cuda, not both")
    build = flags[0][2:] if flags else environ.get("TI_TORCH", "").strip().lower() or None
    if build not in (None, *BUILDS):
        raise SetupError(f"TI_TORCH must be cpu or cuda, not {environ['TI_TORCH']!r}")
    return mode, build, [arg for arg in rest if arg not in ("--cpu", "--cuda")]


def fingerprint(mode: str, build: str | None, python: str) -> str:
    """Changes when a requirement file, this script, the torch choice or the interpreter does."""
    digest = hashlib.sha256(f"{mode}\n{build or 'auto'}\n{python}\n{ROOT}\n".encode())
    for name in FINGERPRINTED:
        path = ROOT / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return digest.hexdigest()


def read_stamp(path: Path) -> dict[str, str]:
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def is_set_up(stamp: dict[str, str], mode: str, build: str | None, python: str) -> bool:
    """The test set-up includes the app's."""
    modes = ("app", "test") if mode == "app" else ("test",)
    return any(stamp.get(name) == fingerprint(name, build, python) for name in modes)


def torch_build(version: str | None, requires: list[str]) -> str | None:
    """ "cpu", "cuda", "rocm" or None (not installed), from torch's version label and dependencies."""
    if version is None:
        return None
    label = version.partition("+")[2]
    if label.startswith("cu") or any(req.lower().startswith("nvidia-") for req in requires):
        return "cuda"  # +cu128 from PyTorch's index; PyPI's Linux wheel has no label but the nvidia-* packages
    return "rocm" if label.startswith("rocm") else "cpu"


def nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def reachable(url: str, timeout: float = 10) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except Exception:  # DNS, refused, proxy, TLS, HTTP errors: all mean "not from here"
        return False


# ----------------------------------------------------------------------------------------- setting up


def environment() -> tuple[Path, Path, bool]:
    """(python, folder for the stamp, whether it is our `.venv`): the active virtual environment, else
    `.venv`, made when missing."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.executable), Path(sys.prefix), False
    venv = ROOT / ".venv"
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        say(f"Making a virtual environment in {venv}")
        done = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if done.returncode != 0 or not python.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SetupError(
                f"could not make a virtual environment ({last}); on Debian or Ubuntu: apt install python3-venv"
            )
    return python, venv, True


def pip(python: Path, *args: str, verbose: bool) -> None:
    command = [str(python), "-m", "pip", *args]
    if not verbose:
        command[4:4] = ["--quiet", "--quiet"]  # errors only: they still show
    if subprocess.run(command, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}).returncode != 0:
        raise SetupError(f"pip failed: {' '.join(args)} (its message is above)")


def installed_torch(python: Path) -> tuple[str | None, list[str]]:
    """torch's version and dependencies in that environment, from its metadata (importing torch takes seconds)."""
    probe = (
        "import importlib.metadata as m, json\n"
        "try: print(json.dumps([m.version('torch'), m.requires('torch') or []]))\n"
        "except m.PackageNotFoundError: print(json.dumps([None, []]))\n"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"{python} does not run: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    version, requires = json.loads(done.stdout)
    return version, requires


def install_torch(python: Path, build: str | None, verbose: bool) -> str:
    """Install PyTorch unless a fitting one is there; returns torch's version."""
    version, requires = installed_torch(python)
    have = torch_build(version, requires)
    if have is not None and (build is None or build == have):
        say(f"torch {version} ({have} build) is installed: keeping it")
        return version
    wanted = build or ("cuda" if nvidia_gpu() else "cpu")
    if have is not None:
        say(f"Replacing torch {version} ({have} build) with the {wanted} build")
        pip(python, "uninstall", "--yes", "torch", verbose=verbose)
    if wanted == "cpu" and sys.platform.startswith("linux"):
        # PyPI's Linux torch is the CUDA build (several GB of nvidia-* packages): the CPU build comes
        # from PyTorch's own index, when it can be reached from here.
        if reachable(CPU_INDEX + "/torch/"):
            say(f"Installing {TORCH}, the CPU build, from {CPU_INDEX} (a few minutes)")
            pip(python, "install", TORCH, "--index-url", CPU_INDEX, verbose=verbose)
        else:
            say(f"{CPU_INDEX} cannot be reached: installing {TORCH} from the package index pip is set up with")
            pip(python, "install", TORCH, verbose=verbose)
    else:
        # PyPI's own build: CUDA on Linux, CPU and MPS on macOS, CPU-only on Windows (checked below).
        say(f"Installing {TORCH} for {'an NVIDIA GPU' if wanted == 'cuda' else 'the CPU'} (a few minutes)")
        pip(python, "install", TORCH, verbose=verbose)
    version, requires = installed_torch(python)
    got = torch_build(version, requires)
    if got == "cuda" and wanted == "cpu":
        say(f"note: torch {version} is the CUDA build (larger); it runs on the CPU too")
    elif got != wanted:
        say(
            f"note: torch {version} is a {got} build, so training runs on the CPU; for the CUDA build, install"
            " it from pytorch.org into an active virtual environment and run this again"
        )
    else:
        say(f"torch {version} ({got} build) installed")
    return version


def set_up(mode: str, build: str | None, verbose: bool) -> tuple[Path, bool]:
    """The environment's python, with everything `mode` needs installed, and whether it is our `.venv`."""
    python, folder, ours = environment()
    stamp_path = folder / STAMP
    stamp = read_stamp(stamp_path)
    if is_set_up(stamp, mode, build, str(python)):
        return python, ours
    say(f"Setting up {folder} for the {'tests' if mode == 'test' else 'app'} (first run or changed requirements)")
    torch_version = install_torch(python, build, verbose)
    files = REQUIREMENTS[mode]
    say(f"Installing {', '.join(files)}")
    with tempfile.TemporaryDirectory(prefix="ti-setup-") as scratch:
        # The requirements must not replace the torch just chosen (a package asking for a newer torch
        # would otherwise pull PyPI's build).
        constraints = Path(scratch) / "constraints.txt"
        constraints.write_text(f"torch=={torch_version}\n", encoding="utf-8")
        requirement_args = [arg for name in files for arg in ("-r", str(ROOT / name))]
        pip(python, "install", "--constraint", str(constraints), *requirement_args, verbose=verbose)
    stamp[mode] = fingerprint(mode, build, str(python))
    temporary = stamp_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(stamp, indent=1), encoding="utf-8")
    os.replace(temporary, stamp_path)
    say("Set up; the next run starts at once")
    return python, ours


def start(python: Path, command: list[str], cwd: Path, activate: bool) -> int:
    """Run `python COMMAND` in place of this process where possible; `activate`: as if `.venv` were activated
    (tools that look for `accelerate` or `ruff` on PATH find the environment's)."""
    env = dict(os.environ)
    if activate:
        env["VIRTUAL_ENV"] = str(python.parent.parent)
        env["PATH"] = str(python.parent) + os.pathsep + env.get("PATH", "")
        env.pop("PYTHONHOME", None)
    os.chdir(cwd)
    argv = [str(python), *command]
    if os.name == "nt":  # Windows' exec does not wait for the child: the console would come back at once
        try:
            return subprocess.run(argv, env=env).returncode
        except KeyboardInterrupt:
            return 130
    sys.stdout.flush()
    os.execve(str(python), argv, env)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if sys.version_info < (3, 10):  # noqa: UP036  (this runs on whatever python the user has)
        print(f"error: Python 3.10 or newer is needed, this is {sys.version.split()[0]}", file=sys.stderr)
        return 1
    try:
        mode, build, rest = parse(argv, dict(os.environ))
        python, ours = set_up(mode, build, verbose="--verbose" in rest)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the next run finishes the set-up", file=sys.stderr)
        return 130
    if mode == "test":
        return start(python, ["-m", "pytest", *rest], ROOT, activate=ours)
    return start(python, [str(ROOT / "extension.py"), *rest], Path.cwd(), activate=ours)


if __name__ == "__main__":
    sys.exit(main())
