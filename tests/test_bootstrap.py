"""The README's first two commands, run as a newcomer would, on a fresh copy of the repository.

`python run.py` makes a virtual environment, installs torch and the app's requirements and serves the
app; `python run.py test` sets up the tests and runs the suite; a second `python run.py` installs nothing.

The full run makes a new environment (minutes, from pip's cache where it can), so it runs only with
TI_BOOTSTRAP_TEST=1, which .ci/run sets for its newest-libraries pass; the README check always runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP_MINUTES = 25  # the first command's limit: a fresh environment on a slow, shared machine
SETUP_LINE = "[run.py] Setting up"


def readme_commands() -> list[str]:
    """The commands of the README's first two code blocks (comments dropped)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M)
    return [
        " ".join(line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip())
        for block in blocks[:2]
    ]


def test_the_readme_starts_with_the_two_commands():
    assert readme_commands() == ["python run.py", "python run.py test"]


needs_opt_in = pytest.mark.skipif(
    os.environ.get("TI_BOOTSTRAP_TEST") != "1", reason="a fresh environment takes minutes: TI_BOOTSTRAP_TEST=1"
)


def base_python() -> str:
    """The interpreter a newcomer has: this one's base, outside any virtual environment."""
    python = getattr(sys, "_base_executable", None) or sys.executable
    probe = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix == sys.base_prefix)"], capture_output=True, text=True
    )
    assert probe.stdout.strip() == "True", f"{python} is inside a virtual environment"
    return python


def fresh_copy(target: Path) -> Path:
    """The files a clone of this checkout has (committed or not, nothing that git ignores)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def newcomer_env() -> dict[str, str]:
    """This environment without the test run's virtual environment and switches."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "TI_"))}
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    venv_bin = str(Path(sys.prefix) / ("Scripts" if os.name == "nt" else "bin"))
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep) if part != venv_bin)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200 and b"<" in response.read(4096)
    except OSError:
        return False


def run_app(command: str, folder: Path, log: Path, minutes: float) -> str:
    """Start the README's app command (with a free port), wait until it serves, stop it; returns its output."""
    port = free_port()
    argv = [base_python(), *command.split()[1:], "--port", str(port)]
    with open(log, "w") as output:
        process = subprocess.Popen(
            argv, cwd=folder, env=newcomer_env(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + minutes * 60
            while not serves(f"http://127.0.0.1:{port}/"):
                assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"not serving after {minutes} min:\n{log.read_text()[-3000:]}"
                time.sleep(1)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    return log.read_text()


@needs_opt_in
@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="stops the app by its process group")
def test_from_a_fresh_copy_the_two_commands_serve_the_app_and_run_the_suite(tmp_path):
    app_command, test_command = readme_commands()
    folder = fresh_copy(tmp_path / "clone")
    assert not (folder / ".venv").exists()

    first = run_app(app_command, folder, tmp_path / "app-1.log", SETUP_MINUTES)
    assert SETUP_LINE in first and (folder / ".venv").is_dir()

    suite = subprocess.run(
        # The real hosts (skipped: a fresh copy has no host kit beside it) before a browser test, as in the
        # whole suite: a skipped module must leave nothing behind that breaks the next one.
        [
            base_python(),
            *test_command.split()[1:],
            "tests/test_names.py",
            "tests/real_hosts",
            "tests/test_ui.py::test_create_shows_the_prompt_budget_and_writes_the_file",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=folder,
        env=newcomer_env(),
        capture_output=True,
        text=True,
        timeout=SETUP_MINUTES * 60,
    )
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]
    assert re.search(r"^\d+ passed", suite.stdout.splitlines()[-1])

    again = run_app(app_command, folder, tmp_path / "app-2.log", 5)
    assert SETUP_LINE not in again and "Installing" not in again  # the stamp: nothing to install
