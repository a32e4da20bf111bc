"""Memory of one training step of the real SD1.5 / SDXL architectures, measured on the CPU.

    python bench/memory_cpu.py --arch sd15 --resolution 512
    python bench/memory_cpu.py --arch sdxl --resolution 1024 --gradient-checkpointing

Builds the model with random weights (seed 0, bench/arch.py), freezes it as `ti_core.train` does on a GPU
(UNet and text encoders cast to bf16, VAE kept, vectors float32; the one CPU/GPU difference,
`_casts_frozen_weights`, is switched on), and runs our step's forward and backward on one batch. It reports the
frozen weights and the step's working set: the peak RSS during the step (the kernel's high-water mark, reset
before it) minus the RSS before it. The activations a step keeps are the same tensors on any device, so this
predicts the GPU's peak allocation before a GPU is at hand; a GPU adds its CUDA context and kernel workspaces.
Needs about 14 GB of RAM for SDXL (it is built in float32, then cast) and a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from bench.arch import build_pipeline  # noqa: E402
from bench.bench_train import (  # noqa: E402
    _peak_rss,
    _reset_peak_rss,
    _rss,
    fixed_step_inputs,
    forward_backward,
)

MMAP_THRESHOLD = "131072"


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15", choices=["small", "sd15", "sdxl"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=2, help="the first step's working set is the one reported")
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("needs Linux (/proc/self/clear_refs) to reset the peak RSS")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        # glibc keeps freed blocks of up to 32 MB in its heap (a threshold that rises as big blocks are freed),
        # so the RSS would count the model's construction garbage and hide what a step allocates. A fixed
        # threshold sends every large tensor to mmap, returned to the system when freed: the RSS is then the
        # live memory, as a GPU allocator's "allocated" is. It must be set before the process starts.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env)

    import ti_core.train as ti_train
    import ti_core.train.patching
    from ti_core.config import TrainConfig
    from ti_core.data import DataConfig
    from ti_core.models import from_pipeline

    began = time.perf_counter()
    model = from_pipeline(build_pipeline(args.arch), f"random {args.arch}")
    print(f"{args.arch} built in {time.perf_counter() - began:.0f} s", flush=True)
    config = TrainConfig(
        name="bench-memory",
        embeddings_dir=Path("unused"),
        log_dir=Path("unused"),
        data=DataConfig(images=Path("unused"), resolution=args.resolution),
        vectors=1,
        steps=args.steps,
        batch_size=args.batch_size,
        mixed_precision="bf16",
        gradient_checkpointing=args.gradient_checkpointing,
    )
    ti_core.train.patching.casts_frozen_weights = lambda device: True  # the GPU's bf16 frozen weights
    with ti_train.training_mode(model, config) as (device, half):
        inputs = fixed_step_inputs(model, config.name, args.batch_size, args.resolution, device)
        scheduler = ti_train.noise_scheduler_for(model, config)
        frozen = sum(
            p.numel() * p.element_size()
            for m in [model.unet, *(e.model for e in model.encoders)]
            for p in m.parameters()
        )
        vae = sum(p.numel() * p.element_size() for p in model.vae.parameters())
        for step in range(args.steps):
            before = _rss()
            _reset_peak_rss()
            began = time.perf_counter()
            forward_backward(model, scheduler, inputs, config, device, half, seed=step)
            print(
                f"step {step + 1}: {time.perf_counter() - began:.0f} s; frozen UNet + text encoders "
                f"({model.unet.dtype}) {_gib(frozen)}, VAE {_gib(vae)}; working set +{_gib(_peak_rss() - before)}"
                f" (RSS {_gib(before)} before, peak {_gib(_peak_rss())})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
