"""``/v1/steering/vectors``: list, register (upload or allowed path) and delete vectors.

Upload: ``POST /v1/steering/vectors?name=NAME[&scale=S&layers=1,2&replace=true]`` with the
raw safetensors or GGUF file as the body (format detected from its bytes, never
unpickled), or a JSON body ``{"name", "path" | "data" (base64), "scale", "layers",
"replace"}``. A JSON body takes JSON types only (``"replace": "yes"`` or ``"layers": "10"``
is a 400 naming the field); query parameters are text: ``layers=8,9,10``,
``replace=true|false|1|0``, each parameter at most once. ``op`` (``add``, ``ablate``,
``clamp``) with ``strength`` (ablate) or ``value`` (clamp) set the entry's default
intervention, as in the registry file; ``scale`` applies to ``add`` only. A vector must
match the served model (hidden size, layer range) and be finite. It is usable by the next
request and persisted in the registry's overlay.
Requests already admitted are unaffected by later changes: they carry the vector's
content, not its name.

With several API-server processes (``--api-server-count``, data parallel) the registry's
overlay file is their shared state (``vllm_steer.steering.registry``): a change made
through any process is seen by every process's next request once the call returned.
Every response of these routes names the process that answered (``x-vllm-steer-pid``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from vllm_steer.atomic_files import publish, temp_file, write_durable
from vllm_steer.server import audit, metrics
from vllm_steer.server.auth import Caller
from vllm_steer.server.common import (
    ServerContext,
    SteerHTTPError,
    SteerRoute,
    audited,
    context,
    read_body,
    require_admin,
    require_api_key,
)
from vllm_steer.steering import store_gc, uploads
from vllm_steer.steering.registry import NAME_RE, RegistryEntry
from vllm_steer.steering.values import (
    SpecError,
    parse_flag,
    parse_layers,
    parse_op_fields,
    parse_scale,
)
from vllm_steer.vector import SteeringVector, SteeringVectorError
from vllm_steer.vector import load as load_vector
from vllm_steer.vector_errors import VectorFileError
from vllm_steer.vector_io import detect_format

router = APIRouter(route_class=SteerRoute)
#: Response header naming the API-server process that answered (several may share a port).
PID_HEADER = "x-vllm-steer-pid"
_OP_KEYS = {"op", "strength", "value"}
_JSON_KEYS = {"name", "path", "data", "scale", "layers", "replace", *_OP_KEYS}
_QUERY_KEYS = {"name", "scale", "layers", "replace", *_OP_KEYS}


def attach(ctx: ServerContext) -> None:
    """Per-process set-up: drop a vector from the resolver's cache once no entry uses its
    file, whichever process made the change (bounded memory with many replacements), and
    collect the vector store now and after such changes (``steering.store_gc``)."""
    ctx.collector = store_gc.attach(
        ctx.resolver, on_run=lambda done: metrics.collected(done.deleted, done.freed_bytes))


def require_shared(ctx: ServerContext) -> None:
    """Several API processes share registrations only through a registry file's overlay."""
    if ctx.api_processes > 1 and not ctx.registry.persistent:
        raise SteerHTTPError(
            409, f"this server runs {ctx.api_processes} API processes and no registry file: "
            "a vector registered here would be unknown to the others. Start it with a "
            "registry (VLLMSTEER_REGISTRY or `vllm-steer serve --registry FILE`)", "name")


def respond(body: Any, status: int = 200) -> JSONResponse:
    """A JSON response naming this process (``PID_HEADER``)."""
    return JSONResponse(body, status_code=status, headers={PID_HEADER: str(os.getpid())})


# -- parameters ------------------------------------------------------------------------
def _name(x: Any) -> str:
    if not isinstance(x, str) or not NAME_RE.match(x):
        raise SteerHTTPError(400, "must be 1-128 characters of letters, digits, '_', '.', "
                             "'-', starting with a letter or digit", "name")
    return x


def _scale(x: Any, text: bool) -> float | None:
    """None when absent (the registry's default applies)."""
    if x is None:
        return None
    try:
        return parse_scale(x, "scale", text=text)
    except SpecError as e:
        raise SteerHTTPError(400, e.message, "scale") from None


