"""install.py: the pip plan for each web UI's installed set, --skip-install, and a real `python install.py` run."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEVER_TOUCHED = ("torch", "gradio", "transformers", "numpy")


def _load_install():
    spec = importlib.util.spec_from_file_location("ti_install_under_test", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install = _load_install()

# What each web UI has installed, as far as the plan cares (versions from their pinned requirements).
A1111 = {
    "torch": "2.1.2+cu121", "torchvision": "0.16.2+cu121", "gradio": "3.41.2", "transformers": "4.30.2",
    "safetensors": "0.4.2", "numpy": "1.26.2", "huggingface-hub": "0.19.4", "accelerate": "0.21.0",
    "Pillow": "9.5.0", "ftfy": "6.1.1", "regex": "2023.10.3", "clip": "1.0", "open-clip-torch": "2.20.0",
    "fastapi": "0.94.0", "tqdm": "4.66.1",
}  # fmt: skip
FORGE = {
    **A1111, "torch": "2.3.1+cu121", "gradio": "4.40.0", "transformers": "4.46.1", "diffusers": "0.31.0",
    "huggingface-hub": "0.26.2", "pydantic": "2.8.2",
}  # fmt: skip
FORGE.pop("clip")  # Forge ships open-clip-torch only
REFORGE = {**A1111, "torch": "2.9.0", "transformers": "4.48.1", "diffusers": "0.32.2"}
SDNEXT = {
    "torch": "2.6.0+cu124", "gradio": "3.43.2", "transformers": "4.48.3", "diffusers": "0.33.0.dev0",
    "numpy": "1.26.4", "safetensors": "0.5.2", "huggingface_hub": "0.28.1", "clip": "1.0",
    "open_clip_torch": "2.29.0", "ftfy": "6.3.1", "regex": "2024.11.6", "accelerate": "1.3.0",
}  # fmt: skip
HOSTS = {"a1111": A1111, "forge": FORGE, "reforge": REFORGE, "sdnext": SDNEXT}


def _names_in(args: list[str]) -> set[str]:
    return {install.normalize(re.split(r"[<>=!~ ;\[]", arg)[0]) for arg in args if not arg.startswith("-")}


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_plan_never_names_a_host_owned_package(host):
    args = install.plan_install(HOSTS[host], constraints="/tmp/c.txt")
    assert not _names_in(args) & set(NEVER_TOUCHED)
    assert "--upgrade" not in args and "-U" not in args


def test_a1111_gets_only_diffusers_with_every_installed_package_pinned():
    args = install.plan_install(A1111, constraints="/tmp/c.txt")
    assert args == ["install", "--prefer-binary", "--constraint", "/tmp/c.txt", "diffusers>=0.28,<0.32"]
    pins = install.constraints_text(A1111).splitlines()
    versions = {install.normalize(name): version for name, version in A1111.items()}
    for name in (*NEVER_TOUCHED, "huggingface-hub", "safetensors", "pillow"):
        assert f"{name}=={versions[name]}" in pins
    assert "torch==2.1.2+cu121" in pins  # local labels are kept so the CUDA build cannot be swapped


@pytest.mark.parametrize("host", ["forge", "reforge", "sdnext"])
def test_hosts_that_have_everything_install_nothing(host):
    assert install.plan_install(HOSTS[host]) == []


@pytest.mark.parametrize(
    ("transformers", "spec"),
    [("4.30.2", ">=0.28,<0.32"), ("4.36.2", ">=0.28,<0.32"), ("4.37.0", ">=0.28,<0.37"), ("4.46.1", ">=0.28,<0.37"),
     ("4.48.0", ">=0.28,<1"), ("5.2.0", ">=0.28,<1"), (None, ">=0.28,<1")],
)  # fmt: skip
def test_diffusers_is_chosen_by_the_transformers_installed(transformers, spec):
    """diffusers 0.32+ imports transformers' SiglipImageProcessor (4.37+), 0.37+ its Dinov2WithRegistersConfig
    (4.48+): pip alone picks 0.37 for A1111 1.10, whose transformers is 4.30."""
    assert install.diffusers_spec(transformers) == spec


def test_a_diffusers_too_new_for_its_transformers_is_named():
    misfit = install.diffusers_misfit({**A1111, "diffusers": "0.37.1"})
    assert misfit == "diffusers 0.37.1 needs transformers 4.48 or newer, and this Python has transformers 4.30.2"
    assert install.diffusers_misfit({**A1111, "diffusers": "0.31.0"}) is None
    assert install.diffusers_misfit(FORGE) is None and install.diffusers_misfit(A1111) is None
    assert "needs transformers 4.48" in install.diffusers_misfit({**FORGE, "diffusers": "0.37.1"})
    replaced = install.plan_install({**A1111, "diffusers": "0.37.1"}, replace=["diffusers"])
    assert replaced[-1] == "diffusers>=0.28,<0.32"
    assert "diffusers==" not in install.constraints_text({**A1111, "diffusers": "0.37.1"}, exclude=["diffusers"])


def test_only_missing_packages_are_requested():
    installed = {name: "9.9" for name in ("torch", "transformers", "numpy", "diffusers", "safetensors", "clip")}
    assert install.missing(installed) == ["ftfy>=6.1", "regex>=2022.1"]


def test_vocabulary_comes_from_openai_clip_never_open_clip_torch():
    bare = {"torch": "2.1", "transformers": "4.30.2", "numpy": "1.26"}
    wanted = install.missing(bare)
    assert "openai-clip>=1.0" in wanted
    assert not any("open-clip" in w or "open_clip" in w for w in wanted)
    assert "openai-clip>=1.0" not in install.missing(bare, has_clip_vocab=True)
    assert "openai-clip>=1.0" not in install.missing({**bare, "open_clip_torch": "2.20.0"})


def test_present_but_old_packages_are_reported_not_changed():
    old = {**FORGE, "diffusers": "0.21.4"}
    assert install.plan_install(old) == []
    assert any("diffusers 0.21.4 is older" in line for line in install.host_warnings(old))
    assert any(line.startswith("torch is not installed") for line in install.host_warnings({}))


def test_constraints_skip_unpinnable_versions_and_can_be_narrowed():
    text = install.constraints_text({"good": "1.2.3", "weird": "not a version", "Pillow": "10.4.0", "x y": "1"})
    assert text.splitlines() == ["good==1.2.3", "pillow==10.4.0"]
    narrow = install.constraints_text(A1111, only=install.HOST_CRITICAL).splitlines()
    assert "torch==2.1.2+cu121" in narrow and not any(line.startswith("tqdm") for line in narrow)


def test_requirements_txt_lower_bounds_match():
    """install.py asks pip for the same minimums as requirements.txt, and neither mentions torch."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {install.normalize(re.split(r"[<>=!~]", line)[0]): line for line in lines if line}
    for name, spec in {**install.REQUIRED, install.VOCAB_DISTRIBUTION: install.VOCAB_SPEC}.items():
        assert name in listed, f"{name} missing from requirements.txt"
        assert install.minimum(listed[name]) == install.minimum(spec), (name, listed[name], spec)
    assert not {n for n in listed if n.startswith("torch") or "open-clip" in n}


