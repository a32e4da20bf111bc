"""The training benchmark still runs: 2 steps x 1 turn on the tiny model, both rows and the ratio printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_smoke(tmp_path):
    result_file = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "bench_train.py"),
        "--arch", "tiny",
        "--steps", "2",
        "--warmup", "1",
        "--repeats", "1",
        "--images", "2",
        "--whole-run", "3",
        "--workdir", str(tmp_path / "work"),
        "--json", str(result_file),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"^ours\s+1\s+\d+\.\d+", out, re.MULTILINE), out
    assert re.search(r"^reference\s+1\s+\d+\.\d+", out, re.MULTILINE), out
    assert re.search(r"ratio ours / reference, batch 1: \d+\.\d+x", out), out
    assert re.search(r"^forward\+backward only\s+1\s+\d+\.\d+", out, re.MULTILINE), out
    assert re.search(r"can exceed \d+\.\d+x the reference; ours runs at \d+% of that rate", out), out
    assert "time to first step" in out
    assert re.search(r"whole run of 3 steps.*\n  reference +\d+\.\d s.*\n  ours +\d+\.\d s \(\d+\.\d\dx", out), out
    report = json.loads(result_file.read_text())
    rows = {row["trainer"]: row for row in report["rows"]}
    assert rows["ours"]["steps_per_second"] > 0 and rows["reference"]["steps_per_second"] > 0
    assert report["ratios"]["1"]["wall"] > 0
    assert report["ratios"]["1"]["floor"]["ceiling"] > 0
    assert rows["forward+backward only"]["flops_per_step"] > 0
    assert 0 < report["whole_run"]["ours"]["first_step_seconds"] <= report["whole_run"]["ours"]["seconds"]


def test_cpu_memory_probe_sees_a_transient_peak_without_a_sampling_thread():
    """A 256 MiB buffer touched and freed inside a turn shows in the turn's working set, and on Linux the
    probe reads the kernel's high-water mark instead of running a thread beside the timed steps."""
    import threading

    import torch

    sys.path.insert(0, str(ROOT))
    from bench.bench_train import MemoryProbe

    threads_before = threading.active_count()
    with MemoryProbe(torch.device("cpu")) as probe:
        if sys.platform.startswith("linux"):
            assert threading.active_count() == threads_before
        buffer = bytearray(256 << 20)  # zero-filled: every page is touched
        del buffer
    assert probe.working_set >= 200 << 20
    assert probe.end < probe.start + (200 << 20)  # freed: the peak is not the end


def test_memory_benchmark_reports_weights_and_working_set(tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "memory_cpu.py"), "--arch", "small", "--resolution", "64"]
    run = subprocess.run(command + ["--steps", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = re.search(
        r"frozen UNet \+ text encoders \(torch.bfloat16\) ([\d.]+) GiB.*working set \+([\d.]+) GiB", run.stdout
    )
    assert line, run.stdout
    assert float(line.group(1)) > 0


def test_bench_editability_smoke(tmp_path):
    """The editability benchmark runs end to end (2 steps, 1 seed, two methods) and prints its table."""
    command = [
        sys.executable, str(ROOT / "bench" / "bench_editability.py"),
        "--steps", "2", "--seeds", "1", "--threads", "1", "--only", "plain TI,directional",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    number = r"-?\d+\.\d+ ± \d+\.\d+"
    for row in ("init word", "true word", "plain TI", "directional"):
        assert re.search(
            rf"^\| {row} \| {number} \| {number} \| {number} \| {number} \| {number} \|$", run.stdout, re.M
        )
    assert "cross_init" not in run.stdout.split("| embedding")[1]  # only the methods asked for
    assert re.search(r"^\| directional \|.*\| 1\.00 ± 0\.00 \|$", run.stdout, re.M)  # at a word's norm
