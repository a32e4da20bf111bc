"""Context managers around a training run inside a web UI; each puts back what it changed, on any exit.

Order matters and mirrors the web UI's own GPU jobs (`call_queue.wrap_gradio_gpu_call`): take the queue
lock first (so no generation runs while the web UI's model is away, and none is half-way through when
we take it away), then `shared.state.begin`, then free the model. Leaving undoes it in reverse.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator

from .host import MEMORY_MANAGERS, Host

log = logging.getLogger("ti_host")

JOB_NAME = "ti_train"
POLL_SECONDS = 0.25


@contextlib.contextmanager
def queue_slot(
    host: Host, cancelled: Callable[[], bool], waiting: Callable[[], None] = lambda: None
) -> Iterator[bool]:
    """Hold the web UI's GPU queue lock; yields False (without it) if the run is cancelled while waiting.

    Polls with a non-blocking acquire because Forge's FIFOLock has no timeout, and a run interrupted while
    the web UI finishes a long generation must not wait for it.
    """
    lock = getattr(host.module("modules.call_queue"), "queue_lock", None)
    if lock is None:
        yield True
        return
    told = False
    while not lock.acquire(False):
        if cancelled():
            yield False
            return
        if not told:
            waiting()
            told = True
        time.sleep(POLL_SECONDS)
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def host_job(host: Host, title: str = JOB_NAME) -> Iterator[None]:
    """`shared.state.begin(...)` ... `end()`, so the web UI shows a job and its Interrupt button applies."""
    begin = getattr(host.state, "begin", None)
    if callable(begin):
        # Positional: A1111/Forge name the parameter `job`, SD.Next `title`.
        begin(title)
    try:
        yield
    finally:
        # Read shared.state again: SD.Next's reload_model_weights (our restore) replaces it with a copy.
        end = getattr(host.state, "end", None)
        if callable(end):
            end()


def _free_cuda_cache() -> None:
    """Hand freed GPU memory back to the driver, so the next model (ours or the web UI's) fits."""
    try:
        import torch

        if torch.cuda.is_available():
            gc.collect()  # tensors in reference cycles hold GPU memory until collected
            torch.cuda.empty_cache()
    except Exception as error:  # a broken CUDA setup must not stop the restore
        log.debug("empty_cache failed: %s", error)


@contextlib.contextmanager
def host_model_freed(host: Host, before_restore: Callable[[], None] = lambda: None) -> Iterator[str]:
    """Take the web UI's model off the GPU for the duration and bring it back afterwards, also on error.

    Yields how it was done. In order of preference, by what exists:
    - "memory-manager": Forge's or reForge's manager unloads everything; it loads models back onto the
      GPU itself when next needed, so nothing is restored by hand. (Their `send_model_to_cpu` is a stub.)
    - "moved": A1111's `sd_models.send_model_to_cpu` and, afterwards, `send_model_to_device` (both know
      about --medvram/--lowvram).
    - "reloaded": `sd_models.unload_model_weights()` and, afterwards, `reload_model_weights()` (SD.Next,
      where moving a pipeline with offload hooks is fragile).
    - "none": nothing loaded, or nothing usable; training then shares the GPU with it.
    `before_restore` runs first on the way out (to move the trainer's own model off the GPU).
    """
    for name in MEMORY_MANAGERS:
        manager = host.loaded_module(name)
        if callable(getattr(manager, "unload_all_models", None)):
            manager.unload_all_models()
            if callable(getattr(manager, "soft_empty_cache", None)):
                manager.soft_empty_cache()
            try:
                yield "memory-manager"
            finally:
                before_restore()
                _free_cuda_cache()
            return

    sd_models = host.module("modules.sd_models")
    model = host.loaded_model()
    to_cpu, to_device = getattr(sd_models, "send_model_to_cpu", None), getattr(sd_models, "send_model_to_device", None)
    unload, reload = getattr(sd_models, "unload_model_weights", None), getattr(sd_models, "reload_model_weights", None)
    if model is None:
        how = "none"
    elif callable(to_cpu) and callable(to_device):
        how = "moved"
        to_cpu(model)
    elif callable(unload) and callable(reload):
        how = "reloaded"
        unload()
    else:
        how = "none"
        log.warning("cannot free the web UI's model from the GPU; training shares the GPU with it")
    _free_cuda_cache()
    try:
        yield how
    finally:
        before_restore()
        _free_cuda_cache()
        if how == "moved":
            to_device(model)
        elif how == "reloaded":
            reload()