def _op_fields(params: dict[str, Any], text: bool) -> dict[str, Any]:
    """``op``/``strength``/``value`` of a registration, checked as the registry file's
    entries are: a parameter the op does not use is refused."""
    try:
        return parse_op_fields(params, text=text)
    except SpecError as e:
        raise SteerHTTPError(400, e.message, e.field) from None


def _layers(x: Any, num_layers: int, text: bool) -> tuple[int, ...] | None:
    if x is None:
        return None
    try:
        return parse_layers(x, "layers", num_layers, text=text)
    except SpecError as e:
        raise SteerHTTPError(400, e.message, "layers") from None


def _bool(x: Any, field: str, text: bool) -> bool:
    """False when absent; a JSON boolean in a JSON body, ``true``/``false``/``1``/``0`` in
    a query string (``values.FLAG_SPELLINGS``)."""
    if x is None:
        return False
    try:
        return parse_flag(x, field, text=text)
    except SpecError as e:
        raise SteerHTTPError(400, e.message, field) from None


@dataclass(frozen=True)
class Registration:
    """What a registration asks for, besides the vector itself (checked)."""

    name: str
    scale: float | None
    layers: tuple[int, ...] | None
    ops: dict[str, Any]
    replace: bool


def parse_registration(params: dict[str, Any], num_layers: int, *, text: bool
                       ) -> Registration:
    """``name``, ``op``/``strength``/``value``, ``scale``, ``layers`` and ``replace`` of a
    registration (query parameters when ``text``, else JSON values); 400s name the
    field."""
    name = _name(params.get("name"))
    ops = _op_fields(params, text)
    scale = _scale(params.get("scale"), text)
    layers = _layers(params.get("layers"), num_layers, text)
    return Registration(name, scale, layers, ops, _bool(params.get("replace"), "replace", text))


# -- vectors ---------------------------------------------------------------------------
def _check_against_model(v: SteeringVector, ctx: ServerContext, layers: tuple[int, ...] | None,
                         field: str) -> None:
    try:
        v.validate(hidden_size=ctx.hidden_size, num_layers=ctx.num_layers)
    except SteeringVectorError as e:
        raise SteerHTTPError(400, f"vector does not fit the served model: {e}", field) from e
    missing = [x for x in layers or () if x not in v.directions]
    if missing:
        raise SteerHTTPError(400, f"vector has no direction for layers {missing} "
                             f"(has {v.layers})", "layers")


def vector_info(ctx: ServerContext, entry: RegistryEntry) -> dict[str, Any]:
    """What ``GET`` reports for one registry entry (loads the file, cached by the resolver)."""
    out: dict[str, Any] = {"id": entry.name, "object": "steering.vector", "name": entry.name,
                           "default_scale": entry.scale,
                           "default_layers": list(entry.layers) if entry.layers else None,
                           "default_op": entry.op, "origin": entry.origin}
    if entry.op == "ablate":
        out["default_strength"] = entry.strength
    elif entry.op == "clamp":
        out["default_value"] = entry.value
    try:
        v = ctx.resolver.load_vector_file(entry.path, "name")
        out.update(format=detect_format(entry.path), layers=v.layers,
                   hidden_size=v.hidden_size, metadata=v.metadata.to_dict())
    except (SpecError, VectorFileError) as e:
        out["error"] = f"vector file unreadable: {getattr(e, 'problem', None) or e}"
    return out


@dataclass(frozen=True)
class Registered:
    """A registration done: the vector's info as the routes answer it, the admin action it
    was (``upload``, ``replace`` or ``register`` for an allowed file) and the sha256 of
    the stored file (``audit``)."""

    info: dict[str, Any]
    action: str
    digest: str | None


def _parsed_upload(ctx: ServerContext, tmp: Path, layers: tuple[int, ...] | None,
                   field: str) -> str:
    """Parse and check the written upload ``tmp`` against the model; its format."""
    try:
        fmt = detect_format(tmp)
        v = load_vector(tmp)
    except VectorFileError as e:
        raise SteerHTTPError(400, f"not a valid vector file: {e.problem}", field) from e
    except SteeringVectorError as e:
        raise SteerHTTPError(400, f"not a valid vector file: {e}", field) from e
    except Exception as e:  # untrusted bytes: any parser failure is the client's
        raise SteerHTTPError(400, f"not a valid vector file ({type(e).__name__})",
                             field) from e
    _check_against_model(v, ctx, layers, field)
    return fmt


