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
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.arch import build_pipeline  # noqa: E402

MMAP_THRESHOLD = "131072"


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_since_reset() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


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
    from ti_core.config import TrainConfig
    from ti_core.create import create_embedding
    from ti_core.data import Batch, DataConfig
    from ti_core.models import from_pipeline
    from ti_core.prompt import PromptTokenCache

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
    ti_train._casts_frozen_weights = lambda device: True  # the GPU's bf16 frozen weights
    side, size = args.resolution // 8, [args.resolution] * 2
    batch = Batch(
        latents=torch.randn(args.batch_size, 4, side, side, generator=torch.Generator().manual_seed(0)),
        captions=[""] * args.batch_size,
        weights=None,
        time_ids=torch.tensor([size + [0, 0] + size] * args.batch_size, dtype=torch.float32),
        indices=list(range(args.batch_size)),
    )
    with ti_train._training_mode(model, config) as (device, half):
        start = create_embedding(model, config.name, "toy", 1)
        vectors = {key: torch.nn.Parameter(tensor.float()) for key, tensor in start.vectors.items()}
        tokens = PromptTokenCache(model, {config.name: 1})([f"a photo of a {config.name}"] * args.batch_size)
        scheduler = ti_train._noise_scheduler(model, config)
        frozen = sum(
            p.numel() * p.element_size()
            for m in [model.unet, *(e.model for e in model.encoders)]
            for p in m.parameters()
        )
        vae = sum(p.numel() * p.element_size() for p in model.vae.parameters())
        for step in range(args.steps):
            before = _rss()
            Path("/proc/self/clear_refs").write_text("5")
            began = time.perf_counter()
            with ti_train._autocast(device, half):
                loss = ti_train.batch_loss(
                    model, scheduler, vectors, batch, tokens, torch.Generator().manual_seed(step), config
                )
            loss.backward()
            loss.item()
            for tensor in vectors.values():
                tensor.grad = None
            print(
                f"step {step + 1}: {time.perf_counter() - began:.0f} s; frozen UNet + text encoders "
                f"({model.unet.dtype}) {_gib(frozen)}, VAE {_gib(vae)}; working set +{_gib(_peak_since_reset() - before)}"
                f" (RSS {_gib(before)} before, peak {_gib(_peak_since_reset())})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
