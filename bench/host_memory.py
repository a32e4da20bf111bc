"""A web UI's memory and the time to the first step of a training run inside it, measured from outside.

    python bench/host_memory.py --url http://127.0.0.1:7861 --pid PID --images FOLDER --name tok [--runs 3]

Starts `--runs` training runs through the extension's HTTP route (POST /ti/v1/train, then GET
/ti/v1/progress), one after another, and for each prints the web UI process's RSS before it, its peak
during it (the kernel's high-water mark VmHWM, reset before the run by writing 5 to
/proc/PID/clear_refs; a 0.2 s VmRSS sampler where that is refused), its RSS once the run is over and the
process is idle again, and the seconds from the POST to the first training step. Linux only (/proc).
The real-host tests (tests/real_hosts) use the same helpers and print the same figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1024**3


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of process `pid`, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    return {
        key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024 for key in ("VmRSS", "VmHWM")
    }


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux 4.0+, same user or root); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """The highest VmRSS seen while the `with` block runs, sampled every `seconds` (the fallback when
    VmHWM cannot be reset, and a check on it)."""

    def __init__(self, pid: int, seconds: float = 0.2) -> None:
        self.pid, self.seconds, self.peak = pid, seconds, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, memory(self.pid)["VmRSS"])
            except (OSError, AttributeError):
                return
            if self._stop.wait(self.seconds):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class RunMemory:
    """One run as seen from outside the web UI's process (bytes and seconds)."""

    rss_before: int
    peak: int
    rss_after: int
    first_step_seconds: float | None
    total_seconds: float
    stopped: str | None

    def line(self) -> str:
        first = f"{self.first_step_seconds:.1f} s" if self.first_step_seconds is not None else "never"
        return (
            f"RSS before {self.rss_before / GIB:.2f} GiB, peak {self.peak / GIB:.2f} GiB, after"
            f" {self.rss_after / GIB:.2f} GiB; first step after {first}; run {self.total_seconds:.1f} s ({self.stopped})"
        )


def settled_rss(pid: int, seconds: float = 3.0, limit: float = 30.0) -> int:
    """The process's RSS once it has stopped changing by more than 1 % over `seconds` (freed memory and
    finishing threads take a moment after a run ends), or after `limit` seconds."""
    deadline = time.monotonic() + limit
    previous = memory(pid)["VmRSS"]
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = memory(pid)["VmRSS"]
        if abs(now - previous) <= previous * 0.01:
            return now
        previous = now
    return previous


def request(base: str, method: str, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    sent = urllib.request.Request(
        base.rstrip("/") + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(sent, timeout=timeout) as answer:
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        raise RuntimeError(
            f"{method} {path}: HTTP {error.code}: {error.read().decode(errors='replace')[:500]}"
        ) from error


def measure_run(base: str, pid: int, start, timeout: float = 1800, poll: float = 0.1) -> tuple[RunMemory, dict]:
    """Run `start()` (which starts a training run: a POST, a click) and follow /ti/v1/progress until the run
    ends; returns the figures and the last progress snapshot."""
    previous = request(base, "GET", "/ti/v1/progress", timeout=60).get("started_at")
    rss_before = memory(pid)["VmRSS"]
    hwm_reset = reset_peak(pid)
    began = time.monotonic()
    first_step = None
    snapshot: dict = {}
    with PeakSampler(pid) as sampler:
        start()
        while time.monotonic() - began < timeout:
            snapshot = request(base, "GET", "/ti/v1/progress", timeout=60)
            ours = snapshot.get("started_at") not in (None, previous)  # the run start() began, not the last one
            if ours and first_step is None and int(snapshot.get("step") or 0) >= 1:
                first_step = time.monotonic() - began
            if ours and not snapshot.get("running"):
                break
            time.sleep(poll)
        total = time.monotonic() - began
    peak = max(sampler.peak, memory(pid)["VmHWM"] if hwm_reset else 0)
    figures = RunMemory(rss_before, peak, settled_rss(pid), first_step, total, snapshot.get("stopped"))
    return figures, snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7861", help="the web UI (default: %(default)s)")
    parser.add_argument("--pid", type=int, required=True, help="the web UI's process id")
    parser.add_argument("--images", type=Path, required=True, help="a folder of training images")
    parser.add_argument("--name", default="bench-host-memory", help="embedding name (overwritten each run)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line per run instead")
    parser.add_argument(
        "--poll",
        type=float,
        default=0.1,
        help="seconds between progress requests (SD.Next allows 300 API requests a minute: use 0.5 there)",
    )
    args = parser.parse_args(argv)
    body = {
        "name": args.name,
        "overwrite": True,
        "data": {"images": str(args.images.absolute()), "resolution": args.resolution},
        "steps": args.steps,
        "save_every": 0,
        "preview_every": 0,
        "preview_steps": 1,
    }
    for run in range(1, args.runs + 1):
        figures, snapshot = measure_run(
            args.url, args.pid, lambda: request(args.url, "POST", "/ti/v1/train", body), poll=args.poll
        )
        if args.json:
            print(json.dumps({"run": run, **asdict(figures), "message": snapshot.get("message")}))
        else:
            print(f"run {run}: {figures.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
