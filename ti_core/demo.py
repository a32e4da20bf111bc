"""The demo model: a tiny SD1 model with random weights, built in-process in a few seconds.

It lets someone without a checkpoint go through Create, Train and Try-it end to end with nothing
downloaded. It has SD1's real architecture and the real CLIP vocabulary (so init texts, token counts and
nearest tokens behave as with a real model), but tiny widths and random weights: its pictures are noise
and its embeddings fit no real model (their `base_model` says so).

``load_model(DEMO_MODEL_ID)`` builds it, so anything that takes a model source (the app's Model picker,
``python -m ti_core ... --model demo:tiny-sd1``) takes the demo too. This module imports nothing heavy
until the model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .timodel import TIModel

DEMO_MODEL_ID = "demo:tiny-sd1"  # the model source that stands for the demo model
DEMO_LABEL = "Demo model (for trying the app: pictures are noise)"
DEMO_MODEL_NAME = "demo-tiny-sd1"  # written as the embeddings' base_model


def is_demo(source: object) -> bool:
    return str(source).strip() == DEMO_MODEL_ID


def build_demo_model() -> TIModel:
    """The demo model, the same type `load_model` returns; the same weights every time (seed 0)."""
    from .testing import build_tiny_pipeline
    from .timodel import from_pipeline

    model = from_pipeline(build_tiny_pipeline("sd1"), DEMO_MODEL_ID)
    model.name = DEMO_MODEL_NAME
    return model
