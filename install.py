"""Installs what the trainer needs into a web UI's Python, and nothing the web UI owns.

A1111, reForge, Forge and SD.Next run this file as a subprocess (`python install.py`, with the web UI's
root on PYTHONPATH) at every launch unless `--skip-install` is given. It must therefore be fast when
there is nothing to do, and it must never move the packages the web UI pinned: torch, gradio,
transformers and numpy are not installed, upgraded or downgraded here, whatever happens. When a missing
package has to be installed, pip gets a constraints file that pins every distribution already installed
to its current version, so pip can only add packages, not replace them.

The planning is pure functions (`plan_install`, `constraints_text`, `should_skip`) so that tests can check
the plan for each host without running pip; `main()` only gathers facts and runs pip.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType

# What ti_core needs and a web UI may lack, with the range pip is asked for when it is missing.
# Lower bounds match requirements.txt (tests/test_install.py keeps them in step). diffusers is capped
# below 1.0 because a major release may change the loading API; A1111 1.10 ships no diffusers at all.
REQUIRED: dict[str, str] = {
    "diffusers": ">=0.28,<1",
    "safetensors": ">=0.4",
    "ftfy": ">=6.1",
    "regex": ">=2022.1",
}
# The CLIP BPE vocabulary file ships in `clip` (openai-clip or OpenAI's git package) and `open_clip`
# (open_clip_torch). Only openai-clip is ever installed: open_clip_torch's dependencies replace torch.
VOCAB_DISTRIBUTION, VOCAB_SPEC = "openai-clip", ">=1.0"
VOCAB_DISTRIBUTIONS = ("clip", "openai-clip", "open-clip-torch")
VOCAB_PACKAGES = ("clip", "open_clip")
VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"

# The web UI owns these: never installed, upgraded or downgraded here (only reported when missing).
HOST_OWNED = ("torch", "torchvision", "gradio", "transformers", "numpy")
# Pinned even in the relaxed retry (see main): what a web UI breaks without.
HOST_CRITICAL = (
    *HOST_OWNED,
    "torchaudio",
    "xformers",
    "gradio-client",
    "tokenizers",
    "huggingface-hub",
    "safetensors",
    "accelerate",
    "pillow",
    "pydantic",
    "fastapi",
    "starlette",
    "httpx",
    "protobuf",
)

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
# A PEP 440 version, local label included ("2.1.2+cu121"); anything else cannot be written as a pin.
_VERSION = re.compile(
    r"^v?\d+(\.\d+)*((a|b|rc|c|alpha|beta|pre|preview)\d*)?(\.?post\d*)?(\.?dev\d*)?(\+[a-z0-9.]+)?$", re.I
)
_TRUE = {"1", "true", "yes", "on"}
SKIP_ENV = "TI_SKIP_INSTALL"


def normalize(name: str) -> str:
    """PEP 503 name: `Pillow`, `huggingface_hub` -> `pillow`, `huggingface-hub`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version ("0.33.0.dev0" -> (0, 33, 0)), enough for a minimum check."""
    match = re.match(r"^v?(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def minimum(spec: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9][0-9.]*)", spec)
    return release(match.group(1)) if match else ()


def has_vocab_distribution(installed: Mapping[str, str]) -> bool:
    return any(normalize(name) in VOCAB_DISTRIBUTIONS for name in installed)


def missing(installed: Mapping[str, str], *, has_clip_vocab: bool | None = None) -> list[str]:
    """Requirement strings for what ti_core needs and is not installed (host-owned packages excluded)."""
    names = {normalize(name) for name in installed}
    wanted = [f"{name}{spec}" for name, spec in REQUIRED.items() if name not in names]
    if has_clip_vocab is None:
        has_clip_vocab = has_vocab_distribution(installed)
    if not has_clip_vocab:
        wanted.append(f"{VOCAB_DISTRIBUTION}{VOCAB_SPEC}")
    return wanted


def plan_install(
    installed: Mapping[str, str], *, constraints: str | None = None, has_clip_vocab: bool | None = None
) -> list[str]:
    """pip arguments that install what is missing, or [] when nothing is.

    `installed` maps distribution names to versions. `constraints` is the path of a file written from
    `constraints_text(installed)`; `has_clip_vocab` overrides the guess from distribution names (main
    probes the import packages, since OpenAI's git CLIP may carry another distribution name).
    """
    wanted = missing(installed, has_clip_vocab=has_clip_vocab)
    if not wanted:
        return []
    # No --upgrade: a requirement already satisfied stays as it is.
    args = ["install", "--prefer-binary"]
    if constraints:
        args += ["--constraint", constraints]
    return args + wanted


def constraints_text(installed: Mapping[str, str], only: Iterable[str] | None = None) -> str:
    """A pip constraints file pinning installed distributions (all of them, or those in `only`)."""
    keep = {normalize(name) for name in only} if only is not None else None
    lines = []
    for name, version in sorted(installed.items(), key=lambda item: normalize(item[0])):
        key = normalize(name)
        if keep is not None and key not in keep:
            continue
        if _NAME.match(name) and _VERSION.match(version.strip()):
            lines.append(f"{key}=={version.strip()}")
    return "\n".join(lines) + "\n"


def host_warnings(installed: Mapping[str, str]) -> list[str]:
    """One line per host-owned package that is missing, and per present package older than ti_core needs."""
    versions = {normalize(name): version for name, version in installed.items()}
    warnings = [
        f"{name} is not installed; the web UI normally provides it and the trainer needs it (not installed here)"
        for name in ("torch", "transformers", "numpy")
        if name not in versions
    ]
    for name, spec in REQUIRED.items():
        have = versions.get(name)
        if have and release(have) < minimum(spec):
            warnings.append(f"{name} {have} is older than the trainer needs ({spec}); left as the web UI installed it")
    return warnings


def should_skip(argv: Iterable[str], environ: Mapping[str, str], launch: ModuleType | None = None) -> bool:
    """True when the user asked the web UI not to install anything."""
    args = getattr(launch, "args", None)
    if getattr(args, "skip_install", False) or getattr(launch, "skip_install", False) is True:
        return True
    if environ.get(SKIP_ENV, "").strip().lower() in _TRUE:
        return True
    try:
        extra = shlex.split(environ.get("COMMANDLINE_ARGS", ""))
    except ValueError:  # an unbalanced quote in the user's COMMANDLINE_ARGS
        extra = environ.get("COMMANDLINE_ARGS", "").split()
    return "--skip-install" in [*argv, *extra]


def quote(arg: str) -> str:
    """Quote for the shell command launch.run_pip builds; double quotes work in both sh and cmd.exe."""
    return f'"{arg}"' if re.search(r"[^A-Za-z0-9_./:=+-]", arg) else arg


# ---- gathering facts and running pip (not unit-tested beyond a subprocess run) -------------------------


def installed_distributions() -> dict[str, str]:
    """Installed distributions by normalized name; the first one on sys.path wins, as for imports."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and dist.version:
            found.setdefault(normalize(name), dist.version)
    return found


def clip_vocab_present() -> bool:
    """Whether an importable package ships the vocabulary file (found without importing it)."""
    for package in VOCAB_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / VOCAB_FILE_NAME).is_file():
                return True
    return False


