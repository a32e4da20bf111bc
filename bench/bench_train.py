"""Training speed: our trainer (`ti_core.train.train`) against the diffusers textual-inversion example's
algorithm (bench/reference_diffusers_ti.py), same model, images, resolution, batch and steps, one process.

    python bench/bench_train.py                      # CPU: scaled-down SD1.5 ("small"), ~2-4 minutes
    python bench/bench_train.py --ablate             # CPU: one speed lever at a time (see bench/RESULTS.md)
    python bench/bench_train.py --device cuda --arch sd15 --resolution 512 --batch-sizes 1,4,8 --mixed-precision bf16
    python bench/bench_train.py --device cuda --arch sdxl --resolution 1024 --batch-sizes 1 \
        --mixed-precision bf16 --gradient-checkpointing
    python bench/bench_train.py --device cuda --arch sd15 --mixed-precision bf16 --soak 1000

How it measures. The two trainers run in turns, A B A B ... (`--repeats` each), so slow drift from other load
on the machine hits both alike. Each turn runs `--warmup` steps then `--steps` timed steps; the rate is
timed steps / (end of the last step - end of the last warm-up step), stamped from our trainer's per-step
events and after each reference `step()` (both end on a `loss.item()` device sync), so setup, the final
save and our end-of-run card image are outside the window. Reported: the median over the turns; the ratio
is median(ours) / median(reference), and the median of the per-turn ratios. On the CPU each stamp also
records the training thread's CPU time (torch runs on one thread, `--threads 1`, and CPU autograd runs on
the calling thread), so "steps/CPU-s" measures the algorithms' cost even when other processes compete for
the cores; on a shared machine it is the number to trust, wall-clock steps/s the one a user sees.
Time-to-first-step = model load from disk + setup (our latent encoding, cold and warm disk cache) + the
first step. Memory: CUDA, the peak allocated during a turn minus what was allocated when it began
(activations, gradients, optimizer state) plus the trainer's weights; CPU, the peak RSS during a turn (the
kernel's high-water mark, reset when the turn begins) minus the RSS at its start, and the RSS after it. FLOPs
per step are counted with torch.utils.flop_counter on one step of each trainer (the reference's include its VAE
encode), and model FLOP utilisation (MFU) is rate x FLOPs / the matmul rate measured here in the step's dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ti_core and bench importable
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from bench.arch import ARCHES, save_pipeline  # noqa: E402
from bench.reference_diffusers_ti import DiffusersTextualInversion, Levers  # noqa: E402
from ti_core.data import Batch  # noqa: E402

DEFAULT_RESOLUTION = {"tiny": 64, "tiny-sdxl": 64, "small": 128, "sd15": 512, "sdxl": 1024}
INIT_WORD = "toy"  # one CLIP token, as the example requires of --initializer_token
LEARNING_RATE = 5e-3
COMPILED = "ours --compile"


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import diffusers
    import transformers

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _rss() -> int:
    """This process's resident set size in bytes (Linux /proc; elsewhere the high-water mark)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    """VmHWM in bytes, or None where /proc/self/status has none."""
    with contextlib.suppress(OSError):
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    return None


class MemoryProbe:
    """Memory of one turn: CUDA allocator peak minus the allocation at the start, or the CPU RSS peak.

    On the CPU the peak is the kernel's high-water mark, reset when the turn begins, so nothing runs beside the
    training thread. A sampling thread is only the fallback (a 50 ms period): sampling every 5 ms made our
    trainer's steps 30 % slower and the reference's 13 % (it wakes the GIL-holding training thread), which
    distorted the very rates it ran beside.
    """

    SAMPLE_PERIOD = 0.05

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak = self.start = self.end = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False

    def __enter__(self) -> MemoryProbe:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss()
            self._hwm = _reset_peak_rss() and _peak_rss() is not None
            if not self._hwm:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.SAMPLE_PERIOD):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak, self.end = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.end = _rss()
        self.peak = max(self.peak, self.end, (_peak_rss() or 0) if self._hwm else 0)

    @property
    def working_set(self) -> int:
        return self.peak - self.start