@pytest.mark.parametrize(
    ("argv", "environ", "launch_args", "expected"),
    [
        ([], {}, None, False),
        (["--skip-install"], {}, None, True),
        ([], {"COMMANDLINE_ARGS": "--xformers --skip-install"}, None, True),
        ([], {"COMMANDLINE_ARGS": "--xformers 'unbalanced"}, None, False),
        ([], {"TI_SKIP_INSTALL": "1"}, None, True),
        ([], {}, types.SimpleNamespace(skip_install=True), True),
        ([], {}, types.SimpleNamespace(skip_install=False), False),
    ],
)
def test_should_skip(argv, environ, launch_args, expected):
    launch = types.SimpleNamespace(args=launch_args) if launch_args is not None else None
    assert install.should_skip(argv, environ, launch) is expected


def test_sdnext_module_flag_is_honoured():
    assert install.should_skip([], {}, types.SimpleNamespace(args=None, skip_install=True))


def test_quote_survives_a_shell():
    assert install.quote("diffusers>=0.28,<1") == '"diffusers>=0.28,<1"'
    assert install.quote("--constraint") == "--constraint"
    out = subprocess.run(f"echo {install.quote('diffusers>=0.28,<1')}", shell=True, capture_output=True, text=True)
    assert out.stdout.strip() == "diffusers>=0.28,<1"


def test_without_a_host_pip_runs_as_a_subprocess(monkeypatch):
    calls = []
    monkeypatch.setattr(install.subprocess, "run", lambda cmd, check: calls.append(cmd))
    install.pip_runner(None)(["install", "x>=1"], "x")
    assert calls == [[sys.executable, "-m", "pip", "install", "x>=1"]]


