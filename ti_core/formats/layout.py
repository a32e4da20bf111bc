"""Which tensors of a file are the embedding: the layout by the tool that wrote it, the encoder keys by width."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..safe_pickle import ParameterDictContents
from .common import (
    IMAGE_SUFFIXES,
    KEY_BY_WIDTH,
    KIND_BY_WIDTH,
    KIND_BY_WIDTHS,
    PICKLE_SUFFIXES,
    SDXL_KEYS,
    SINGLE_ON_SDXL,
    T5_WIDTH,
    file_error,
    keys_text,
)


def split_payload(path: Path, data: Any) -> tuple[dict[Any, Any], dict[str, Any]]:
    """The candidate tensors and the other fields of a .pt/.bin/image payload."""
    if isinstance(data, torch.Tensor):
        return {"*": data}, {}
    if not isinstance(data, dict):
        raise file_error(path, f"unknown layout: holds a {type(data).__name__}, not a dict of tensors")
    if "string_to_param" not in data:
        return data, {}
    params = data["string_to_param"]
    if not isinstance(params, dict) or len(params) != 1:
        count = len(params) if isinstance(params, dict) else type(params).__name__
        raise file_error(path, f"unknown layout: string_to_param must hold exactly one tensor, not {count}")
    fields = {key: value for key, value in data.items() if key not in ("string_to_param", "string_to_token")}
    return dict(params), fields


def _as_vectors(path: Path, key: Any, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise file_error(path, f"tensor {key!r} has dtype {tensor.dtype}, not floating point")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise file_error(path, f"tensor {key!r} has shape {list(tensor.shape)}, expected [vectors, width]")
    return tensor.detach().to(torch.float32).contiguous()


def _describe_widths(widths: dict[str, int]) -> str:
    if len(widths) == 1:
        return f"this model's text encoder is {next(iter(widths.values()))} wide"
    listed = " and ".join(f"{width} ({key})" for key, width in widths.items())
    return f"this model's text encoders are {listed} wide"


def _model_kind(widths: dict[str, int]) -> str | None:
    return KIND_BY_WIDTHS.get(tuple(sorted(widths.items())))


def _hint(file_kind: str | None, widths: dict[str, int]) -> str:
    model_kind = _model_kind(widths)
    if file_kind and model_kind:
        return f" (an {file_kind} embedding on an {model_kind} model?)"
    return ""


def _key_for_single(path: Path, width: int, widths: dict[str, int] | None) -> str:
    if widths is None:
        return KEY_BY_WIDTH.get(width, "clip_l")
    if len(widths) > 1:
        # One tensor on SDXL would condition one text encoder and leave the other on its own: the web UIs
        # skip such a file (its width is not the 2048 of clip_l + clip_g), so it does not fit.
        what = SINGLE_ON_SDXL.get(width, f"a single {width}-wide tensor")
        kind = "SDXL" if set(widths) == set(SDXL_KEYS) else ""
        needs = " + ".join(f"{key} [N, {model_width}]" for key, model_width in widths.items())
        raise file_error(
            path,
            f"does not fit this {kind or 'two-encoder'} model: it is {what}, and {kind or 'the model'} needs {needs}; "
            "the web UIs skip it",
        )
    for key, model_width in widths.items():
        if model_width == width:
            return key
    hint = _hint(KIND_BY_WIDTH.get(width), widths)
    raise file_error(path, f"has width {width} but {_describe_widths(widths)}{hint}")


def _check_sdxl(path: Path, vectors: dict[str, torch.Tensor], widths: dict[str, int] | None) -> None:
    if widths is None:
        return
    if not set(SDXL_KEYS) <= set(widths):
        hint = _hint("SDXL", widths)
        raise file_error(path, f"is an SDXL embedding (clip_l + clip_g) but {_describe_widths(widths)}{hint}")
    wrong = [
        f"{key} has width {vectors[key].shape[1]}, not {widths[key]}"
        for key in SDXL_KEYS
        if vectors[key].shape[1] != widths[key]
    ]
    if wrong:
        raise file_error(path, f"does not fit this SDXL model: {'; '.join(wrong)}")


def _without_outputs(candidates: dict[Any, Any]) -> dict[Any, Any]:
    # OneTrainer stores output embeddings next to the input ones ("clip_l_out", "emp_params_out"): not ours.
    return {
        key: value
        for key, value in candidates.items()
        if not (isinstance(key, str) and key.endswith("_out") and key[: -len("_out")] in candidates)
    }


def _is_t5(key: Any, tensor: torch.Tensor) -> bool:
    return (isinstance(key, str) and key.lower().startswith("t5")) or (
        tensor.ndim >= 1 and tensor.shape[-1] == T5_WIDTH
    )


def select_vectors(path: Path, candidates: dict[Any, Any], widths: dict[str, int] | None) -> dict[str, torch.Tensor]:
    layout = _without_outputs(candidates)
    not_tensors = [key for key, value in layout.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        verb = "is not a tensor" if len(not_tensors) == 1 else "are not tensors"
        raise file_error(path, f"unknown layout: {keys_text(not_tensors)} {verb}")
    if not layout:
        raise file_error(path, "holds no tensors")
    t5 = [f"{key} {list(tensor.shape)}" for key, tensor in layout.items() if _is_t5(key, tensor)]
    if t5:
        raise file_error(
            path,
            f"is a T5 text-encoder embedding ({', '.join(t5)}), for SD3 or Flux models: it is not for SD1, SD2 or "
            "SDXL, whose text encoders are CLIP",
        )
    if all(key in layout for key in SDXL_KEYS):
        if len(layout) != 2:
            raise file_error(path, f"unknown layout: clip_l + clip_g plus other tensors ({keys_text(layout)})")
        vectors = {key: _as_vectors(path, key, layout[key]) for key in SDXL_KEYS}
        _check_sdxl(path, vectors, widths)
        return vectors
    if len(layout) != 1:
        raise file_error(
            path,
            f"unknown layout: {len(layout)} tensors ({keys_text(layout)}); expected one tensor, or clip_l + clip_g",
        )
    ((key, tensor),) = layout.items()
    tensor = _as_vectors(path, key, tensor)
    return {_key_for_single(path, tensor.shape[1], widths): tensor}


def layout_name(suffix: str, data: Any, candidates: dict[Any, Any], header: dict[str, str], source: str) -> str:
    """The file's layout by the tool that writes it, e.g. "emb_params (kohya/A1111)", "a1111-pt"."""
    if suffix in IMAGE_SUFFIXES:
        return f"a1111-image ({source})"
    keys = set(_without_outputs(candidates))
    with_outputs = len(keys) < len(candidates)
    ours = ", ti_core" if header.get("tool", "").startswith("ti_core") else ""
    pickled = suffix in PICKLE_SUFFIXES
    if pickled and isinstance(data, torch.Tensor):
        return "bare tensor (.pt)"
    if pickled and isinstance(data, dict) and "string_to_param" in data:
        if isinstance(data["string_to_param"], ParameterDictContents):
            return "textual-inversion-pt (ParameterDict, original textual_inversion repository)"
        return "a1111-pt"
    if set(SDXL_KEYS) <= keys:
        return "sdxl (clip_l + clip_g)" + (
            ", kohya .pt" if pickled else ours or (", OneTrainer" if with_outputs else "")
        )
    if keys == {"emb_params"}:
        return "emb_params (kohya .pt)" if pickled else f"emb_params (kohya/A1111){ours}"
    if keys == {"emp_params"}:
        return "emp_params (OneTrainer)"
    if len(keys) == 1:
        return "diffusers-bin" if pickled else "single tensor (diffusers)"
    return f"{len(keys)} tensors"
