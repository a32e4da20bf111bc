"""HTTP routes under /ti/v1 on the web UI's FastAPI app.

The handlers are plain functions of (backend, body) returning (status, JSON body), so tests can call
them without FastAPI; `register` wraps them. Bad input is HTTP 400 with `{"error": "<one line>"}`, a
second run while one is going is 409, anything else 500 with the same shape.

Routes are added whether or not the web UI was started with --api (as other extensions' routes are),
and they honour its --api-auth credentials when those are set.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("ti_host")

PREFIX = "/ti/v1"
CREATE_FIELDS = {"name", "init_text", "vectors", "overwrite"}

Response = tuple[int, dict[str, Any]]


class BadRequest(ValueError):
    """Input the client must fix (HTTP 400)."""


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key, default)
    # bool is an int in Python; a JSON true is not a vector count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"{key} must be {getattr(kind, '__name__', kind)}, not {type(value).__name__}")
    return value


def create(backend, body: Any) -> dict[str, Any]:
    """POST /create {name, init_text="*", vectors=1, overwrite=false} -> {path, name, vectors, warnings}.

    ``warnings`` lists what would make the name fail silently in some UI (ti_core.names.name_warnings); the
    embedding is created all the same.
    """
    from ti_core.create import create_embedding_file
    from ti_core.embedding import MAX_VECTORS
    from ti_core.names import name_warnings

    body = _object(body)
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)} (expected {', '.join(sorted(CREATE_FIELDS))})")
    if "name" not in body:
        raise BadRequest("name is required")
    name = _field(body, "name", str, "")
    init_text = _field(body, "init_text", str, "*")
    vectors = _field(body, "vectors", int, 1)
    overwrite = _field(body, "overwrite", bool, False)
    if not 1 <= vectors <= MAX_VECTORS:
        raise BadRequest(f"vectors must be between 1 and {MAX_VECTORS}, not {vectors}")
    embedding, path = create_embedding_file(
        backend.current_model, Path(backend.embeddings_dir), name, init_text, vectors,
        overwrite=overwrite, overwrite_hint="set overwrite to replace it",  # in the route's words
    )  # fmt: skip
    backend.reload_embeddings()
    return {
        "path": str(path),
        "name": embedding.name,
        "vectors": embedding.num_vectors,
        "warnings": name_warnings(embedding.name),
    }


def train_config(backend, body: Any):
    """A TrainConfig from a request: the web UI's embeddings folder, and the host defaults for what is left out."""
    from ti_core.config import TrainConfig

    values = dict(_object(body))
    host_folder = Path(backend.embeddings_dir)
    given = values.get("embeddings_dir")
    # The web UI loads embeddings from one folder only; a run writing elsewhere would never show up.
    if given not in (None, "") and Path(str(given)).absolute() != host_folder:
        raise BadRequest(f"embeddings_dir is the web UI's folder ({host_folder}); leave it out")
    values["embeddings_dir"] = str(host_folder)
    values.setdefault("log_dir", str(backend.log_dir))
    mixed_precision = getattr(backend, "mixed_precision", None)
    if mixed_precision:
        values.setdefault("mixed_precision", mixed_precision)
    try:
        return TrainConfig.from_dict(values)
    except TypeError as error:  # a required field (name, data) left out
        raise BadRequest(_one_line(error).replace("__init__() ", "")) from error


def train(backend, body: Any) -> dict[str, Any]:
    """POST /train {TrainConfig fields} -> {started: true, name}; the run goes on in the background."""
    from ti_core.names import embedding_path
    from ti_core.train import AlreadyTrained, check_trainable

    config = train_config(backend, body)
    # What would only fail on the training thread is answered here, so the client gets a 400 at once.
    if not Path(config.data.images).is_dir():
        raise BadRequest(f"data.images: {config.data.images} is not a folder on the web UI's machine")
    existing = embedding_path(config.embeddings_dir, config.name)
    if existing.exists() and not (config.resume or config.overwrite):
        raise BadRequest(f"{existing.name} exists: set resume to continue training it, or overwrite to start again")
    try:
        check_trainable(config)  # a resume past its steps, or with nothing to resume
    except AlreadyTrained as error:
        raise BadRequest(str(AlreadyTrained(error.path, error.step, "set resume", "set overwrite"))) from None
    backend.start_training(config)
    return {"started": True, "name": config.name}


