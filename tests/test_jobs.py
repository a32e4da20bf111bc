"""TrainingJob: a training run on a background thread, observed through snapshots (what the UI polls)."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import ti_core.train
from ti_core.config import TrainConfig
from ti_core.create import create_embedding
from ti_core.formats import load_embedding, save_embedding
from ti_core.jobs import TrainingJob, current_job
from ti_core.train import TrainEvent, TrainResult


def _config(tmp_path: Path, name: str = "cat", **changes) -> TrainConfig:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    values = {
        "name": name,
        "embeddings_dir": str(tmp_path / "emb"),
        "log_dir": str(tmp_path / "log"),
        "data": {"images": str(images), "resolution": 64},
        "steps": 4,
    }
    return TrainConfig.from_dict({**values, **changes})


@pytest.fixture
def fake_train(monkeypatch):
    """Replace train() by a script of events; `gate` holds the run until the test releases it."""
    state = SimpleNamespace(gate=threading.Event(), events=[], result=None, error=None, seen_cancel=None)

    def train(model, config, callback=None, *, cancel=None, accelerator=None):
        for event in state.events:
            callback(event)
        state.gate.wait(10)
        state.seen_cancel = cancel.is_set()
        if state.error:
            raise state.error
        stopped = "interrupted" if cancel.is_set() else "done"
        return state.result or TrainResult(Path("/x/cat.safetensors"), 4, stopped, f"{stopped} at 4", Path("/x"))

    monkeypatch.setattr(ti_core.train, "train", train)
    yield state
    state.gate.set()
    job = current_job()
    if job is not None:
        job.wait(10)


def test_snapshot_follows_the_events_and_is_json(fake_train, tmp_path):
    fake_train.events = [
        TrainEvent("start", 0, 4, message="4 images"),
        TrainEvent("step", 1, 4, loss=0.5, lr=0.005, steps_per_second=2.0, eta_seconds=1.5, epoch=0),
        TrainEvent("step", 2, 4, loss=0.25, lr=0.005, steps_per_second=2.0, eta_seconds=1.0, epoch=0),
        TrainEvent("preview", 2, 4, path=Path("/x/cat-2.png"), message="Preview"),
    ]
    job = TrainingJob.start(lambda: object(), _config(tmp_path))
    running = _wait_for(job, lambda snap: snap["step"] == 2 and snap["previews"])
    assert running["running"] and running["phase"] == "training"
    assert running["losses"] == [[1, 0.5], [2, 0.25]] and running["previews"] == ["/x/cat-2.png"]
    assert (running["loss"], running["eta_seconds"], running["total"]) == (0.25, 1.0, 4)
    fake_train.gate.set()
    assert job.wait(10)
    done = job.snapshot()
    assert not done["running"] and done["stopped"] == "done" and done["final_path"] == "/x/cat.safetensors"
    assert done["message"] == "done at 4" and done["step"] == 4
    assert json.loads(json.dumps(done)) == done


def test_a_second_run_is_refused_while_one_runs(fake_train, tmp_path):
    TrainingJob.start(lambda: object(), _config(tmp_path))
    with pytest.raises(RuntimeError, match="already in progress"):
        TrainingJob.start(lambda: object(), _config(tmp_path, name="dog"))


def test_cancel_reaches_the_trainer(fake_train, tmp_path):
    job = TrainingJob.start(lambda: object(), _config(tmp_path))
    job.cancel()
    fake_train.gate.set()
    assert job.wait(10)
    assert fake_train.seen_cancel is True
    assert job.snapshot()["stopped"] == "interrupted"


def test_a_failure_is_one_line_and_the_context_is_left(fake_train, tmp_path):
    entered, exited = [], []

    @contextlib.contextmanager
    def context():
        entered.append(True)
        try:
            yield
        finally:
            exited.append(True)

    fake_train.error = ValueError("the dataset folder is empty\nsecond line")
    fake_train.gate.set()
    job = TrainingJob.start(lambda: object(), _config(tmp_path), context=context)
    assert job.wait(10)
    snapshot = job.snapshot()
    assert snapshot["stopped"] == "error" and snapshot["message"] == "Training failed: the dataset folder is empty"
    assert entered == exited == [True]


def test_a_model_that_cannot_load_is_reported(tmp_path):
    def no_model():
        raise ValueError("No model is loaded. Start the app with --model")

    job = TrainingJob.start(no_model, _config(tmp_path))
    assert job.wait(10)
    assert job.snapshot()["error"] == "No model is loaded. Start the app with --model"


def test_a_real_tiny_run_reports_every_step(tiny_models, tmp_path):
    from PIL import Image

    model = tiny_models["sd1"]
    config = _config(tmp_path, steps=3, preview_every=3, preview_steps=1, save_every=0, resume=True)
    for index in range(2):
        Image.new("RGB", (64, 64), (80 * index, 120, 200)).save(config.data.images / f"{index}.png")
    save_embedding(create_embedding(model, "cat", "cat", 2), config.embeddings_dir)
    seen = []
    job = TrainingJob.start(lambda: model, config, on_event=lambda event: seen.append(event.kind))
    assert job.wait(120)
    snapshot = job.snapshot()
    assert snapshot["stopped"] == "done", snapshot["message"]
    assert [step for step, _ in snapshot["losses"]] == [1, 2, 3]
    assert len(snapshot["previews"]) == 1 and Path(snapshot["previews"][0]).is_file()
    assert load_embedding(Path(snapshot["final_path"])).step == 3
    assert seen[0] == "start" and seen.count("step") == 3 and seen[-1] == "done"


def _wait_for(job: TrainingJob, ready, timeout: float = 10) -> dict:
    deadline = threading.Event()
    for _ in range(int(timeout / 0.02)):
        snapshot = job.snapshot()
        if ready(snapshot):
            return snapshot
        deadline.wait(0.02)
    raise AssertionError(f"the job never got there: {job.snapshot()}")


def test_validation_loss_is_kept_apart_and_nan_is_not_json(fake_train, tmp_path):
    fake_train.events = [
        TrainEvent("step", 1, 4, loss=0.5),
        TrainEvent("validation", 1, 4, loss=0.7, message="Validation loss 0.7"),
        TrainEvent("step", 2, 4, loss=float("nan")),
    ]
    fake_train.gate.set()
    job = TrainingJob.start(lambda: object(), _config(tmp_path))
    assert job.wait(10)
    snapshot = job.snapshot()
    assert snapshot["validation_loss"] == 0.7 and snapshot["loss"] is None
    assert snapshot["losses"] == [[1, 0.5]]  # a non-finite loss is not plotted
    json.dumps(snapshot, allow_nan=False)
