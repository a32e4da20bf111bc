"""Shared fixtures: tiny real-architecture models (seed 0) saved as diffusers folders once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from ti_core.models import load_model  # noqa: E402
from ti_core.testing import save_tiny_pipeline  # noqa: E402

ARCHITECTURES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Diffusers folders of tiny SD1 (eps), SD2 (v-prediction) and SDXL (eps) models."""
    root = tmp_path_factory.mktemp("models")
    prediction = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
    return {arch: save_tiny_pipeline(root / arch, arch, prediction[arch]) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs):
    """Loaded tiny models by architecture, shared by tests that only read them."""
    return {arch: load_model(folder) for arch, folder in tiny_model_dirs.items()}


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(tiny_models, arch):
    return tiny_models[arch]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy CI machine the threads wait for each
    other: one thread runs training tests several times faster. (Module-wide, so module fixtures that
    train use the same thread count as the tests that compare with them.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
