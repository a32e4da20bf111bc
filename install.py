"""Installs what the trainer needs into a web UI's Python, and nothing the web UI owns.

A1111, reForge, Forge and SD.Next run this file as a subprocess (`python install.py`, with the web UI's
root on PYTHONPATH) at every launch unless `--skip-install` is given. It must therefore be fast when
there is nothing to do, and it must never move the packages the web UI pinned: torch, gradio,
transformers and numpy are not installed, upgraded or downgraded here, whatever happens. When a missing
package has to be installed, pip gets a constraints file that pins every distribution already installed
to its current version, so pip can only add packages, not replace them.

A diffusers release is chosen by the transformers the web UI has (`diffusers_spec`): pip alone would take
the newest diffusers whose metadata fits, and diffusers' metadata does not name the transformers it needs
(on AUTOMATIC1111 1.10, with transformers 4.30, pip's choice cannot even be imported). After installing,
the import is checked in a fresh interpreter; what cannot be made to work is said in one line.

A1111 runs this file with its output captured: stdout is printed after the run, stderr only when the exit
status is not 0, inside a multi-line error report. So everything the user should read goes to stdout, and
under a web UI a failure is that one line with exit status 0 (the tab says the same when it is opened).

The planning is pure functions (`plan_install`, `constraints_text`, `should_skip`, `diffusers_spec`) so that
tests can check the plan for each host without running pip; `main()` only gathers facts and runs pip.
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
# below 1.0 because a major release may change the loading API, and further by DIFFUSERS_NEEDS;
# A1111 1.10 ships no diffusers at all.
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

# Each diffusers release from which its SD and SDXL pipelines need a newer transformers, and that transformers.
# Measured by importing IMPORT_CHECK (and the rest of what ti_core imports from diffusers) for the last
# release of every diffusers 0.28-0.39 under transformers 4.30-4.57, each with the tokenizers, hub and
# safetensors it accepts: 0.29-0.31 import with 4.30; 0.32-0.36 import transformers' SiglipImageProcessor
# (IP-Adapter loaders, transformers 4.37; 4.34 fails); 0.37-0.39 its Dinov2WithRegistersConfig (4.48; 4.47
# fails). 0.40 and later need huggingface_hub 1.x, which no transformers 4 accepts: pip never pairs them.
DIFFUSERS_NEEDS: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
    ((0, 32), (4, 37)),
    ((0, 37), (4, 48)),
)
# What ti_core imports first from diffusers; it fails at once when the pair does not fit.
IMPORT_CHECK = "from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline"
IMPORT_TIMEOUT = 600  # seconds; importing diffusers' pipelines takes a few, on a busy machine a minute

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


def _version_text(parts: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in parts)


def _installed_version(installed: Mapping[str, str], name: str) -> str | None:
    return {normalize(key): version for key, version in installed.items()}.get(name)


def diffusers_spec(transformers_version: str | None) -> str:
    """The diffusers range to ask pip for: REQUIRED's, capped below the first release this transformers
    cannot import (no cap when the transformers version is unknown)."""
    spec = REQUIRED["diffusers"]
    have = release(transformers_version or "")
    if not have:
        return spec
    for first_diffusers, needs_transformers in DIFFUSERS_NEEDS:
        if have < needs_transformers:
            return spec.replace("<1", f"<{_version_text(first_diffusers)}")
    return spec


def diffusers_misfit(installed: Mapping[str, str]) -> str | None:
    """Why the installed diffusers cannot import with the installed transformers, by DIFFUSERS_NEEDS; else None."""
    diffusers, transformers = _installed_version(installed, "diffusers"), _installed_version(installed, "transformers")
    if not diffusers or not transformers:
        return None
    needs = [needs for first, needs in DIFFUSERS_NEEDS if release(diffusers) >= first]
    if needs:
        needs_transformers = max(needs)
        if release(transformers) < needs_transformers:
            return (
                f"diffusers {diffusers} needs transformers {_version_text(needs_transformers)} or newer,"
                f" and this Python has transformers {transformers}"
            )
    return None


def missing(
    installed: Mapping[str, str], *, has_clip_vocab: bool | None = None, replace: Iterable[str] = ()
) -> list[str]:
    """Requirement strings for what ti_core needs and is not installed (host-owned packages excluded), and for
    the packages in `replace` (installed, but not working: another release is installed instead)."""
    names = {normalize(name) for name in installed} - {normalize(name) for name in replace}
    specs = {**REQUIRED, "diffusers": diffusers_spec(_installed_version(installed, "transformers"))}
    wanted = [f"{name}{spec}" for name, spec in specs.items() if name not in names]
    if has_clip_vocab is None:
        has_clip_vocab = has_vocab_distribution(installed)
    if not has_clip_vocab:
        wanted.append(f"{VOCAB_DISTRIBUTION}{VOCAB_SPEC}")
    return wanted


def plan_install(
    installed: Mapping[str, str],
    *,
    constraints: str | None = None,
    has_clip_vocab: bool | None = None,
    replace: Iterable[str] = (),
) -> list[str]:
    """pip arguments that install what is missing (and replace what is in `replace`), or [] when nothing is.

    `installed` maps distribution names to versions. `constraints` is the path of a file written from
    `constraints_text(installed, exclude=replace)`; `has_clip_vocab` overrides the guess from distribution
    names (main probes the import packages, since OpenAI's git CLIP may carry another distribution name).
    """
    wanted = missing(installed, has_clip_vocab=has_clip_vocab, replace=replace)
    if not wanted:
        return []
    # No --upgrade: a requirement already satisfied stays as it is.
    args = ["install", "--prefer-binary"]
    if constraints:
        args += ["--constraint", constraints]
    return args + wanted


def constraints_text(
    installed: Mapping[str, str], only: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> str:
    """A pip constraints file pinning installed distributions (all of them, or those in `only`), except those
    in `exclude` (the ones being replaced)."""
    keep = {normalize(name) for name in only} if only is not None else None
    drop = {normalize(name) for name in exclude}
    lines = []
    for name, version in sorted(installed.items(), key=lambda item: normalize(item[0])):
        key = normalize(name)
        if (keep is not None and key not in keep) or key in drop:
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


def import_problem(python: str = sys.executable) -> str | None:
    """Why IMPORT_CHECK fails in a fresh `python` (the last line of its error, without file paths), else None."""
    # -S again when we run without site-packages (the tests' stand-in for a web UI's Python).
    command = [python, *(["-S"] if sys.flags.no_site else []), "-c", IMPORT_CHECK]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=IMPORT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"the import check could not run ({type(error).__name__}: {error})"
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return without_path(lines[-1] if lines else f"exit status {result.returncode}")


def without_path(message: str) -> str:
    """An import error without the file it names: "... from 'transformers' (/venv/.../__init__.py)"."""
    return re.sub(r" \((/|[A-Za-z]:\\)[^)]*\)$", "", message.strip())


def _say(message: str) -> None:
    # stdout: A1111 prints an installer's stdout and drops its stderr when it exits with 0.
    print(f"[textual-inversion-trainer] {message}", flush=True)


def _installed_summary(wanted: Iterable[str]) -> str:
    """ "diffusers 0.31.0, ftfy 6.3.1" for what was asked for, with the versions pip chose."""
    importlib.invalidate_caches()  # pip added distributions since this process last looked
    now = installed_distributions()
    names = [normalize(re.split(r"[<>=!~ ;\[]", spec)[0]) for spec in wanted]
    return ", ".join(f"{name} {now[name]}" if name in now else name for name in names)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    installed = installed_distributions()
    for line in host_warnings(installed):
        _say(f"warning: {line}")
    vocab = clip_vocab_present() or has_vocab_distribution(installed)
    # A diffusers that cannot import with this transformers (an earlier install's choice, say) is replaced,
    # but only once a real import has confirmed what the table predicts.
    misfit = diffusers_misfit(installed)
    replace = ("diffusers",) if misfit and import_problem() else ()
    wanted = missing(installed, has_clip_vocab=vocab, replace=replace)
    if not wanted:
        return 0
    # Import the host's launch module only when there is work: it parses the web UI's arguments.
    launch = import_launch()
    under_host = launch is not None
    if should_skip(argv, environ, launch):
        _say(f"--skip-install: not installing {', '.join(wanted)}")
        return 0
    if replace:
        _say(f"replacing diffusers: {misfit}")
    run = pip_runner(launch)
    desc = f"requirements for the Textual Inversion trainer: {', '.join(wanted)}"
    failure = ""
    with tempfile.TemporaryDirectory(prefix="ti-install-") as folder:
        # First everything pinned; if pip finds no solution, retry with only what the web UI breaks without.
        for attempt, only in enumerate((None, HOST_CRITICAL)):
            path = Path(folder) / f"constraints-{attempt}.txt"
            path.write_text(constraints_text(installed, only, exclude=replace), encoding="utf-8")
            try:
                run(plan_install(installed, constraints=str(path), has_clip_vocab=vocab, replace=replace), desc)
            except Exception as error:  # subprocess.CalledProcessError, or RuntimeError from launch.run_pip
                failure = failure or (str(error).strip().splitlines() or [type(error).__name__])[0]
                continue
            problem = import_problem() if any(spec.startswith("diffusers") for spec in wanted) else None
            if problem is None:
                _say(f"installed {_installed_summary(wanted)}")
                return 0
            transformers = installed_distributions().get("transformers", "not installed")
            _say(
                f"installed {_installed_summary(wanted)}, but it does not import with transformers {transformers}"
                f" ({problem}): the Textual Inversion tab cannot work until a diffusers that does is installed"
            )
            return 0 if under_host else 1
    _say(
        f"could not install {' '.join(wanted)} (pip: {failure.rstrip('.')}): install them into the web UI's"
        " Python without changing torch, gradio, transformers or numpy; the Textual Inversion tab cannot work until then"
    )
    return 0 if under_host else 1


if __name__ == "__main__":
    sys.exit(main())
