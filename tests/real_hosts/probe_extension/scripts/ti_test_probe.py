"""A test-only AUTOMATIC1111 and Forge extension: what the real-host tests need to see inside the web UI's process.

Installed into the kit's `extensions/` by tests/real_hosts only; never shipped.

- GET /ti-test/v1/state: whether a model is loaded, its checkpoint, this process's id and memory.
- GET /ti-test/v1/weights-digest: sha256 over the loaded model's `state_dict()` (every tensor's name, dtype,
  shape and bytes, in name order), so a test can tell whether a training run left the web UI's model
  bitwise as it was. Taken under the web UI's queue lock: no generation or training changes it meanwhile.
"""

import hashlib
import os
import re
import time

import torch
from modules import call_queue, script_callbacks, sd_models


def _memory() -> dict:
    """VmRSS and VmHWM of this process, in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        text = status.read()
    return {
        key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024 for key in ("VmRSS", "VmHWM")
    }


def _loaded_model():
    return sd_models.model_data.sd_model  # never loads one (shared.sd_model would)


def state() -> dict:
    model = _loaded_model()
    info = getattr(model, "sd_checkpoint_info", None)
    return {
        "pid": os.getpid(),
        "model_loaded": model is not None,
        "checkpoint": getattr(info, "title", None),
        "filename": getattr(info, "filename", None),
        **_memory(),
    }


def _weights(model) -> dict:
    """The model's tensors by name: A1111's LatentDiffusion is one module; Forge's engine holds its parts
    (UNet, VAE, text encoders) in `forge_objects`."""
    objects = getattr(model, "forge_objects", None)
    if objects is None:
        return model.state_dict()
    weights = {}
    parts = {
        "unet.": objects.unet.model.diffusion_model,
        "vae.": objects.vae.first_stage_model,
        "clip.": objects.clip.cond_stage_model,
    }
    for prefix, module in parts.items():
        weights.update({prefix + name: tensor for name, tensor in module.state_dict().items()})
    return weights


def weights_digest() -> dict:
    started = time.monotonic()
    # Forge's tensors are made under inference_mode: read them under it.
    with call_queue.queue_lock, torch.inference_mode():
        model = _loaded_model()
        if model is None:
            return {"error": "no model loaded", **state()}
        digest = hashlib.sha256()
        weights = _weights(model)
        total = 0
        for name in sorted(weights):
            tensor = weights[name].detach().to("cpu").contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            raw = tensor.reshape(-1).view(torch.uint8).numpy()  # the tensor's bytes, whatever its dtype
            digest.update(raw)
            total += raw.nbytes
    return {
        "sha256": digest.hexdigest(),
        "tensors": len(weights),
        "bytes": total,
        "seconds": round(time.monotonic() - started, 2),
        **state(),
    }


def on_app_started(_demo, app):
    app.add_api_route("/ti-test/v1/state", state, methods=["GET"])
    app.add_api_route("/ti-test/v1/weights-digest", weights_digest, methods=["GET"])


script_callbacks.on_app_started(on_app_started)