@dataclass
class Turn:
    """One timed turn of one trainer."""

    rate: float  # steps/s over the timed steps (wall clock)
    cpu_rate: float  # steps per CPU-second of the training thread (CPU only: immune to other load)
    working_set: int  # bytes: peak during the turn minus at its start
    after: int  # bytes: allocated (CUDA) or RSS (CPU) after the turn


@dataclass
class Row:
    trainer: str
    batch: int
    turns: list[Turn] = field(default_factory=list)
    flops_per_step: float | None = None
    weights: int | None = None  # bytes of the trainer's model on the device
    first_turn_seconds: float = 0.0  # the untimed first turn (with --compile: where the compiling happens)

    @property
    def rate(self) -> float:
        return statistics.median(turn.rate for turn in self.turns)

    @property
    def cpu_rate(self) -> float:
        return statistics.median(turn.cpu_rate for turn in self.turns)

    @property
    def spread(self) -> float:
        """(max - min) / median of the turns' rates: how noisy this row is."""
        rates = [turn.rate for turn in self.turns]
        return (max(rates) - min(rates)) / self.rate if rates else float("nan")

    @property
    def working_set(self) -> int:
        return max(turn.working_set for turn in self.turns)

    @property
    def after(self) -> int:
        return self.turns[-1].after


def _stamp() -> tuple[float, float]:
    """(wall clock, CPU time of this thread): with one torch thread every CPU op of a step runs on the
    calling thread (CPU autograd too), so the second is the step's compute, however loaded the machine."""
    return time.perf_counter(), time.thread_time()


def _window_rate(times: list[tuple[float, float]], warmup: int, clock: int = 0) -> float:
    """Steps/s over the steps after the first `warmup` (at least 1); times[i] is when step i+1 ended,
    `clock` 0 for wall time, 1 for thread CPU time."""
    start = max(warmup, 1)
    return (len(times) - start) / (times[-1][clock] - times[start - 1][clock])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, began = 0, time.perf_counter()
    while time.perf_counter() - began < (2.0 if device.type == "cuda" else 1.0):
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - began)