def _commit(ctx: ServerContext, r: Registration, target: Path,
            publish_upload: Callable[[], None] | None) -> RegistryEntry:
    """``Registry.register`` with the routes' errors; a published upload whose
    registration failed is removed."""
    try:
        return ctx.registry.register(r.name, target, scale=r.scale, layers=r.layers,
                                     replace=r.replace, before_commit=publish_upload, **r.ops)
    except KeyError:
        raise SteerHTTPError(409, f"vector {r.name!r} exists; pass replace=true to overwrite",
                             "name") from None
    except ValueError as e:
        raise SteerHTTPError(400, str(e), "name") from e
    except OSError as e:  # the overlay could not be written: nothing was registered
        if publish_upload is not None:
            target.unlink(missing_ok=True)
        raise SteerHTTPError(500, f"cannot persist the registry ({e.strerror})") from e


def register(ctx: ServerContext, r: Registration, data: bytes | None, path: str | None,
             data_field: str) -> Registered:
    """Register ``data`` (stored in the upload dir) or the allowed file ``path`` as
    ``r.name``. Blocking (run in a thread).

    An upload is written to a temporary file (held with a lock while this runs) and
    ``fsync``-ed, parsed and checked, then, under the registry's writers' lock, renamed to
    its final name (directory ``fsync``-ed) and named in the overlay (written, ``fsync``-ed,
    renamed, directory ``fsync``-ed): when this returns the registration survives a crash,
    and a crash before leaves no trace once the next collection ran
    (``Registry.collect_uploads``)."""
    reg = ctx.registry
    if not r.replace and r.name in reg.entries:
        raise SteerHTTPError(409, f"vector {r.name!r} exists; pass replace=true to overwrite",
                             "name")
    replacing = r.name in reg.entries
    if path is not None:
        real = reg.is_allowed(path)
        try:
            ok = real is not None and real.is_file()
        except OSError:  # e.g. a name too long for the file system
            ok = False
        if real is None or not ok:
            raise SteerHTTPError(400, f"{path!r} is not a file inside an allowed vector "
                                 "directory", "path")
        try:
            v = load_vector(real)
        except SteeringVectorError as e:
            raise SteerHTTPError(400, f"not a valid vector file: "
                                 f"{getattr(e, 'problem', None) or e}", "path") from e
        except Exception as e:
            raise SteerHTTPError(400, f"not a valid vector file ({type(e).__name__})",
                                 "path") from e
        _check_against_model(v, ctx, r.layers, "path")
        entry = _commit(ctx, r, real, None)
        digest, action = audit.file_digest(real), "replace" if replacing else "register"
    else:
        assert data is not None
        try:
            upload_dir = reg.ensure_upload_dir()
            with temp_file(upload_dir / uploads.upload_temp_name()) as tmp:
                write_durable(tmp, data)
                fmt = _parsed_upload(ctx, tmp, r.layers, data_field)
                final = upload_dir / uploads.stored_name(r.name, fmt)
                entry = _commit(ctx, r, final, lambda: publish(tmp, final))
        except OSError as e:   # creating or writing the file (_commit answers its own)
            raise SteerHTTPError(500, f"cannot store the upload ({e.strerror})") from e
        digest, action = audit.bytes_digest(data), "replace" if replacing else "upload"
    return Registered({**vector_info(ctx, entry), "persisted": reg.persistent}, action, digest)


def _unregister(ctx: ServerContext, name: str) -> RegistryEntry:
    try:
        return ctx.registry.unregister(name)
    except OSError as e:  # the overlay could not be written: nothing was removed
        raise SteerHTTPError(500, f"cannot persist the registry ({e.strerror})") from e


# -- routes ----------------------------------------------------------------------------
@router.get("/v1/steering/vectors", dependencies=[Depends(require_api_key)])
async def list_vectors(request: Request) -> JSONResponse:
    ctx = context(request)
    entries = list(ctx.registry.entries.values())
    data = await asyncio.to_thread(lambda: [vector_info(ctx, e) for e in entries])
    return respond({"object": "list", "data": data,
                  "model": {"num_layers": ctx.num_layers, "hidden_size": ctx.hidden_size},
                  "persistent": ctx.registry.persistent})