# ---- `python install.py` as the web UI runs it, with a fake `launch` module on PYTHONPATH -----------
# The fake run_pip records what it was asked and "installs" diffusers as a package in the site folder: one
# that imports, or (DIFFUSERS=broken) one that fails as diffusers 0.32+ does under transformers 4.30.

FAKE_LAUNCH = """
import json, os, shlex, types
args = types.SimpleNamespace(skip_install={skip})
FAIL = {fail}  # how many pip calls fail
HERE = os.path.dirname(os.path.abspath(__file__))
_calls = []

GOOD = "StableDiffusionPipeline = StableDiffusionXLPipeline = object\\n"
BROKEN = "raise ImportError(\\"cannot import name 'SiglipImageProcessor' from 'transformers' (/x/transformers/__init__.py)\\")\\n"

def _install_diffusers(version):
    for name in os.listdir(HERE):
        if name.startswith("diffusers-"):
            os.remove(os.path.join(HERE, name, "METADATA")); os.rmdir(os.path.join(HERE, name))
    os.makedirs(os.path.join(HERE, "diffusers"), exist_ok=True)
    with open(os.path.join(HERE, "diffusers", "__init__.py"), "w") as handle:
        handle.write(BROKEN if os.environ.get("DIFFUSERS") == "broken" else GOOD)
    info = os.path.join(HERE, "diffusers-" + version + ".dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as handle:
        handle.write("Metadata-Version: 2.1\\nName: diffusers\\nVersion: " + version + "\\n")

def run_pip(command, desc=None, live=False):
    # A1111's: prints "Installing <desc>", runs pip with the output captured, raises RuntimeError on failure.
    print("Installing " + desc, flush=True)
    words = shlex.split(command)
    constraints = words[words.index("--constraint") + 1] if "--constraint" in words else None
    pins = open(constraints).read().split() if constraints else []
    _calls.append(1)
    with open(os.environ["RECORD"], "a") as handle:
        handle.write(json.dumps({{"command": command, "words": words, "pins": pins, "desc": desc}}) + "\\n")
    if len(_calls) <= FAIL:
        raise RuntimeError("Couldn't install " + desc + ".\\nCommand: pip ...\\nResolutionImpossible")
    if any(word.startswith("diffusers") for word in words):
        _install_diffusers(os.environ.get("DIFFUSERS_VERSION", "0.31.0"))

def is_installed(package):
    return False
"""


