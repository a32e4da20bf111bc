"""`<log_dir>/<name>/`: snapshots, previews, loss.csv, settings.json, the optimizer state and the lock."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..config import TrainConfig
from ..embedding import Embedding
from ..files import comparison_grid_path, list_previews
from ..formats import load_embedding, save_embedding_to
from .lock import exclusive_lock

CSV_COLUMNS = ("step", "epoch", "loss", "learning_rate", "seconds", "validation_loss")
CSV_FLUSH_EVERY = 100  # steps; loss.csv is rewritten whole (atomically), so not every step


def model_facts(model) -> dict[str, Any]:
    """What settings.json records of the model: not settings (the model is chosen outside the run), but what
    the run's results depend on."""
    return {
        "source": model.source,
        "architecture": model.architecture,
        "prediction_type": model.prediction_type,
        "zero_terminal_snr": model.zero_terminal_snr,
    }


class RunFolder:
    """`<log_dir>/<name>/`: snapshots, preview images, loss.csv, settings.json, the optimizer state, the
    lock and the latent cache. Only the main process writes, and every file is written atomically."""

    def __init__(self, config: TrainConfig, write: bool) -> None:
        self.config, self.write = config, write
        self.folder = Path(config.log_dir) / config.name
        self.rows: list[dict[str, Any]] = []
        self.best = math.inf
        self.seconds_before = 0.0
        self.model_facts: dict[str, Any] = {}  # what the run trains against, recorded beside its settings
        self.preview_prompts: list[str] = []  # what its previews show (the default one resolved), recorded too

    name = property(lambda self: self.config.name)
    cache_dir = property(lambda self: self.folder / "latents")
    csv_path = property(lambda self: self.folder / "loss.csv")
    best_path = property(lambda self: self.folder / f"{self.name}-best.safetensors")
    optimizer_path = property(lambda self: self.folder / f"{self.name}.optim.safetensors")

    step_grid_path = property(lambda self: comparison_grid_path(self.config.log_dir, self.name, "by-step"))

    def image_path(self, step: int) -> Path:
        return self.folder / "images" / f"{self.name}-{step}.png"

    def last_logged_step(self) -> int:
        """The last step in loss.csv (0 when there is none)."""
        try:
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                return max((int(row["step"]) for row in csv.DictReader(handle)), default=0)
        except (OSError, KeyError, ValueError):
            return 0

    def preview_images(self) -> list[tuple[int, Path]]:
        """The previews in the images folder (this run's and earlier ones'), as (step, path) by step."""
        return list_previews(self.config.log_dir, self.name)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The run's lock. A run that fails to start (no images, a refused name) leaves no empty folder."""
        if not self.write:
            yield
            return
        missing = [folder for folder in (self.folder, *self.folder.parents) if not folder.exists()]
        try:
            with exclusive_lock(self.folder / ".lock"):
                yield
        except BaseException:
            if missing:  # the folders this run made (the log folder too, on a first run), as far as they are empty
                _remove_empty_folders(self.folder)
                for folder in missing[1:]:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise

    def begin(self, start: int) -> None:
        """settings.json, and the loss log of a resumed run kept up to its step."""
        if not self.write:
            return
        record = {**self.config.to_dict(), "model": self.model_facts, "preview_prompts": self.preview_prompts}
        text = json.dumps(record, indent=2) + "\n"
        atomic_write(self.folder / "settings.json", lambda temp: temp.write_text(text, encoding="utf-8"))
        if self.config.resume and self.csv_path.is_file():
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= start]
            self.seconds_before = float(self.rows[-1]["seconds"]) if self.rows else 0.0
        if self.config.resume and self.best_path.is_file():
            with contextlib.suppress(ValueError, KeyError):
                self.best = float(load_embedding(self.best_path).metadata["validation_loss"])

    def log_loss(self, step: int, epoch: int, loss: float, lr: float, seconds: float) -> None:
        row = {
            "step": step,
            "epoch": epoch,
            "loss": f"{loss:.6g}",
            "learning_rate": f"{lr:.6g}",
            "validation_loss": "",
        }
        self.rows.append({**row, "seconds": f"{self.seconds_before + seconds:.2f}"})
        if step % CSV_FLUSH_EVERY == 0:
            self.flush()

    def flush(self) -> None:
        if not self.write or not self.rows:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.csv_path, lambda temp: temp.write_text(buffer.getvalue(), encoding="utf-8"))

    def save_snapshot(self, embedding: Embedding) -> Path:
        path = self.folder / f"{self.name}-{embedding.step}.safetensors"
        save_embedding_to(embedding, path, overwrite=True)
        self.flush()
        return path

    def log_validation(self, step: int, value: float, embedding: Embedding) -> Path | None:
        """Record a validation loss; keep the embedding as `<name>-best` when it is the lowest so far."""
        if self.rows and int(self.rows[-1]["step"]) == step:
            self.rows[-1]["validation_loss"] = f"{value:.6g}"
        if value >= self.best:
            return None
        self.best = value
        return save_embedding_to(embedding, self.best_path, overwrite=True, metadata={"validation_loss": repr(value)})

    def save_image(self, image, path: Path) -> Path:
        return atomic_write(path, lambda temp: image.save(temp, format="PNG"))

    def save_optimizer_state(self, optimizer, embedding: Embedding) -> None:
        """`<name>.optim.safetensors`: the optimizer's per-vector state (AdamW's moments and step count, or
        Adafactor's, Prodigy's...) per encoder key and its groups' numbers (Prodigy's step size d), with the
        hash of the vectors they belong to (tensors and JSON only; no pickle)."""
        from safetensors.torch import save_file

        if not (self.write and self.config.save_optimizer_state):
            return
        saved = optimizer.state_dict()
        state = saved["state"]
        if not state:  # stopped before the first step: nothing to continue
            return
        tensors, scalars, zero_dim = {}, {}, set()
        for index, key in enumerate(embedding.vectors):
            for name, value in state[index].items():
                if isinstance(value, torch.Tensor):
                    if value.dim() == 0:
                        zero_dim.add(name)
                    tensors[f"{key}.{name}"] = value.detach().cpu().reshape(-1 if value.dim() == 0 else value.shape)
                elif isinstance(value, bool | int | float):
                    scalars[name] = type(value).__name__
                    kind = torch.float64 if isinstance(value, float) else torch.int64
                    tensors[f"{key}.{name}"] = torch.tensor([value], dtype=kind)
        groups = [
            {name: value for name, value in group.items() if name not in ("params", "lr") and _is_number(value)}
            for group in saved["param_groups"]
        ]
        metadata = {
            "vectors_sha256": vectors_hash(embedding.vectors),
            "step": str(embedding.step),
            "optimizer": OPTIMIZER_NAMES.get(self.config.optimizer, self.config.optimizer),
            "zero_dim": json.dumps(sorted(zero_dim)),
            "scalars": json.dumps(scalars),
            "param_groups": json.dumps(groups),
        }
        atomic_write(self.optimizer_path, lambda temp: save_file(tensors, str(temp), metadata=metadata))

    def load_optimizer_state(self, optimizer, embedding: Embedding) -> str:
        """Restore the optimizer state saved with these exact vectors by the same optimizer; otherwise say why
        a fresh one is used."""
        from safetensors import safe_open

        if not self.optimizer_path.is_file():
            return "no saved optimizer state, starting a fresh optimizer"
        with safe_open(str(self.optimizer_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        if metadata.get("vectors_sha256") != vectors_hash(embedding.vectors):
            return "the saved optimizer state belongs to other vectors, starting a fresh optimizer"
        wanted = OPTIMIZER_NAMES.get(self.config.optimizer, self.config.optimizer)
        if metadata.get("optimizer", "AdamW") != wanted:
            return f"the saved optimizer state is {metadata.get('optimizer')}'s, starting a fresh {wanted}"
        zero_dim = set(json.loads(metadata.get("zero_dim", '["step"]')))  # files before this field: AdamW's
        scalars = json.loads(metadata.get("scalars", "{}"))
        state = {}
        for index, key in enumerate(embedding.vectors):
            entries = {}
            for tensor_key, value in tensors.items():
                owner, _, name = tensor_key.rpartition(".")
                if owner != key:
                    continue
                if name in scalars:
                    entries[name] = {"int": int, "float": float, "bool": bool}[scalars[name]](value.item())
                else:
                    entries[name] = value.reshape(()) if name in zero_dim else value
            state[index] = entries
        groups = optimizer.state_dict()["param_groups"]
        for group, saved in zip(groups, json.loads(metadata.get("param_groups", "[]")), strict=False):
            group.update({name: value for name, value in saved.items() if name in group})
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        return "optimizer state restored"


OPTIMIZER_NAMES = {"adamw": "AdamW"}  # as files before the optimizer setting name it


def _is_number(value: Any) -> bool:
    """A group's running number (Prodigy's d, d_max, k...); not a flag such as `fused`, which belongs to the
    device the run resumes on."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def vectors_hash(vectors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the vectors as saved (float32), to tie an optimizer state to them."""
    digest = hashlib.sha256()
    for key in sorted(vectors):
        digest.update(key.encode())
        digest.update(vectors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _remove_empty_folders(folder: Path) -> None:
    """Remove `folder` and the folders in it, as far as they hold no file."""
    for path in sorted(folder.rglob("*"), key=lambda path: len(path.parts), reverse=True):
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()
