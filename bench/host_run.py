"""Memory and latency of training inside a running web UI, measured from outside through its HTTP API.

    python bench/host_run.py --port 7861 --pid PID --images DIR [--runs 3] [--steps 4] [--resolution 64]

Per run: the web UI process's RSS before (idle), its peak during the run (sampled every 50 ms), the time
from the POST of /ti/v1/train to the first training step, and the RSS after. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (the web UI runs as one process)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def call(port: int, method: str, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self._done = pid, every, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def one_run(args, index: int) -> dict:
    name = f"hostbench{index}"
    idle = rss_bytes(args.pid)
    sampler = PeakSampler(args.pid)
    sampler.start()
    started = time.perf_counter()
    config = {
        "name": name,
        "init_text": "tree",
        "vectors": 1,
        "steps": args.steps,
        "overwrite": True,
        "preview_every": args.preview_every,
        "preview_steps": 2,
        "data": {"images": str(args.images), "resolution": args.resolution},
    }
    call(args.port, "POST", "/ti/v1/train", config)
    first_step = None
    while True:
        snapshot = call(args.port, "GET", "/ti/v1/progress")
        if first_step is None and int(snapshot.get("step") or 0) >= 1:
            first_step = time.perf_counter() - started
        if not snapshot.get("running", False):
            break
        time.sleep(0.05)
    total = time.perf_counter() - started
    peak = sampler.stop()
    time.sleep(1.0)
    return {
        "run": index,
        "idle_rss_gib": round(idle / 2**30, 3),
        "peak_rss_gib": round(peak / 2**30, 3),
        "peak_over_idle_gib": round((peak - idle) / 2**30, 3),
        "after_rss_gib": round(rss_bytes(args.pid) / 2**30, 3),
        "first_step_s": None if first_step is None else round(first_step, 2),
        "run_s": round(total, 2),
        "stopped": snapshot.get("stopped"),
        "message": snapshot.get("message"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--preview-every", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    for index in range(1, args.runs + 1):
        print(json.dumps(one_run(args, index)), flush=True)


if __name__ == "__main__":
    main()
