"""`python -m ti_core train`: exit codes, error lines, settings files, Ctrl+C and `accelerate launch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ti_core.formats import load_embedding
from ti_core.train_cli import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index in range(4):
        Image.new("RGB", (64, 64), (30, 40 * index, 200)).save(folder / f"{index}-a blue square.png")
    return folder


@pytest.fixture
def base_args(tmp_path, images, tiny_model_dirs):
    return [
        "--model", str(tiny_model_dirs["sd1"]),
        "--embeddings-dir", str(tmp_path / "embeddings"),
        "--log-dir", str(tmp_path / "logs"),
        "--name", "cat",
        "--images", str(images),
        "--resolution", "64",
        "--steps", "2",
        "--preview-every", "0",
        "--save-every", "0",
    ]  # fmt: skip


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--embeddings-dir", "e", "--images", "i"], "error: --name is required (or give 'name' in --config)"),
        (["--name", "cat", "--embeddings-dir", "e", "--images", "i", "--steps", "0"], "error: steps must be at least 1, not 0"),
        (["--name", "cat", "--embeddings-dir", "e", "--images", "i", "--learning-rate", "0.1:x"], "error: Invalid learning rate schedule: '0.1:x'"),
        (["--name", "cat", "--embeddings-dir", "e", "--images", "i", "--resolution", "65"], "error: resolution must be a multiple of 8"),
        (["--name", "cat", "--embeddings-dir", "e", "--images", "i", "--mixed-precision", "fp8"], "error: argument --mixed-precision: invalid choice"),
        (["--name", "cat", "--embeddings-dir", "e", "--images", "i", "--preview-width", "100"], "error: preview_width must be a multiple of 8"),
        (["--name", "cat", "--embeddings-dir", "e", "--images", "i", "--preview-sampler", "heun"], "error: argument --preview-sampler: invalid choice"),
        (["--name", "cat", "--embeddings-dir", "e", "--images", "i", "--config", "missing.json"], "error: --config missing.json: No such file"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_with_one_error_line(capsys, args, message):
    assert main(["--model", "m", *args]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(message)


def test_unknown_settings_in_a_config_file_are_named(tmp_path, capsys, base_args):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"steps": 3, "learnrate": 0.1, "data": {"flipped": True}}))
    assert main([*base_args, "--config", str(settings)]) == 2
    assert capsys.readouterr().err == "error: unknown training setting: learnrate\n"


def test_runtime_errors_exit_1_with_one_error_line_and_no_traceback(tmp_path, capsys, base_args):
    assert main([*base_args[:8], "--images", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: --images {tmp_path / 'nowhere'} is not a folder"]
    assert "Traceback" not in err

    args = [*base_args]
    args[1] = str(tmp_path / "no-model")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "no-model" in error_lines(err)[0]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, base_args):
    with pytest.raises(ValueError, match="is not a folder"):
        main([*base_args[:8], "--images", str(tmp_path / "nowhere"), "--debug"])


def test_train_then_resume_from_the_saved_settings(tmp_path, capsys, base_args):
    assert main(base_args) == 0
    out = capsys.readouterr().out
    embedding = tmp_path / "embeddings" / "cat.safetensors"
    assert out.splitlines()[-1] == f"Trained cat to step 2; saved {embedding}"
    assert load_embedding(embedding).step == 2

    # A second run without --resume would replace the trained embedding: refused, naming the flags.
    assert main(base_args) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"error: {embedding} is already trained to step 2; add --resume to continue training it (to a step "
        "above 2), or --overwrite to start again"
    ]

    # The run's settings.json is a valid --config; flags given override it.
    settings = tmp_path / "logs" / "cat" / "settings.json"
    model = base_args[1]
    assert main(["--model", model, "--config", str(settings), "--resume", "--steps", "3"]) == 0
    assert "from step 2 to step 3; optimizer state restored" in capsys.readouterr().out
    assert load_embedding(embedding).step == 3
    assert json.loads(settings.read_text())["steps"] == 3


def test_a_diverging_run_exits_1_and_keeps_finite_vectors(tmp_path, capsys, base_args):
    assert main([*base_args, "--steps", "6", "--learning-rate", "1e30", "--method", "plain"]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: Training stopped: the ")
    assert "saved the last finite vectors" in line


def cli_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def test_ctrl_c_saves_and_exits_0(tmp_path, base_args):
    args = [*base_args, "--steps", "100000"]
    process = subprocess.Popen(
        [sys.executable, "-m", "ti_core.train_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
    )
    loading, started = process.stdout.readline(), process.stdout.readline()
    assert loading.startswith("Loading "), loading + process.stderr.read()
    assert started.startswith("Training cat on 4 images"), started + process.stderr.read()
    time.sleep(2)  # a few steps
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Stopping after this step" in err
    message = out.splitlines()[-1]
    assert message.startswith("Training interrupted at step ")
    step = int(message.split("step ")[1].split(";")[0])
    assert load_embedding(tmp_path / "embeddings" / "cat.safetensors").step == step


def test_two_processes_under_accelerate_launch(tmp_path, base_args):
    # accelerate's multi-process launcher is --multi_gpu; ACCELERATE_USE_CPU makes it gloo on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args = [*base_args, "--steps", "3", "--save-every", "3"]
    env = {**cli_env(), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(
        [*launch, "-m", "ti_core.train_cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert (
        lines[0].startswith("Loading ")
        and lines[1] == "Training cat on 4 images on 2 processes, from the start to step 3; method: directional"
    )  # printed once: rank 0
    assert lines[-1].endswith("(2 processes finished with identical vectors)")
    assert sorted(path.name for path in (tmp_path / "embeddings").iterdir()) == ["cat.safetensors"]
    assert load_embedding(tmp_path / "embeddings" / "cat.safetensors").step == 3
    assert (tmp_path / "logs" / "cat" / "cat-3.safetensors").is_file()


def _no_model_load(monkeypatch) -> None:
    """Makes loading any model fail loudly: what a test checks must be found before the model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("ti_core.models.load_model", refuse)