def weights_bytes(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for tensor in itertools_chain(module.parameters(), module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def itertools_chain(*iterables):
    for iterable in iterables:
        yield from iterable


# ----------------------------------------------------------------------------------------------------------------
# The two trainers


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` deterministic photo-like JPEGs (smooth colour fields with texture), `size` px square."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        coarse = torch.rand(3, 6, 6, generator=generator)
        field_ = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bicubic", align_corners=False)[
            0
        ]
        texture = 0.08 * torch.randn(3, size, size, generator=generator)
        pixels = ((field_ + texture).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{index:03d}-a toy.jpg", quality=95)
    return folder


class Ours:
    """Our trainer, one `train()` call per turn (a fresh run: new vectors, optimizer; warm latent cache)."""

    label = "ours"

    def __init__(
        self,
        folder: Path,
        images: Path,
        work: Path,
        args,
        batch: int,
        *,
        mixed_precision=None,
        name="bench-ours",
        compile: bool = False,
    ):
        from ti_core.models import load_model

        self.device = torch.device(args.device)
        self.args, self.images, self.work, self.batch, self.name = args, images, work, batch, name
        self.mixed_precision = mixed_precision or args.mixed_precision
        self.compile = compile  # TrainConfig.compile, the users' `--compile`
        if compile:
            self.label = COMPILED
        self.model = load_model(folder)
        _to_device(self.model, self.device)

    def config(self, steps: int, log_dir: Path | None = None):
        from ti_core.config import TrainConfig
        from ti_core.data import DataConfig

        data = DataConfig(
            images=self.images,
            resolution=self.args.resolution,
            template="subject",
            flip=True,  # the example flips with p=0.5; ours caches both latents
            repeats=100,  # the example's default
            latent_sampling="random",  # a fresh draw from the stored distribution each step, as the example
        )
        return TrainConfig(
            name=self.name,
            embeddings_dir=self.work / "embeddings",
            log_dir=log_dir or self.work / "logs",
            data=data,
            init_text=INIT_WORD,
            vectors=1,
            overwrite=True,
            steps=steps,
            learning_rate=str(LEARNING_RATE),
            batch_size=self.batch,
            mixed_precision=self.mixed_precision,
            gradient_checkpointing=self.args.gradient_checkpointing,
            save_every=0,
            preview_every=0,
            preview_steps=1,  # the end-of-run card image: outside the timed window, kept short
            save_optimizer_state=False,
            compile=self.compile,
        )

    def run(self, steps: int, *, log_dir: Path | None = None, on_step=None) -> list[float]:
        """Train `steps` steps; returns when each step ended (perf_counter)."""
        from ti_core.train import train

        times: list[tuple[float, float]] = []

        def callback(event) -> None:
            if event.kind == "step":
                _sync(self.device)
                times.append(_stamp())
                if on_step is not None:
                    on_step(event.step)

        result = train(self.model, self.config(steps, log_dir), callback)
        if result.stopped != "done":
            raise RuntimeError(f"our trainer stopped: {result.message}")
        return times

    def weights(self) -> int:
        return weights_bytes(self.model.unet, self.model.vae, *(e.model for e in self.model.encoders))


class Reference:
    """The example's algorithm: one object, stepped `steps` times per turn."""

    def __init__(
        self, folder: Path, images: Path, args, batch: int, *, levers=None, mixed_precision=None, label="reference"
    ):
        self.device = torch.device(args.device)
        self.label = label
        self.trainer = DiffusersTextualInversion(
            folder,
            images,
            resolution=args.resolution,
            train_batch_size=batch,
            initializer_token=INIT_WORD,
            learning_rate=LEARNING_RATE,
            mixed_precision=mixed_precision or args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            device=self.device,
            levers=levers or Levers(),
        )

    def run(self, steps: int, **_) -> list[float]:
        times = []
        for _ in range(steps):
            self.trainer.step()  # ends on loss.item(), a device sync
            times.append(_stamp())
        return times

    def weights(self) -> int:
        t = self.trainer
        return weights_bytes(t.unet, t.vae, *t.encoders)


def fixed_step_inputs(model, name: str, batch_size: int, resolution: int, device) -> tuple[dict, dict, Batch]:
    """One fixed batch to time or measure a step on: `name`'s start vectors (float32 parameters, as train()
    makes them), the tokens of "a photo of a <name>", random latents and SDXL's time ids."""
    from ti_core.create import create_embedding
    from ti_core.prompt import PromptTokenCache

    start = create_embedding(model, name, INIT_WORD, 1)
    vectors = {key: torch.nn.Parameter(v.to(device, torch.float32)) for key, v in start.vectors.items()}
    tokens = PromptTokenCache(model, {name: 1})([f"a photo of a {name}"] * batch_size)
    side, size = resolution // 8, [resolution] * 2
    batch = Batch(
        latents=torch.randn(batch_size, 4, side, side, generator=torch.Generator().manual_seed(0)),
        captions=[""] * batch_size,
        weights=None,
        time_ids=torch.tensor([size + [0, 0] + size] * batch_size, dtype=torch.float32),
        indices=list(range(batch_size)),
    )
    return vectors, tokens, batch


def forward_backward(model, scheduler, inputs: tuple[dict, dict, Batch], config, device, half, seed: int) -> None:
    """Our step's loss, forward and backward, on `fixed_step_inputs`; ends on the device sync every trainer's
    step ends on (`loss.item()`)."""
    from ti_core import train as ti_train

    vectors, tokens, batch = inputs
    generator = torch.Generator(device=device).manual_seed(seed)
    with ti_train.autocast(device, half):
        loss = ti_train.batch_loss(model, scheduler, vectors, batch, tokens, generator, config)
    loss.backward()
    loss.item()
    for tensor in vectors.values():
        tensor.grad = None


class ForwardBackwardOnly:
    """The floor under any trainer of this model: our step's text-encoder and UNet forward and backward alone,
    on one fixed batch (latents already encoded, one prompt), with no optimizer, data pipeline or logging. Every
    textual-inversion trainer must do this much work per step, so reference rate / this rate is the most any
    eager-mode training loop around the same kernels can reach, and ours / this rate is how close ours comes."""

    label = "forward+backward only"

    def __init__(self, ours: Ours) -> None:
        self.ours, self.device = ours, ours.device
        name = ours.config(1).name
        self.inputs = fixed_step_inputs(ours.model, name, ours.batch, ours.args.resolution, self.device)

    def run(self, steps: int, **_) -> list[tuple[float, float]]:
        from ti_core import train as ti_train

        model, config = self.ours.model, self.ours.config(steps)
        times = []
        with ti_train.training_mode(model, config) as (device, half):
            scheduler = ti_train.noise_scheduler_for(model, config)
            for step in range(steps):
                forward_backward(model, scheduler, self.inputs, config, device, half, seed=step)
                times.append(_stamp())
        return times

    def weights(self) -> int:
        return self.ours.weights()


def _to_device(model, device: torch.device) -> None:
    for module in [model.unet, model.vae, *(encoder.model for encoder in model.encoders)]:
        module.to(device)


def step_flops(trainer) -> float:
    """FLOPs of one training step (matmul, conv, attention), counted on a step after the first."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if isinstance(trainer, Reference):
        trainer.trainer.step()
        with counter:
            trainer.trainer.step()
        return float(counter.get_total_flops())
    if isinstance(trainer, ForwardBackwardOnly):
        trainer.run(1)
        with counter:
            trainer.run(1)
        return float(counter.get_total_flops())

    # Ours: the counter is entered at the end of step 1 and left at the end of step 2, from the callback.
    def on_step(step: int) -> None:
        if step == 1:
            counter.__enter__()
        elif step == 2:
            counter.__exit__(None, None, None)

    trainer.run(2, on_step=on_step)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def from_nothing(make, steps: int, **run) -> dict:
    """Build a trainer with `make()` (its model loaded from disk) and run `steps` steps: seconds from the start to
    the end of the first and of the last step."""
    began = time.perf_counter()
    times = make().run(steps, **run)
    return {"seconds": times[-1][0] - began, "first_step_seconds": times[0][0] - began}


def time_to_first_step(folder: Path, images: Path, work: Path, args, batch: int) -> dict:
    """Seconds from loading the model off disk to the end of the first training step. Ours with a cold
    latent cache (a fresh run folder) and a warm one; the reference encodes nothing up front. Small models:
    the median of two process-warm passes after one that pays one-off import and kernel-selection costs."""
    device = torch.device(args.device)

    def ours(log_dir: Path) -> float:
        make = lambda: Ours(folder, images, work, args, batch, name="bench-ttfs")  # noqa: E731
        return from_nothing(make, 1, log_dir=log_dir)["first_step_seconds"]

    def reference() -> float:
        return from_nothing(lambda: Reference(folder, images, args, batch), 1)["first_step_seconds"]

    big = args.arch in ("sd15", "sdxl")  # one pass: each costs minutes
    results: dict[str, list[float]] = {"ours (cold latent cache)": [], "ours (warm latent cache)": [], "reference": []}
    for attempt in range(1 if big else 3):
        log_dir = work / f"ttfs-{attempt}"
        cold, ref, warm = ours(log_dir), reference(), ours(log_dir)
        if attempt or big:
            results["ours (cold latent cache)"].append(cold)
            results["ours (warm latent cache)"].append(warm)
            results["reference"].append(ref)
        shutil.rmtree(log_dir, ignore_errors=True)
        if device.type == "cuda":
            gc.collect()  # the reference's data iterator holds a reference cycle
            torch.cuda.empty_cache()
    return {key: statistics.median(values) for key, values in results.items()}


def alternate(trainers: list, args, batch: int) -> list[Row]:
    """Run the trainers in turns, `args.repeats` rounds; one Row per trainer."""
    rows = [Row(trainer.label, batch) for trainer in trainers]
    device = torch.device(args.device)
    for trainer, row in zip(trainers, rows, strict=True):  # one untimed turn each: kernel selection, caches
        began = time.perf_counter()
        trainer.run(max(args.warmup, 1))
        row.first_turn_seconds = time.perf_counter() - began
        row.weights = trainer.weights()  # after the turn: our train() casts the frozen weights on a GPU
    for _round in range(args.repeats):
        for trainer, row in zip(trainers, rows, strict=True):
            with MemoryProbe(device) as probe:
                times = trainer.run(args.warmup + args.steps)
            turn = Turn(
                _window_rate(times, args.warmup), _window_rate(times, args.warmup, 1), probe.working_set, probe.end
            )
            row.turns.append(turn)
            if args.verbose:
                print(
                    f"  {row.trainer:<28} batch {batch}: {turn.rate:7.3f} steps/s, {turn.cpu_rate:7.3f} steps/CPU-s",
                    flush=True,
                )
    return rows


def soak(ours: Ours, steps: int, device: torch.device) -> dict:
    """Our trainer for `steps` steps: memory every `steps/20` steps (flat = no leak)."""
    every = max(1, steps // 20)
    samples: list[tuple[int, int]] = []

    def on_step(step: int) -> None:
        if step % every == 0 or step == 1:
            samples.append((step, torch.cuda.memory_allocated() if device.type == "cuda" else _rss()))

    began = time.perf_counter()
    times = ours.run(steps, on_step=on_step)
    first = next(value for step, value in samples if step >= every)  # after warm-up
    last = samples[-1][1]
    return {
        "steps": steps,
        "seconds": time.perf_counter() - began,
        "steps_per_second": _window_rate(times, 1),
        "samples": samples,
        "growth_bytes": last - first,
        "flat": abs(last - first) <= max(16 << 20, 0.01 * first),
    }


def whole_run(folder: Path, images: Path, work: Path, args, batch: int, steps: int) -> dict:
    """Seconds from nothing loaded to the end of step `steps`, as a user's run takes them: the model loaded from
    disk, our latent encoding (a fresh run folder: cold latent cache) or the reference's set-up, and with
    `--compile` the compiling, once with an empty inductor cache (a user's first compiled run) and once with the
    cache it left on disk (every later run; dynamo's in-process cache is reset in between, as a new process has
    none). Measured before anything else in the process compiles."""

    def ours(label: str, compile: bool) -> dict:
        make = lambda: Ours(folder, images, work, args, batch, name="bench-whole", compile=compile)  # noqa: E731
        return from_nothing(make, steps, log_dir=work / f"whole-{label}")

    results = {"reference": from_nothing(lambda: Reference(folder, images, args, batch), steps)}
    results["ours"] = ours("ours", False)
    if args.compile:
        torch._dynamo.reset()
        results["ours --compile, empty compile cache"] = ours("cold", True)
        torch._dynamo.reset()
        results["ours --compile, compile cache on disk"] = ours("warm", True)
    gc.collect()
    return results


def ablation_variants(folder: Path, images: Path, work: Path, args, batch: int) -> list:
    """The reference with one lever at a time, the levers that make up our algorithm, and ours."""

    def ref(label: str, **kwargs):
        mixed = kwargs.pop("mixed_precision", None)
        return Reference(folder, images, args, batch, levers=Levers(**kwargs), mixed_precision=mixed, label=label)

    variants = [
        ref("reference (script)"),
        ref("ref + cached latents", cache_latents=True),
        ref("ref + new rows only", new_rows_only=True),
        ref("ref + cached + new rows", cache_latents=True, new_rows_only=True),
        ref("ref + fused AdamW", fused_adamw=True),
        ref("ref + channels_last", channels_last=True),
        ref("ref - SDPA (classic attn)", classic_attention=True),
        ref("ref - frozen UNet (wgrads)", unet_weight_grads=True),
    ]
    bf16_ok = args.device == "cuda" or _cpu_has_bf16()
    if bf16_ok and args.mixed_precision == "no":
        variants.append(ref("ref + bf16 weights", mixed_precision="bf16"))
    if args.compile:
        variants.append(ref("ref + torch.compile UNet", compile_unet=True))
    variants.append(_ours(folder, images, work, args, batch))
    if bf16_ok and args.mixed_precision == "no":
        variants.append(_ours(folder, images, work, args, batch, mixed_precision="bf16", label="ours bf16"))
    # Proposed changes to ti_core, applied from outside (train() keeps a module's memory format / wrapper):
    variants.append(_ours(folder, images, work, args, batch, label="ours + channels_last UNet", channels_last=True))
    if args.compile:
        variants.append(_ours(folder, images, work, args, batch, label="ours + torch.compile UNet", compile_unet=True))
    return variants


def _ours(
    folder, images, work, args, batch, mixed_precision=None, label="ours", channels_last=False, compile_unet=False,
):  # fmt: skip
    trainer = Ours(
        folder,
        images,
        work,
        args,
        batch,
        mixed_precision=mixed_precision,
        name="bench-" + re.sub(r"[^a-z0-9]+", "-", label),
    )
    trainer.label = label
    if channels_last:
        trainer.model.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        # An OptimizedModule passes attribute access through, so train() can still configure the UNet.
        trainer.model.unet = torch.compile(trainer.model.unet)
    return trainer


def _cpu_has_bf16() -> bool:
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    return False


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def print_table(rows: list[Row], args, peak_flops: float | None) -> None:
    cuda = args.device == "cuda"
    mem = "peak alloc. = weights + working set" if cuda else "RSS: +peak in turn / after"
    cpu_column = "" if cuda else f" {'steps/CPU-s':>11}"
    print(
        f"\n{'trainer':<28} {'batch':>5} {'steps/s':>8}{cpu_column} {'samples/s':>10} {'ms/step':>8}"
        f" {'spread':>6}  {mem}"
    )
    for row in rows:
        if cuda:
            memory = f"{_mib(row.weights + row.working_set)} = {_mib(row.weights)} + {_mib(row.working_set)}"
        else:
            memory = f"+{_mib(row.working_set)} / {_mib(row.after)}"
        mfu = ""
        if row.flops_per_step and peak_flops:
            mfu = f"  {row.flops_per_step / 1e9:,.1f} GFLOP/step, MFU {row.rate * row.flops_per_step / peak_flops:.1%}"
        cpu = "" if cuda else f" {row.cpu_rate:>11.3f}"
        print(
            f"{row.trainer:<28} {row.batch:>5} {row.rate:>8.3f}{cpu} {row.rate * row.batch:>10.3f}"
            f" {1000 / row.rate:>8.1f} {row.spread:>6.0%}  {memory}{mfu}"
        )


def _ratio_line(row: Row, ref_row: Row, args, note: str = "") -> dict:
    """Print and return `row` / reference: the ratio of the medians, and the median of the per-turn ratios."""
    pairs = list(zip(row.turns, ref_row.turns, strict=True))
    ratios = {"wall": row.rate / ref_row.rate, "wall_paired": statistics.median(a.rate / b.rate for a, b in pairs)}
    line = f"ratio {row.trainer} / reference, batch {row.batch}: {ratios['wall']:.2f}x steps/s"
    line += f" (median of per-turn ratios {ratios['wall_paired']:.2f}x)"
    if args.device == "cpu":
        ratios["cpu"] = row.cpu_rate / ref_row.cpu_rate
        ratios["cpu_paired"] = statistics.median(a.cpu_rate / b.cpu_rate for a, b in pairs)
        line += f"; {ratios['cpu']:.2f}x steps/CPU-s (paired {ratios['cpu_paired']:.2f}x)"
    print(line + note)
    return ratios


def print_ratios(rows: list[Row], ours_row: Row, ref_row: Row, args) -> dict:
    """ours / reference: ratio of the medians, and the median of the per-turn (paired) ratios."""
    ratios = _ratio_line(ours_row, ref_row, args)
    compiled = next((row for row in rows if row.trainer == COMPILED), None)
    if compiled is not None:
        note = ""
        if not args.whole_run:  # after the whole run this process has compiled already: see there
            eager_first = ours_row.first_turn_seconds
            note = f"; first turn {compiled.first_turn_seconds:.0f} s (eager {eager_first:.1f} s): the compiling"
        ratios |= {f"compiled_{key}": value for key, value in _ratio_line(compiled, ref_row, args, note).items()}
    if args.ablate:
        for row in rows:
            if row is not ref_row:
                extra = "" if args.device == "cuda" else f", {row.cpu_rate / ref_row.cpu_rate:5.2f}x per CPU-s"
                print(f"  {row.trainer:<28} {row.rate / ref_row.rate:5.2f}x the script's steps/s{extra}")
    return ratios


def print_floor(floor_row: Row, ours_row: Row, ref_row: Row, args) -> dict:
    """How far the model's own forward and backward leave room: the ceiling of ours / reference in eager mode."""
    rate = (lambda row: row.cpu_rate) if args.device == "cpu" else (lambda row: row.rate)
    unit = "steps/CPU-s" if args.device == "cpu" else "steps/s"
    floor = {"ceiling": rate(floor_row) / rate(ref_row), "ours_of_floor": rate(ours_row) / rate(floor_row)}
    print(
        f"forward+backward alone: {rate(floor_row):.3f} {unit}, so no eager loop around these kernels can exceed"
        f" {floor['ceiling']:.2f}x the reference; ours runs at {floor['ours_of_floor']:.0%} of that rate"
    )
    return floor


def _quiet() -> None:
    """No progress bars or deprecation chatter from the libraries in the benchmark's output."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default=None, choices=ARCHES, help="default: small on CPU, sd15 on CUDA")
    parser.add_argument(
        "--resolution", type=int, default=None, help="default: per arch (small 128, sd15 512, sdxl 1024)"
    )
    parser.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,4,8")
    parser.add_argument(
        "--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="default: no on CPU, bf16 on CUDA"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per turn")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each turn")
    parser.add_argument("--repeats", type=int, default=5, help="turns per trainer (alternating)")
    parser.add_argument("--images", type=int, default=8, help="training images")
    parser.add_argument("--ablate", action="store_true", help="the reference with one speed lever at a time")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also ours with `compile` on (the users' --compile; its first turn's compiling reported apart);"
        " with --ablate: the reference and ours with torch.compile of the UNet",
    )
    parser.add_argument(
        "--whole-run",
        type=int,
        default=0,
        metavar="STEPS",
        help="also the whole run of STEPS steps (load + caching + compiling + steps) for each trainer",
    )
    parser.add_argument(
        "--variants", help="with --ablate: only these variants (comma-separated labels; the script is always run)"
    )
    parser.add_argument(
        "--soak", type=int, default=0, metavar="STEPS", help="also run ours for STEPS steps, memory every STEPS/20"
    )
    parser.add_argument("--no-ttfs", action="store_true", help="skip time-to-first-step")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count and MFU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="keep the model, images and runs here (default: a temp folder)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (0: torch's default). Default 1: on a shared machine, OpenMP's spinning"
        " thread barriers make multi-threaded steps erratic (20x slower under 3x oversubscription)",
    )
    parser.add_argument("--verbose", action="store_true", help="print every turn")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    args.arch = args.arch or ("sd15" if cuda else "small")
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.arch]
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    batches = [int(b) for b in args.batch_sizes.split(",")]

    info = machine()
    print("machine:", ", ".join(f"{key} {value}" for key, value in info.items()))
    print(
        f"setup: arch {args.arch}, {args.resolution} px, batch {batches}, {args.mixed_precision} mixed precision,"
        f" gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.images} images;"
        f" {args.repeats} turns x ({args.warmup} warm-up + {args.steps} timed steps) per trainer, alternating",
        flush=True,
    )
    report: dict = {"machine": info, "settings": {k: str(v) for k, v in vars(args).items()}}
    temp = None if args.workdir else tempfile.TemporaryDirectory(prefix="ti-bench-")
    work = args.workdir or Path(temp.name)
    try:
        began = time.perf_counter()
        folder = work / f"model-{args.arch}"
        if not (folder / "model_index.json").is_file():
            save_pipeline(args.arch, folder)
        size = args.resolution * 3 // 2  # larger than the training size, as photos are: both resize
        images = make_images(work / f"images-{args.images}x{size}", args.images, size)
        print(f"model and images ready in {time.perf_counter() - began:.1f} s", flush=True)

        if args.whole_run:
            if args.compile:  # the first compiled run starts from an empty inductor cache, as a user's does
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-cache-{time.time_ns()}")
            whole = whole_run(folder, images, work, args, batches[0], args.whole_run)
            report["whole_run"] = whole
            print(f"\nwhole run of {args.whole_run} steps, batch {batches[0]} (load + set-up + compiling + steps):")
            for key, value in whole.items():
                ratio = whole["reference"]["seconds"] / value["seconds"]
                print(
                    f"  {key:<40} {value['seconds']:8.1f} s ({ratio:.2f}x the reference's speed;"
                    f" first step at {value['first_step_seconds']:.1f} s)",
                    flush=True,
                )

        if not args.no_ttfs:
            ttfs = time_to_first_step(folder, images, work, args, batches[0])
            report["time_to_first_step"] = ttfs
            print("\ntime to first step (load from disk + setup + step 1):")
            for key, seconds in ttfs.items():
                print(f"  {key:<28} {seconds:7.2f} s")

        peak = None
        if not args.no_flops:
            dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
            peak = matmul_rate(torch.device(args.device), dtype)
            report["matmul_flops_per_second"] = peak
            print(f"\nmeasured {dtype} matmul rate: {peak / 1e12:.2f} TFLOP/s", flush=True)

        all_rows: list[Row] = []
        for batch in batches:
            if args.ablate:
                trainers = ablation_variants(folder, images, work, args, batch)
                if args.variants:
                    keep = {label.strip() for label in args.variants.split(",")}
                    trainers = [t for t in trainers if t is trainers[0] or t.label in keep]
            else:
                ours = Ours(folder, images, work, args, batch)
                trainers = [ours, Reference(folder, images, args, batch), ForwardBackwardOnly(ours)]
                if args.compile:
                    # Each batch size compiles as a run of its own would: after a batch-size change dynamo would
                    # recompile with symbolic shapes, which no single run does.
                    torch._dynamo.reset()
                    trainers.append(Ours(folder, images, work, args, batch, name="bench-compiled", compile=True))
            rows = alternate(trainers, args, batch)
            if not args.no_flops:
                for trainer, row in zip(trainers, rows, strict=True):
                    row.flops_per_step = step_flops(trainer)
            print_table(rows, args, peak)
            ours_row = next(row for row in rows if row.trainer == "ours")
            ref_row = rows[0] if args.ablate else rows[1]
            report.setdefault("ratios", {})[str(batch)] = print_ratios(rows, ours_row, ref_row, args)
            floor_row = next((row for row in rows if row.trainer == ForwardBackwardOnly.label), None)
            if floor_row is not None:
                report["ratios"][str(batch)]["floor"] = print_floor(floor_row, ours_row, ref_row, args)
            all_rows.extend(rows)
            del trainers
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        report["rows"] = [
            {**{k: v for k, v in asdict(row).items() if k != "turns"}, "steps_per_second": row.rate, "steps_per_cpu_second": row.cpu_rate,
             "samples_per_second": row.rate * row.batch, "spread": row.spread, "working_set_bytes": row.working_set,
             "after_bytes": row.after, "turn_rates": [turn.rate for turn in row.turns],
             "turn_cpu_rates": [turn.cpu_rate for turn in row.turns]}
            for row in all_rows
        ]  # fmt: skip

        if args.soak:
            trainer = Ours(folder, images, work, args, batches[0])
            result = soak(trainer, args.soak, torch.device(args.device))
            report["soak"] = result
            what = "CUDA allocated" if cuda else "RSS"
            print(
                f"\nsoak: {args.soak} steps in {result['seconds']:.0f} s ({result['steps_per_second']:.2f} steps/s);"
                f" {what} {_mib(result['samples'][0][1])} at step {result['samples'][0][0]},"
                f" {_mib(result['samples'][-1][1])} at step {result['samples'][-1][0]}:"
                f" {'flat' if result['flat'] else 'GROWING'} ({result['growth_bytes'] / 2**20:+.1f} MiB)"
            )
        print(f"\ntotal {time.perf_counter() - began:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    finally:
        if temp is not None:
            temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