@router.get("/v1/steering/vectors/{name}", dependencies=[Depends(require_api_key)])
async def get_vector(name: str, request: Request) -> JSONResponse:
    ctx = context(request)
    entry = ctx.registry.entries.get(name)
    if entry is None:
        raise SteerHTTPError(404, f"unknown vector {name!r}", "name")
    return respond(await asyncio.to_thread(vector_info, ctx, entry))


def _upload_action(request: Request) -> str:
    """What a refused registration asked for (the body is not read for a refused caller)."""
    replace = request.query_params.get("replace", "").lower() in ("true", "1")
    return "replace" if replace else "upload"


@router.post("/v1/steering/vectors")
async def register_vector(request: Request,
                          caller: Annotated[Caller, Depends(require_admin(_upload_action))]
                          ) -> JSONResponse:
    with audited(_upload_action(request), caller, request.query_params.get("name")) as rec:
        return await _register_vector(request, rec)


async def _register_vector(request: Request, rec: dict[str, Any]) -> JSONResponse:
    ctx = context(request)
    require_shared(ctx)
    limit = ctx.registry.max_upload_bytes
    is_json = request.headers.get("content-type", "").split(";")[0].strip().lower() \
        == "application/json"
    if is_json:
        raw = await read_body(request, limit * 4 // 3 + 65536)  # base64 + JSON overhead
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise SteerHTTPError(400, "malformed JSON", "body") from None
        if not isinstance(body, dict):
            raise SteerHTTPError(400, "must be a JSON object", "body")
        unknown = sorted(str(k) for k in body if k not in _JSON_KEYS)
        if unknown:
            raise SteerHTTPError(400, f"unknown field (known: {', '.join(sorted(_JSON_KEYS))})",
                                 unknown[0])
        params = body
        if ("path" in body) == ("data" in body):
            raise SteerHTTPError(400, "give exactly one of 'path' or 'data' (base64)", "path")
        path, data = body.get("path"), None
        if path is not None and (not isinstance(path, str) or not path or "\x00" in path):
            raise SteerHTTPError(400, "must be a non-empty string", "path")
        if "data" in body:
            if not isinstance(body["data"], str):
                raise SteerHTTPError(400, "must be a base64 string", "data")
            try:
                data = base64.b64decode(body["data"], validate=True)
            except (binascii.Error, ValueError):
                raise SteerHTTPError(400, "is not valid base64", "data") from None
            if len(data) > limit:
                raise SteerHTTPError(413, f"vector larger than the upload limit of {limit} "
                                     "bytes", "data")
    else:
        q = request.query_params
        unknown = sorted(k for k in q if k not in _QUERY_KEYS)
        if unknown:
            raise SteerHTTPError(400, "unknown query parameter (known: "
                                 f"{', '.join(sorted(_QUERY_KEYS))})", unknown[0])
        repeated = sorted(k for k in q if len(q.getlist(k)) > 1)
        if repeated:  # which one would count is a guess: refuse
            raise SteerHTTPError(400, "given more than once", repeated[0])
        params = dict(q)
        if "name" not in params:
            raise SteerHTTPError(400, "required (as a query parameter with a raw file body)",
                                 "name")
        _name(params["name"])  # refuse before reading the body
        data, path = await read_body(request, limit), None
        if not data:
            raise SteerHTTPError(400, "empty body: send the safetensors or GGUF file", "body")
    rec["vector"] = params.get("name") if isinstance(params.get("name"), str) else None
    # query parameters are text; a JSON body has JSON types
    r = parse_registration(params, ctx.num_layers, text=not is_json)
    done = await asyncio.to_thread(register, ctx, r, data, path, "data" if is_json else "body")
    rec.update(action=done.action, digest=done.digest, status=201)
    return respond(done.info, 201)


@router.delete("/v1/steering/vectors/{name}")
async def delete_vector(name: str, request: Request,
                        caller: Annotated[Caller, Depends(require_admin("delete"))]
                        ) -> JSONResponse:
    with audited("delete", caller, name) as rec:
        ctx = context(request)
        require_shared(ctx)
        try:
            old = await asyncio.to_thread(_unregister, ctx, name)
        except KeyError:
            raise SteerHTTPError(404, f"unknown vector {name!r}", "name") from None
        rec["digest"] = await asyncio.to_thread(audit.file_digest, old.path)
        return respond({"id": name, "object": "steering.vector", "deleted": True})