def test_create_then_train_trains_the_created_embedding(tmp_path, capsys, base_args, tiny_model_dirs):
    from ti_core.cli import main as cli_main

    embeddings = tmp_path / "embeddings"
    create = ["create", "--model", str(tiny_model_dirs["sd1"]), "--name", "cat", "--init-text", "tree"]
    assert cli_main([*create, "--vectors", "3", "--embeddings-dir", str(embeddings)]) == 0
    created = load_embedding(embeddings / "cat.safetensors")
    capsys.readouterr()

    assert main(base_args) == 0  # no --resume: the embedding was created, never trained
    out = capsys.readouterr().out
    assert "training cat.safetensors as it was created (3 vectors)" in out
    trained = load_embedding(embeddings / "cat.safetensors")
    assert trained.step == 2 and trained.num_vectors == 3 and trained.metadata["init_text"] == "tree"
    assert not all(trained.vectors[key].equal(created.vectors[key]) for key in created.vectors)


def test_the_embeddings_state_is_checked_before_the_model_loads(tmp_path, capsys, base_args, monkeypatch):
    assert main(base_args) == 0
    capsys.readouterr()
    _no_model_load(monkeypatch)
    embedding = tmp_path / "embeddings" / "cat.safetensors"
    assert main(base_args) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "--resume" in line and "--overwrite" in line
    assert main([*base_args, "--resume"]) == 1  # trained to 2 already, --steps 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: {embedding} is already trained to step 2; give --steps above 2 to resume it"
    ]
    assert main([*base_args, "--name", "dog", "--resume"]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: cannot resume:") and "dog.safetensors does not exist" in line


def test_without_resolution_the_models_own_is_used(tmp_path, capsys, base_args, tiny_models):
    args = [*base_args]
    del args[args.index("--resolution") : args.index("--resolution") + 2]
    assert main(args) == 0
    settings = json.loads((tmp_path / "logs" / "cat" / "settings.json").read_text())
    assert settings["data"]["resolution"] == tiny_models["sd1"].resolution != 512
    dog = [*args, "--resolution", "128", "--steps", "1"]
    dog[dog.index("--name") + 1] = "dog"
    assert main(dog) == 0
    settings = json.loads((tmp_path / "logs" / "dog" / "settings.json").read_text())
    assert settings["data"]["resolution"] == 128


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _events(progress, clock, total: int, seconds_per_step: float) -> None:
    from ti_core.train import TrainEvent

    progress(TrainEvent("start", 0, total, message=f"Training cat to step {total}"))
    for step in range(1, total + 1):
        clock.now += seconds_per_step
        rate = 1 / seconds_per_step
        progress(
            TrainEvent(
                "step",
                step,
                total,
                loss=0.5 / step,
                lr=0.005,
                steps_per_second=rate,
                eta_seconds=(total - step) / rate,
            )
        )
        if step == 4:
            progress(TrainEvent("snapshot", step, total, message="Saved cat-4.safetensors"))


def test_progress_off_a_terminal_is_a_plain_line_every_few_seconds():
    import io

    from ti_core.train_cli import Progress

    stream, clock = io.StringIO(), FakeClock()
    with Progress(stream=stream, live=False, every=5.0, clock=clock) as progress:
        _events(progress, clock, total=20, seconds_per_step=2.0)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Training cat to step 20"
    steps = [line for line in lines if line.startswith("step ")]
    # 40 s of training: the first step, then one line per 5 s or more, and the last step.
    assert steps[0] == "step 1/20  2.0 s/step  ETA 0:00:38  loss 0.5000"
    assert [line.split()[1] for line in steps] == ["1/20", "4/20", "7/20", "10/20", "13/20", "16/20", "19/20", "20/20"]
    assert "Saved cat-4.safetensors" in lines and steps[-1].endswith("snapshot: step 4")
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_is_one_live_line():
    import io

    from ti_core.train_cli import Progress

    stream, clock = io.StringIO(), FakeClock()
    with Progress(stream=stream, live=True, clock=clock) as progress:
        _events(progress, clock, total=6, seconds_per_step=0.5)
    text = stream.getvalue()
    assert text.startswith("Training cat to step 6\n")
    assert text.count("\r") >= 6 and text.endswith("\n")
    screen = [part.split("\r")[-1] for part in text.split("\n")]  # what each terminal line ends up showing
    assert "Saved cat-4.safetensors" in screen
    assert screen[-2].rstrip() == "step 6/6  2.00 steps/s  ETA 0:00:00  loss 0.0833  snapshot: step 4"


def test_train_prints_progress_lines_as_it_goes(tmp_path, base_args):
    done = subprocess.run(
        [sys.executable, "-m", "ti_core", "train", *base_args, "--steps", "3"],
        capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"Loading {base_args[1]}..." and lines[1].startswith("Training cat on 4 images")
    assert lines[-2].startswith("step 3/3  ") and " loss " in lines[-2]
    assert lines[-1].startswith("Trained cat to step 3")


def test_a_saved_preset_gives_the_settings_and_flags_override_it(tmp_path, capsys, base_args):
    from ti_core.preset import presets_dir, save_preset

    preset = {
        "steps": 9,
        "optimizer": "adafactor",
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "data": {"flip": True},
    }
    path = save_preset("my subject", preset, tmp_path / "logs")
    assert path == presets_dir(tmp_path / "logs") / "my subject.json" == tmp_path / "presets" / "my subject.json"
    assert main([*base_args, "--preset", "my subject"]) == 0  # base_args give --steps 2
    settings = json.loads((tmp_path / "logs" / "cat" / "settings.json").read_text())
    assert (settings["steps"], settings["optimizer"], settings["lr_scheduler"]) == (2, "adafactor", "cosine")
    assert settings["data"]["flip"] is True and settings["data"]["resolution"] == 64
    # The same file is a --config; the shipped presets are there by name.
    capsys.readouterr()
    args = [*base_args, "--config", str(path), "--name", "dog", "--preset", "style (8-16 vectors)"]
    assert main(args) == 0
    settings = json.loads((tmp_path / "logs" / "dog" / "settings.json").read_text())
    assert (settings["optimizer"], settings["vectors"], settings["data"]["template"]) == (
        "adafactor",
        8,
        "style_filewords",
    )


def test_an_unknown_preset_is_one_line_naming_the_presets(capsys, base_args):
    assert main([*base_args, "--preset", "portrait"]) == 2
    assert capsys.readouterr().err == (
        "error: --preset: no preset named 'portrait' (presets: negative embedding (8 vectors), SDXL subject, "
        "style (8-16 vectors), subject (1-4 vectors))\n"
    )


def test_an_optimizer_that_cannot_run_here_is_one_line_before_the_model_loads(capsys, base_args, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "prodigyopt" else real(name))
    assert main([*base_args[2:], "--model", "missing-model", "--optimizer", "prodigy"]) == 1
    err = capsys.readouterr().err
    assert err == "error: optimizer prodigy needs the prodigyopt package: pip install prodigyopt\n"


def test_compare_renders_the_runs_snapshots_into_one_grid(tmp_path, capsys, base_args):
    from ti_core.cli import main as ti_main

    args = [*base_args]
    args[args.index("--save-every") + 1] = "1"
    assert main(args) == 0
    capsys.readouterr()
    model, logs = base_args[1], tmp_path / "logs"
    compare = ["compare", "--model", model, "--log-dir", str(logs), "--name", "cat"]
    assert ti_main([*compare, "--preview-width", "32", "--preview-height", "32", "--preview-steps", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    grid = logs / "cat" / "images" / "cat-snapshots.png"
    assert out[-1] == str(grid) and "Rendered the snapshot of step 2" in out
    with Image.open(grid) as image:
        assert image.height == 2 * 32  # a row per snapshot

    assert ti_main([*compare[:-1], "dog"]) == 2  # no such run: one line
    assert capsys.readouterr().err.startswith(f"error: no run of dog in {logs}")