def progress(backend, body: Any = None) -> dict[str, Any]:
    """GET /progress -> the current (or last) run's snapshot; {"running": false} when there was none."""
    from ti_core.jobs import current_job

    job = current_job()
    return (
        job.snapshot()
        if job is not None
        else {"running": False, "step": 0, "total": 0, "message": "No training run yet"}
    )


def interrupt(backend, body: Any = None) -> dict[str, Any]:
    """POST /interrupt -> {interrupted: bool}: asks a running job to stop after its current step."""
    from ti_core.jobs import current_job

    job = current_job()
    if job is None or not job.running:
        return {"interrupted": False, "message": "no training run is in progress"}
    job.cancel()
    return {"interrupted": True}


ROUTES: dict[tuple[str, str], Callable[[Any, Any], dict[str, Any]]] = {
    ("POST", "/create"): create,
    ("POST", "/train"): train,
    ("GET", "/progress"): progress,
    ("POST", "/interrupt"): interrupt,
}


def handle(handler: Callable[[Any, Any], dict[str, Any]], backend, body: Any) -> Response:
    """Run a handler; map its failures to HTTP statuses with a one-line error."""
    try:
        return 200, handler(backend, body)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        # ValueError covers ModelLoadError, EmbeddingFileError and TrainConfig's validation.
        return 400, {"error": _one_line(error)}
    except RuntimeError as error:
        if "already in progress" in str(error):
            return 409, {"error": _one_line(error)}
        traceback.print_exc()
        return 500, {"error": _one_line(error)}
    except Exception as error:
        traceback.print_exc()
        return 500, {"error": _one_line(error)}


def parse_body(raw: bytes) -> Any:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"the request body is not JSON: {_one_line(error)}") from error


def credentials(api_auth: str | None) -> dict[str, str]:
    """`--api-auth user:pass,user2:pass2` as a dict (A1111's format); empty when not set."""
    found = {}
    for pair in (api_auth or "").split(","):
        if ":" in pair:
            user, password = pair.split(":", 1)
            found[user.strip()] = password
    return found


def authorized(header: str | None, allowed: dict[str, str]) -> bool:
    """HTTP basic auth against --api-auth; always true when no credentials are configured."""
    if not allowed:
        return True
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return user in allowed and hmac.compare_digest(password.encode(), allowed[user].encode())


def register(app, backend, api_auth: str | None = None) -> list[str]:
    """Add the routes to a FastAPI app; returns their paths."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    allowed = credentials(api_auth)

    def endpoint(handler):
        async def route(request: Request):
            if not authorized(request.headers.get("authorization"), allowed):
                return JSONResponse({"error": "incorrect username or password"}, 401, {"WWW-Authenticate": "Basic"})
            try:
                body = parse_body(await request.body()) if request.method == "POST" else None
            except BadRequest as error:
                return JSONResponse({"error": str(error)}, 400)
            # Loading a model and writing files block: keep them off the event loop.
            status, payload = await run_in_threadpool(handle, handler, backend, body)
            return JSONResponse(payload, status)

        route.__name__ = f"ti_{handler.__name__}"
        # FastAPI reads the annotation to pass the request; this module's annotations are strings
        # (`from __future__ import annotations`) naming a class it only imports here.
        route.__annotations__ = {"request": Request}
        return route

    paths = []
    for (method, path), handler in ROUTES.items():
        app.add_api_route(PREFIX + path, endpoint(handler), methods=[method])
        paths.append(PREFIX + path)
    return paths