def _site(tmp_path: Path, installed: dict[str, str], *, skip=False, fail=0, diffusers_code: str | None = None) -> Path:
    """A PYTHONPATH folder with the fake launch module and .dist-info stubs for `installed` (and, with
    `diffusers_code`, an importable diffusers package holding that code)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "launch.py").write_text(textwrap.dedent(FAKE_LAUNCH.format(skip=skip, fail=fail)))
    for name, version in installed.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if diffusers_code is not None:
        (site / "diffusers").mkdir()
        (site / "diffusers" / "__init__.py").write_text(diffusers_code)
    return site


def _run_install(tmp_path: Path, site: Path, *extra: str, env: dict[str, str] | None = None):
    record = tmp_path / "record.jsonl"
    record.unlink(missing_ok=True)
    # -S: no site-packages, so the only installed distributions are the stubs in `site`.
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "install.py"), *extra],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "RECORD": str(record), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return result, calls


def _one_line(result) -> str:
    """What the user reads: install.py's own lines on stdout (A1111 drops an installer's stderr on success)."""
    ours = [line for line in result.stdout.splitlines() if line.startswith("[textual-inversion-trainer]")]
    assert len(ours) == 1, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    return ours[0]


def test_subprocess_a1111_installs_a_diffusers_its_transformers_imports(tmp_path):
    site = _site(tmp_path, A1111)
    result, calls = _run_install(tmp_path, site)
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1
    words = calls[0]["words"]
    assert words[0] == "install" and words[-1] == "diffusers>=0.28,<0.32"
    assert not _names_in(words) & set(NEVER_TOUCHED)
    assert {"torch==2.1.2+cu121", "transformers==4.30.2", "numpy==1.26.2", "gradio==3.41.2"} <= set(calls[0]["pins"])
    assert _one_line(result) == "[textual-inversion-trainer] installed diffusers 0.31.0"
    # The next launch finds everything and does nothing.
    again, calls = _run_install(tmp_path, site)
    assert again.returncode == 0 and calls == [] and again.stdout == ""


def test_subprocess_a_diffusers_that_does_not_import_is_one_line(tmp_path):
    result, calls = _run_install(tmp_path, _site(tmp_path, A1111), env={"DIFFUSERS": "broken"})
    assert result.returncode == 0, result.stderr  # a web UI would wrap a failure in a multi-line report
    assert len(calls) == 1
    line = _one_line(result)
    assert "installed diffusers 0.31.0, but it does not import with transformers 4.30.2" in line
    assert "cannot import name 'SiglipImageProcessor' from 'transformers')" in line  # the path is left out
    assert "Textual Inversion tab cannot work" in line


def test_subprocess_replaces_a_diffusers_its_transformers_cannot_import(tmp_path):
    """An earlier install picked diffusers 0.37.1 for transformers 4.30: it is replaced, and only it unpinned."""
    broken = "raise ImportError(\"cannot import name 'SiglipImageProcessor' from 'transformers'\")\n"
    site = _site(tmp_path, {**A1111, "diffusers": "0.37.1"}, diffusers_code=broken)
    result, calls = _run_install(tmp_path, site)
    assert result.returncode == 0, result.stderr
    (call,) = calls
    assert call["words"][-1] == "diffusers>=0.28,<0.32"
    assert not any(pin.startswith("diffusers") for pin in call["pins"]) and "transformers==4.30.2" in call["pins"]
    assert "replacing diffusers: diffusers 0.37.1 needs transformers 4.48 or newer" in result.stdout
    assert result.stdout.strip().endswith("installed diffusers 0.31.0")


def test_subprocess_a_misfit_that_imports_after_all_is_left_alone(tmp_path):
    site = _site(
        tmp_path,
        {**A1111, "diffusers": "0.37.1"},
        diffusers_code="StableDiffusionPipeline = StableDiffusionXLPipeline = 1\n",
    )
    result, calls = _run_install(tmp_path, site)
    assert result.returncode == 0 and calls == [], result.stdout + result.stderr


def test_subprocess_forge_does_nothing(tmp_path):
    result, calls = _run_install(tmp_path, _site(tmp_path, FORGE))
    assert result.returncode == 0, result.stderr
    assert calls == [] and result.stdout == ""


@pytest.mark.parametrize(
    ("skip", "extra", "env"),
    [(True, (), None), (False, ("--skip-install",), None), (False, (), {"TI_SKIP_INSTALL": "1"})],
)
def test_subprocess_honours_skip_install(tmp_path, skip, extra, env):
    result, calls = _run_install(tmp_path, _site(tmp_path, A1111, skip=skip), *extra, env=env)
    assert result.returncode == 0, result.stderr
    assert calls == []
    assert "skip-install" in result.stdout


def test_subprocess_retries_with_only_critical_pins(tmp_path):
    result, calls = _run_install(tmp_path, _site(tmp_path, A1111, fail=1))
    assert result.returncode == 0, result.stderr
    assert len(calls) == 2
    assert "tqdm==4.66.1" in calls[0]["pins"] and not any(p.startswith("tqdm") for p in calls[1]["pins"])
    assert "torch==2.1.2+cu121" in calls[1]["pins"]
    assert _one_line(result) == "[textual-inversion-trainer] installed diffusers 0.31.0"


def test_subprocess_pip_failing_twice_is_one_line(tmp_path):
    result, calls = _run_install(tmp_path, _site(tmp_path, A1111, fail=2))
    assert result.returncode == 0 and len(calls) == 2
    line = _one_line(result)
    assert line.startswith(
        "[textual-inversion-trainer] could not install diffusers>=0.28,<0.32 (pip: Couldn't install"
    )
    assert "Textual Inversion tab cannot work" in line


def test_subprocess_bare_python_asks_for_everything_but_host_packages(tmp_path):
    result, calls = _run_install(tmp_path, _site(tmp_path, {}))
    assert result.returncode == 0, result.stderr
    assert "torch is not installed" in result.stdout
    (call,) = calls
    assert set(call["words"][4:]) == {
        "diffusers>=0.28,<1",
        "safetensors>=0.4",
        "ftfy>=6.1",
        "regex>=2022.1",
        "openai-clip>=1.0",
    }