def import_launch() -> ModuleType | None:
    """The web UI's `launch` module (A1111, Forge, reForge, SD.Next); None when run on its own."""
    try:
        import launch  # noqa: PLC0415  (the host's module, on PYTHONPATH when it runs us)
    except Exception:  # a broken or foreign `launch` counts as none
        return None
    return launch


def pip_runner(launch: ModuleType | None) -> Callable[[list[str], str], None]:
    run_pip = getattr(launch, "run_pip", None)
    if callable(run_pip):
        # The host's helper adds its index URL and logging; it raises (A1111) or logs (SD.Next) on failure.
        return lambda args, desc: run_pip(" ".join(quote(arg) for arg in args), desc)

    def run(args: list[str], desc: str) -> None:
        print(f"Installing {desc}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", *args], check=True)

    return run


def _log(message: str) -> None:
    print(f"[textual-inversion-trainer] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    installed = installed_distributions()
    for line in host_warnings(installed):
        _log(f"warning: {line}")
    vocab = clip_vocab_present() or has_vocab_distribution(installed)
    wanted = missing(installed, has_clip_vocab=vocab)
    if not wanted:
        return 0
    # Import the host's launch module only when there is work: it parses the web UI's arguments.
    launch = import_launch()
    if should_skip(argv, environ, launch):
        print(f"[textual-inversion-trainer] --skip-install: not installing {', '.join(wanted)}", flush=True)
        return 0
    run = pip_runner(launch)
    desc = f"requirements for the Textual Inversion trainer: {', '.join(wanted)}"
    with tempfile.TemporaryDirectory(prefix="ti-install-") as folder:
        # First everything pinned; if pip finds no solution, retry with only what the web UI breaks without.
        for attempt, only in enumerate((None, HOST_CRITICAL)):
            path = Path(folder) / f"constraints-{attempt}.txt"
            path.write_text(constraints_text(installed, only), encoding="utf-8")
            try:
                run(plan_install(installed, constraints=str(path), has_clip_vocab=vocab), desc)
                return 0
            except Exception as error:  # subprocess.CalledProcessError, or RuntimeError from launch.run_pip
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                _log(f"pip failed: {first_line}")
    _log(
        f"could not install {' '.join(wanted)}: install them into the web UI's Python"
        " without changing torch, gradio, transformers or numpy"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
