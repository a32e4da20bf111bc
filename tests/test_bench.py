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
    assert "time to first step" in out
    report = json.loads(result_file.read_text())
    rows = {row["trainer"]: row for row in report["rows"]}
    assert rows["ours"]["steps_per_second"] > 0 and rows["reference"]["steps_per_second"] > 0
    assert report["ratios"]["1"]["wall"] > 0
