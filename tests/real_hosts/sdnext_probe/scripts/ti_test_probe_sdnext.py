"""A test-only SD.Next extension: what the real-host tests need to see inside SD.Next's process.

Installed into the kit's `extensions/` by tests/real_hosts only; never shipped.

- GET /ti-test/v1/state: whether a model is loaded, its class, this process's id and memory (VmRSS, VmHWM).
- POST /ti-test/v1/reset-peak: start VmHWM again from the current RSS (/proc/self/clear_refs), so the peak of
  one run can be read after it.
- GET /ti-test/v1/weights-digest: sha256 over the loaded pipeline's UNet, VAE and text encoders (every
  tensor's name, dtype, shape and bytes, in name order), taken under SD.Next's queue lock. The token tables
  are hashed over the CLIP vocabulary's rows only: SD.Next itself appends a row per embedding it loads (and
  rebuilds the table to do so), which is its own doing, not a write of the trainer's.
"""

import hashlib
import os
import re
import time

import torch
from modules import call_queue, script_callbacks
from modules.modeldata import model_data

BASE_VOCABULARY = 49408
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _memory() -> dict:
    with open("/proc/self/status", encoding="ascii") as status:
        text = status.read()
    return {
        key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024 for key in ("VmRSS", "VmHWM")
    }


def state() -> dict:
    model = model_data.sd_model
    return {
        "pid": os.getpid(),
        "model_loaded": model is not None,
        "model_class": type(model).__name__ if model is not None else None,
        "model_id": id(model) if model is not None else None,
        **_memory(),
    }


def reset_peak() -> dict:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    return state()


def weights_digest() -> dict:
    started = time.monotonic()
    with call_queue.queue_lock:
        model = model_data.sd_model
        if model is None:
            return {"error": "no model loaded", **state()}
        digest = hashlib.sha256()
        total = count = 0
        for part in PARTS:
            module = getattr(model, part, None)
            if module is None:
                continue
            for name, tensor in sorted(module.state_dict().items()):
                if name.endswith("token_embedding.weight"):
                    tensor = tensor[:BASE_VOCABULARY]
                tensor = tensor.detach().to("cpu").contiguous()
                digest.update(f"{part}.{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                digest.update(raw)
                total += raw.nbytes
                count += 1
    return {
        "sha256": digest.hexdigest(),
        "tensors": count,
        "bytes": total,
        "seconds": round(time.monotonic() - started, 2),
        **state(),
    }


def on_app_started(_demo, app):
    app.add_api_route("/ti-test/v1/state", state, methods=["GET"])
    app.add_api_route("/ti-test/v1/reset-peak", reset_peak, methods=["POST"])
    app.add_api_route("/ti-test/v1/weights-digest", weights_digest, methods=["GET"])


script_callbacks.on_app_started(on_app_started)
