"""The views as HTML and text: status lines, the prompt budget, progress, embedding cards, inspect.

Pure functions of their inputs (no gradio): the actions call them and hand the strings to components.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ti_core.timodel import TIModel

PROMPT_TOKENS = 75  # tokens in one prompt window; an embedding's vectors use that many of them


def status_html(text: str, kind: str = "info") -> str:
    """One status line as HTML (plain text would turn underscores in paths into emphasis in Markdown)."""
    return f'<div class="ti-status ti-status-{kind}">{html.escape(text)}</div>' if text else ""


def error_html(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return status_html(lines[0] if lines else type(error).__name__, "error")


def budget_text(vectors: int) -> str:
    """What N vectors per token cost in a prompt window."""
    vectors = int(vectors)
    return (
        f"{vectors} vector{'s' if vectors != 1 else ''} per token: using this embedding takes {vectors} of the "
        f"{PROMPT_TOKENS} tokens in a prompt window, {PROMPT_TOKENS - vectors} left"
    )


def init_text_info(tokenizer, init_text: str, vectors: int) -> str:
    """How many tokens the init text has and how they fill the vectors (A1111's spread rule)."""
    from ti_core.prompt import token_count

    if not init_text.strip():
        return "Empty init text: the vectors start at zero."
    count = token_count(tokenizer, init_text)
    tokens = f"Init text: {count} token{'s' if count != 1 else ''}"
    if count == vectors:
        return f"{tokens}, one per vector."
    if count < vectors:
        return f"{tokens}, repeated to fill {vectors} vectors."
    return f"{tokens}; only {vectors} of them start the {vectors} vector{'s' if vectors != 1 else ''}."


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def progress_html(snapshot: dict | None) -> str:
    """The progress bar with step, speed, ETA, loss and learning rate."""
    if not snapshot:
        return '<div class="ti-progress ti-idle">No training run yet.</div>'
    step, total = int(snapshot.get("step") or 0), int(snapshot.get("total") or 0)
    percent = 100.0 * step / total if total else 0.0
    parts = [f"Step {step} / {total}"]
    if snapshot.get("steps_per_second"):
        parts.append(f"{snapshot['steps_per_second']:.2f} steps/s")
    if snapshot.get("running"):
        parts.append(f"ETA {format_duration(snapshot.get('eta_seconds'))}")
    else:
        parts.append(f"took {format_duration(snapshot.get('elapsed_seconds'))}")
    if (snapshot.get("outputs_seconds") or 0) >= 1:  # not in steps/s or the ETA: say where the time went
        parts.append(f"previews and snapshots {format_duration(snapshot['outputs_seconds'])}")
    if snapshot.get("loss") is not None:
        parts.append(f"loss {snapshot['loss']:.4f}")
    if snapshot.get("validation_loss") is not None:
        parts.append(f"validation loss {snapshot['validation_loss']:.4f}")
    if snapshot.get("lr") is not None:
        parts.append(f"lr {snapshot['lr']:.3g}")
    if snapshot.get("norm_ratio") is not None:
        parts.append(f"norm {snapshot['norm_ratio']:.2f}× the vocabulary's")
    state = "running" if snapshot.get("running") else (snapshot.get("stopped") or "finished")
    # While running, the trainer's latest message ("Saved …", "Preview …"); at the end the status line has it.
    message = snapshot.get("message") if snapshot.get("running") else ""
    message = f'<div class="ti-progress-message">{html.escape(message)}</div>' if message else ""
    if snapshot.get("warning"):  # stays on screen for the rest of the run and after it
        message += f'<div class="ti-progress-message ti-norm-high">{html.escape(snapshot["warning"])}</div>'
    return (
        f'<div class="ti-progress ti-{html.escape(state)}">'
        f'<div class="ti-progress-bar" role="progressbar" aria-valuemin="0" aria-valuemax="{total}" '
        f'aria-valuenow="{step}"><div class="ti-progress-fill" style="width: {percent:.1f}%"></div></div>'
        f'<div class="ti-progress-text">{html.escape(" · ".join(parts))}</div>'
        f"{message}</div>"
    )


# ----------------------------------------------------------------------------------------- embeddings view


@dataclass
class CardInfo:
    """What one embedding card shows."""

    name: str
    path: Path
    vectors: int | None = None
    step: int | None = None
    architecture: str = ""
    base_model: str = ""
    fits: bool | None = None  # None: no model to compare with
    fit_text: str = ""
    norm_ratio: float | None = None  # the largest vector norm / the vocabulary's mean (None: not known)
    preview: Path | None = None
    error: str = ""
    negative: bool = False  # a negative embedding: a click puts it into the negative prompt


def describe_widths(widths: dict[str, int]) -> str:
    return " + ".join(f"{key} {width}" for key, width in widths.items())


def preview_path(path: Path) -> Path | None:
    """`<name>.preview.png`, else `<name>.png` (unless that is the embedding itself), as the web UIs look."""
    for candidate in (path.with_name(f"{path.stem}.preview.png"), path.with_name(f"{path.stem}.png")):
        if candidate != path and candidate.is_file():
            return candidate
    return None


_card_cache: dict[str, tuple[tuple, CardInfo]] = {}


def card_info(
    path: Path, model_widths: dict[str, int] | None, vocabulary_norms: dict[str, float] | None = None
) -> CardInfo:
    """The card of one embedding file, read again only when the file changed (a refresh of a big folder
    is then cheap). The preview image is looked up every time: training writes it after the file."""
    try:
        stat = path.stat()
    except OSError:
        return _read_card(path, model_widths, vocabulary_norms)
    key = (
        stat.st_mtime_ns,
        stat.st_size,
        tuple(sorted((model_widths or {}).items())),
        tuple(sorted((vocabulary_norms or {}).items())),
    )
    cached = _card_cache.get(str(path))
    if cached is None or cached[0] != key:
        cached = _card_cache[str(path)] = (key, _read_card(path, model_widths, vocabulary_norms))
    return dataclasses.replace(cached[1], preview=preview_path(path))


def _read_card(
    path: Path, model_widths: dict[str, int] | None, vocabulary_norms: dict[str, float] | None = None
) -> CardInfo:
    """Read one embedding file for its card; a file that cannot be read becomes a card with the reason."""
    from ti_core.formats import load_embedding
    from ti_core.inspect import architecture_guess

    card = CardInfo(name=path.stem, path=path)
    try:
        embedding = load_embedding(path)
    except ValueError as error:
        card.error = str(error).splitlines()[0]
        return card
    card.name, card.vectors, card.step = embedding.name, embedding.num_vectors, embedding.step
    card.negative = embedding.negative
    card.architecture = embedding.metadata.get("architecture") or architecture_guess(embedding)
    card.base_model = embedding.metadata.get("base_model") or embedding.metadata.get("sd_checkpoint_name") or ""
    if model_widths is not None:
        card.fits, card.fit_text = _fit(path, embedding, model_widths)
    # The loaded model's vocabulary when the vectors fit it, else the one the file was trained with.
    from ti_core.editability import largest_norm_ratio, recorded_mean_norms

    mean_norms = vocabulary_norms if card.fits and vocabulary_norms else recorded_mean_norms(embedding.metadata)
    card.norm_ratio = largest_norm_ratio(embedding.vectors, mean_norms)
    return card


def _fit(path: Path, embedding, model_widths: dict[str, int]) -> tuple[bool, str]:
    """Whether the embedding's vectors are as wide as the model's text encoders (or it is not usable)."""
    from ti_core.formats import load_embedding

    try:  # with the model's widths a single-tensor file is matched to the encoder of its width
        fitted = load_embedding(path, widths=model_widths)
        if fitted.widths == model_widths:
            return True, "fits this model"
    except ValueError:
        pass
    return (
        False,
        f"does not fit: the model needs {describe_widths(model_widths)}, this has {describe_widths(embedding.widths)}",
    )


_thumb_cache: dict[tuple[str, int], str] = {}


def thumbnail_uri(path: Path, size: int = 192) -> str | None:
    """A small JPEG data URI (inline, so no version's file-serving rules are involved); cached by mtime."""
    from PIL import Image

    try:
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _thumb_cache:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
            _thumb_cache[key] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return _thumb_cache[key]
    except OSError:
        return None


def cards_html(cards: Sequence[CardInfo], model_label: str) -> str:
    """The card grid. Each card is a <button> (keyboard reachable); ti.js toggles its token in the prompt."""
    if not cards:
        return (
            '<div class="ti-cards-empty">No embeddings yet: create one in the Create tab, or put embedding files '
            "into the embeddings folder and press Refresh.</div>"
        )
    items = [_card_html(card) for card in cards]
    return (
        f'<div class="ti-cards-note">{len(cards)} embedding{"s" if len(cards) != 1 else ""} · model: '
        f"{html.escape(model_label)} · click a card to add its token to the prompt, click again to remove it</div>"
        f'<div class="ti-cards" role="list">{"".join(items)}</div>'
        '<div id="ti_embeddings_insert_status" class="ti-insert-status" aria-live="polite"></div>'
    )


def _card_html(card: CardInfo) -> str:
    name = html.escape(card.name, quote=True)
    image = thumbnail_uri(card.preview) if card.preview else None
    picture = (
        f'<img class="ti-card-image" src="{image}" alt="" loading="lazy">'
        if image
        else f'<span class="ti-card-image ti-card-noimage" aria-hidden="true">{html.escape(card.name[:1].upper())}</span>'
    )
    if card.error:
        return (
            f'<div class="ti-card ti-card-broken" role="listitem" title="{html.escape(card.error, quote=True)}">'
            f'{picture}<span class="ti-card-name">{name}</span>'
            f'<span class="ti-card-meta ti-card-error">{html.escape(card.error)}</span></div>'
        )
    fit_class = {True: "ti-fits", False: "ti-misfit", None: "ti-fit-unknown"}[card.fits]
    fit_text = card.fit_text or "no model loaded to compare with"
    meta = f"{card.vectors} vector{'s' if card.vectors != 1 else ''} · step {card.step}"
    meta += " · negative" if card.negative else ""
    origin = " · ".join(part for part in (card.architecture, card.base_model and f"base {card.base_model}") if part)
    norm = ""
    if card.norm_ratio is not None:
        from ti_core.editability import NORM_WARNING_RATIO

        high = card.norm_ratio > NORM_WARNING_RATIO
        title = "may overpower other words in prompts" if high else "within a word's scale"
        norm = (
            f'<span class="ti-card-meta ti-card-norm{" ti-norm-high" if high else ""}" title="{title}">'
            f"norm {card.norm_ratio:.1f}× the vocabulary's</span>"
        )
    negative, where = (' data-ti-negative="1"', "negative prompt") if card.negative else ("", "prompt")
    return (
        f'<button type="button" class="ti-card {fit_class}" role="listitem" data-ti-name="{name}"{negative} '
        f'title="Add {name} to the {where} (click again to remove it)">'
        f'{picture}<span class="ti-card-name">{name}</span>'
        f'<span class="ti-card-meta">{html.escape(meta)}</span>'
        f'<span class="ti-card-meta">{html.escape(origin)}</span>{norm}'
        f'<span class="ti-card-fit">{html.escape(fit_text)}</span></button>'
    )


def embedding_names(embeddings_dir: Path) -> list[str]:
    """Tokens of the embedding files in the folder (the file stem, as the web UIs use)."""
    from ti_core.formats import list_embeddings

    return sorted({path.stem for path in list_embeddings(embeddings_dir)}, key=str.lower)


def inspect_html(path: Path, model: TIModel) -> str:
    """Norms per vector and, with a model, the nearest vocabulary tokens, as an HTML table."""
    from ti_core.editability import recorded_mean_norms
    from ti_core.formats import load_embedding
    from ti_core.inspect import model_norm_ratios, nearest_tokens, rounded_ratios

    embedding = load_embedding(path, widths=model.widths if model is not None else None)
    nearest = nearest_tokens(model, embedding) if model is not None else {}
    ratio_rows = (model_norm_ratios(model, embedding) if model is not None else {}) or rounded_ratios(
        embedding, recorded_mean_norms(embedding.metadata)
    )
    rows = []
    for key, tensor in embedding.vectors.items():
        norms = tensor.float().norm(dim=1).tolist()
        ratios = ratio_rows.get(key, [None] * len(norms))
        for index, norm in enumerate(norms):
            tokens = ", ".join(f"{token} ({score:.2f})" for token, score in nearest.get(key, [[]] * len(norms))[index])
            rows.append(
                f"<tr><td>{html.escape(key)}</td><td>{index}</td><td>{norm:.4f}</td>"
                f"<td>{'–' if ratios[index] is None else f'{ratios[index]:.2f}×'}</td>"
                f"<td>{html.escape(tokens or '–')}</td></tr>"
            )
    note = "" if model is not None else "<p>Load a model to see the nearest vocabulary tokens.</p>"
    head = (
        f"<p><b>{html.escape(embedding.name)}</b>: {embedding.num_vectors} vectors, step {embedding.step}, "
        f"{html.escape(describe_widths(embedding.widths))} · {html.escape(str(path))}</p>{note}"
    )
    table = (
        '<table class="ti-inspect"><thead><tr><th>encoder</th><th>vector</th><th>norm</th><th>× vocabulary</th>'
        f"<th>nearest tokens (cosine)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return head + table
