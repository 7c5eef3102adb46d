"""Resolution of a parsed spec against the registry and the served model (frontend side).

The result is what the workers need and nothing else: the program (``steering.program``:
vectors by content id in the store, with ops and layers), a token-selection rule in
canonical absolute-position form, and the program's digest. ``prompt``/``generated``
become ``all`` with an end/start position equal to the prompt length, so that a later
request replaying the same tokens with an explicit ``start_position`` produces the same
cache salt and shares the prefix cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_steer import envvars
from vllm_steer.steering.condition import ConditionDefaults, ConditionRef
from vllm_steer.steering.options import DEFAULT_MAX_PROJECTIONS
from vllm_steer.steering.program import Part, Program, compose
from vllm_steer.steering.registry import Registry
from vllm_steer.steering.spec import SpecError, SteeringSpec
from vllm_steer.steering.store import VectorStore, content_id, default_store_root, encode
from vllm_steer.steering.values import check_op_fields
from vllm_steer.steering.wire import (
    NO_END,
    WIRE_VERSION,
    WireCondition,
    WireGate,
    WirePart,
    WireSteering,
    WireVector,
)
from vllm_steer.thinking import markers_for
from vllm_steer.vector import SteeringVector, SteeringVectorError
from vllm_steer.vector import load as load_vector

_COMPOSED_CACHE = 4096
#: Inline vectors kept parsed (by content), per process.
_INLINE_CACHE = 64


def inline_limit(environ: dict[str, str] | None = None) -> int | None:
    """``$VLLMSTEER_INLINE_VECTOR_MAX_BYTES`` (bytes, >= 1), else None (inline vectors off)."""
    raw = envvars.get(envvars.INLINE_VECTOR_MAX_BYTES, environ)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{envvars.INLINE_VECTOR_MAX_BYTES}={raw!r}: must be a number of "
                         "bytes >= 1")
    return value


@dataclass(frozen=True)
class ResolvedSteering:
    """A request's steering in canonical form.

    ``program``: the vectors by content id with ops and layers (``steering.program``);
    ``hidden``: the model's hidden size; ``mode``: ``all | thinking | answer``; positions
    ``start <= pos < end`` (``end == -1``: unbounded); ``think_start_ids`` /
    ``think_end_ids``: marker token ids (only used by thinking/answer); ``store``: root of
    the vector store; ``inline``: vector contents to send with the request (inline
    transport), ``{content id: (layers, float32 bytes)}``.
    """

    program: Program
    hidden: int
    mode: str
    start: int
    end: int
    think_start_ids: tuple[int, ...] = ()
    think_end_ids: tuple[int, ...] = ()
    store: str = ""
    inline: dict[str, tuple[tuple[int, ...], bytes]] = field(default_factory=dict)
    #: Conditional steering (``steering.condition``), else None.
    gate: ResolvedGate | None = None

    @property
    def digest(self) -> str:
        """The program's content hash: the worker's slot key."""
        return self.program.digest

    @property
    def cache_salt(self) -> str:
        """Hash of everything that changes which KV values a token gets (for a gated
        request also the other programs, the split, and the condition or the decision:
        requests that share a salt and a token prefix past the split computed that prefix
        under the same decision)."""
        h = hashlib.sha256(self.digest.encode())
        h.update(repr((self.mode, self.start, self.end, self.think_start_ids,
                       self.think_end_ids if self.mode != "all" else ())).encode())
        if self.gate is not None:
            h.update(self.gate.salt_key().encode())
        return "vllm-steer:" + h.hexdigest()[:32]

    def to_wire(self) -> WireSteering:
        """The typed struct that travels (as builtins) in ``extra_args[WIRE_KEY]``."""
        return WireSteering(
            version=WIRE_VERSION,
            digest=self.digest,
            hidden=self.hidden,
            parts=tuple(WirePart(content=p.content, op=p.op, param=p.param, layers=p.layers)
                        for p in self.program.parts),
            normalize=self.program.normalize,
            mode=self.mode,
            start=self.start,
            end=self.end,
            think_start_ids=tuple(self.think_start_ids),
            think_end_ids=tuple(self.think_end_ids),
            store=self.store,
            inline=tuple(WireVector(content=cid, layers=layers, data=data)
                         for cid, (layers, data) in self.inline.items()),
            gate=None if self.gate is None else self.gate.to_wire(),
        )


@dataclass(frozen=True)
class ResolvedCondition:
    """One condition with its file's defaults applied: the direction's store ``content``
    id, ``layer``, ``aggregate``, ``threshold``, ``compare`` and the ``label`` reports use."""

    content: str
    layer: int
    aggregate: str
    threshold: float
    compare: str
    label: str


@dataclass(frozen=True)
class ResolvedGate:
    """The gated part of a request: ``conditions`` combined by ``mode`` (or a replay's
    ``decision``), the ``else_program`` and ``prompt_program`` (None: no steering), the
    ``split`` (prompt positions are below it) and the ``report`` key (the request id the
    caller collects the scores by)."""

    conditions: tuple[ResolvedCondition, ...]
    mode: str
    decision: bool | None
    else_program: Program | None
    prompt_program: Program | None
    split: int
    report: str = ""
    choices: int = 1

    @property
    def needs_whole_prompt(self) -> bool:
        """A ``mean`` condition reads every prompt token: no prefix-cache hit may skip one."""
        return self.decision is None and any(c.aggregate == "mean" for c in self.conditions)

    def salt_key(self) -> str:
        conds = [(c.content, c.layer, c.aggregate, struct.pack("<d", c.threshold).hex(),
                  c.compare) for c in self.conditions]
        return repr(("gate", conds, self.mode, self.decision,
                     None if self.else_program is None else self.else_program.digest,
                     None if self.prompt_program is None else self.prompt_program.digest,
                     self.split))

    def to_wire(self) -> WireGate:
        def parts(p: Program | None) -> tuple[WirePart, ...]:
            return () if p is None else tuple(
                WirePart(content=x.content, op=x.op, param=x.param, layers=x.layers)
                for x in p.parts)

        return WireGate(
            conditions=tuple(WireCondition(content=c.content, layer=c.layer,
                                           aggregate=c.aggregate, threshold=c.threshold,
                                           compare=c.compare, label=c.label)
                             for c in self.conditions),
            mode=self.mode, decision=-1 if self.decision is None else int(self.decision),
            else_digest="" if self.else_program is None else self.else_program.digest,
            else_parts=parts(self.else_program),
            prompt_digest="" if self.prompt_program is None else self.prompt_program.digest,
            prompt_parts=parts(self.prompt_program), split=self.split, report=self.report,
            choices=self.choices)


@dataclass(frozen=True)
class _File:
    """A loaded vector file: its identity, the parsed vector, numpy directions, content id."""

    key: tuple[str, int, int]
    vector: SteeringVector
    dirs: dict[int, np.ndarray]
    content: str
    _encoded: list[tuple[tuple[int, ...], bytes]] = field(default_factory=list, repr=False)

    def encoded(self) -> tuple[tuple[int, ...], bytes]:
        """``store.encode(dirs)``, computed once (the inline transport sends it with every
        request; re-encoding 2.6 MB per request cost 3 ms)."""
        if not self._encoded:
            self._encoded.append(encode(self.dirs))
        return self._encoded[0]


@dataclass(frozen=True)
class _Defaults:
    op: str = "add"
    scale: float = 1.0
    strength: float = 1.0
    value: float = 0.0
    layers: tuple[int, ...] | None = None


class Resolver:
    """Turns ``SteeringSpec`` into ``ResolvedSteering`` for one served model. Thread-safe.

    ``max_projections``: the engine's ablate/clamp capacity per layer (0: add only);
    ``transport``: ``store`` (vectors written once to the content-addressed store the
    workers read) or ``inline`` (sent with every request); ``store_root``: the store's
    directory (default under the data home); ``inline_max_bytes``: the largest vector a
    request may carry inline (``data``; None: refused, ``inline_limit``).
    """

    def __init__(self, registry: Registry, *, num_layers: int, hidden_size: int,
                 tokenizer: Any = None, thinking_supported: bool = True,
                 max_projections: int = DEFAULT_MAX_PROJECTIONS, transport: str = "store",
                 store_root: str | Path | None = None,
                 inline_max_bytes: int | None = None) -> None:
        self.registry = registry
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.tokenizer = tokenizer
        self.thinking_supported = thinking_supported
        self.max_projections = max_projections
        self.transport = transport
        #: Largest inline vector (``data``) a spec may carry; None: inline vectors refused.
        self.inline_max_bytes = inline_max_bytes
        self._inline: OrderedDict[str, _File] = OrderedDict()
        self.store = VectorStore(Path(store_root) if store_root else default_store_root())
        self._lock = threading.Lock()
        self._files: dict[tuple[str, int, int], _File] = {}   # (path, mtime_ns, size) -> file
        # Programs whose composition was checked (by digest): repeated specs skip composing.
        self._checked: OrderedDict[str, None] = OrderedDict()
        self._markers: dict[str, tuple[int, ...]] = {}
        self._model_markers = markers_for(tokenizer)

    # -- vectors ---------------------------------------------------------------------
    def _load_file(self, path: Path, where: str) -> _File:
        try:
            st = path.stat()
        except OSError as e:
            raise SpecError(where, f"vector file {path} cannot be read ({e.strerror})") from e
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._files.get(key)
        if hit is None:
            try:
                v = load_vector(path)
            except SteeringVectorError as e:
                raise SpecError(where, str(e)) from e
            dirs = {k: t.numpy().astype(np.float32, copy=False) for k, t in v.directions.items()}
            # Written before any request naming it is admitted; immutable afterwards.
            cid = (self.store.put(dirs) if self.transport == "store"
                   else content_id(dirs))
            hit = _File(key, v, dirs, cid)
            with self._lock:
                self._files[key] = hit
        return hit

    def load_vector_file(self, path: Path, where: str) -> SteeringVector:
        """The parsed vector at ``path`` (cached by path, mtime and size)."""
        return self._load_file(path, where).vector

    def forget_file(self, path: Path) -> None:
        """Drop ``path``'s cached vector (a replaced file is read again; its old content
        stays in the store for requests already admitted)."""
        p = str(path)
        with self._lock:
            for key in [k for k in self._files if k[0] == p]:
                del self._files[key]

    def registered_contents(self) -> set[str]:
        """Content ids of every registry entry's vector (files loaded, and cached, as a
        request would); entries whose file cannot be read name nothing."""
        out = set()
        for entry in list(self.registry.entries.values()):
            try:
                out.add(self._load_file(entry.path, "name").content)
            except SpecError:
                continue
        return out

    def _inline_file(self, data: str, where: str) -> _File:
        """An inline vector (base64 file), parsed once per content (bounded cache)."""
        limit = self.inline_max_bytes
        if limit is None:
            raise SpecError(where, "inline vectors are not enabled on this server (the "
                            "operator allows them with `vllm-steer serve "
                            "--steering-inline-vectors BYTES` or "
                            f"{envvars.INLINE_VECTOR_MAX_BYTES})")
        if len(data) > (limit + 2) // 3 * 4 + 4:
            raise SpecError(where, f"inline vector larger than this server's limit of {limit} "
                            "bytes")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise SpecError(where, "is not valid base64") from None
        if len(raw) > limit:
            raise SpecError(where, f"inline vector of {len(raw)} bytes; this server's limit "
                            f"is {limit}")
        sha = hashlib.sha256(raw).hexdigest()
        with self._lock:
            hit = self._inline.get(sha)
            if hit is not None:
                self._inline.move_to_end(sha)
                return hit
        with tempfile.TemporaryDirectory(prefix="vllm-steer-inline-") as d:
            tmp = Path(d) / "vector"
            tmp.write_bytes(raw)
            try:
                v = load_vector(tmp)
            except SteeringVectorError as e:
                raise SpecError(where, f"not a valid vector file: "
                                f"{getattr(e, 'problem', None) or e}") from None
            except Exception as e:  # untrusted bytes: any parser failure is the client's
                raise SpecError(where, f"not a valid vector file ({type(e).__name__})") from None
        try:
            v.validate(hidden_size=self.hidden_size, num_layers=self.num_layers)
        except SteeringVectorError as e:
            raise SpecError(where, f"vector does not fit the served model: {e}") from None
        dirs = {k: t.numpy().astype(np.float32, copy=False) for k, t in v.directions.items()}
        cid = self.store.put(dirs) if self.transport == "store" else content_id(dirs)
        hit = _File(("inline:" + sha, 0, len(raw)), v, dirs, cid)
        with self._lock:
            self._inline[sha] = hit
            while len(self._inline) > _INLINE_CACHE:
                self._inline.popitem(last=False)
        return hit

    def vector_for(self, ref_name: str | None, ref_path: str | None, where: str,
                   ref_data: str | None = None) -> tuple[_File, _Defaults]:
        """The vector a spec entry names and the registry's defaults for it."""
        if ref_data is not None:
            return self._inline_file(ref_data, f"{where}.data"), _Defaults()
        if ref_name is not None:
            entry = self.registry.entries.get(ref_name)
            if entry is None:
                known = ", ".join(sorted(self.registry.entries)) or "none registered"
                raise SpecError(f"{where}.name", f"unknown vector {ref_name!r} (known: {known})")
            defaults = _Defaults(op=entry.op, scale=entry.scale, strength=entry.strength,
                                 value=entry.value, layers=entry.layers)
            return self._load_file(entry.path, f"{where}.name"), defaults
        assert ref_path is not None
        real = self.registry.is_allowed(ref_path)
        if real is None:
            raise SpecError(f"{where}.path",
                            f"{ref_path!r} is not inside an allowed vector directory")
        return self._load_file(real, f"{where}.path"), _Defaults()

    def program(self, spec: SteeringSpec, prefix: str = "steering.") -> Program:
        """The spec as a program, validated against the vectors, the model and the engine's
        capacity (composed once per distinct program; a repeated spec costs a few ``stat``
        calls and a hash)."""
        return self._program(spec, prefix)[0]

    def _program(self, spec: SteeringSpec, prefix: str, key: str = "vectors",
                 files: dict[str, _File] | None = None) -> tuple[Program, dict[str, _File]]:
        """The program of ``spec.<key>`` (``vectors``, ``else_vectors``, ``prompt_vectors``)
        and the loaded files its parts name (by content id, added to ``files``): the
        request's own references, so a file forgotten meanwhile by another thread changes
        nothing."""
        parts = []
        files = {} if files is None else files
        for i, ref in enumerate(getattr(spec, key)):
            where = f"{prefix}{key}[{i}]"
            f, d = self.vector_for(ref.name, ref.path, where, ref.data)
            if f.vector.hidden_size != self.hidden_size:
                raise SpecError(where, f"vector hidden size {f.vector.hidden_size} does not "
                                       f"match the served model's hidden size {self.hidden_size}")
            op = ref.op or d.op
            check_op_fields(op, scale=ref.scale, strength=ref.strength, value=ref.value,
                            where=where)
            layers = ref.layers if ref.layers is not None else d.layers
            if layers is None:
                layers = tuple(f.vector.layers)
            bad = [x for x in layers if x >= self.num_layers]
            if bad:
                raise SpecError(f"{where}.layers", f"layer {bad[0]} out of range: the model has "
                                f"{self.num_layers} layers (0..{self.num_layers - 1})")
            missing = [x for x in layers if x not in f.dirs]
            if missing:
                raise SpecError(f"{where}.layers", f"vector has no direction for layers "
                                                   f"{missing} (has {f.vector.layers})")
            param = {"add": ref.scale if ref.scale is not None else d.scale,
                     "ablate": ref.strength if ref.strength is not None else d.strength,
                     "clamp": ref.value if ref.value is not None else d.value}[op]
            parts.append(Part(f.content, op, float(param), tuple(sorted(layers))))
            files[f.content] = f
        if self.transport == "store":
            # Renew each vector's lease in the store (or write it again if a collector
            # took it) before the request is admitted: the workers read it by id.
            for cid, f in files.items():
                self.store.ensure(cid, f.dirs)
        program = Program(tuple(parts), spec.normalize)
        digest = program.digest
        with self._lock:
            if digest in self._checked:
                self._checked.move_to_end(digest)
                return program, files
        compose(program, lambda cid: files[cid].dirs, self.hidden_size, self.max_projections,
                where=f"{prefix}{key}")
        with self._lock:
            self._checked[digest] = None
            while len(self._checked) > _COMPOSED_CACHE:
                self._checked.popitem(last=False)
        return program, files

    # -- conditions ------------------------------------------------------------------
    def condition(self, ref: ConditionRef, where: str, files: dict[str, _File]
                  ) -> ResolvedCondition:
        """``ref`` with its file's defaults, checked against the model (``SpecError``)."""
        f, _ = self.vector_for(ref.name, ref.path, where)
        if f.vector.hidden_size != self.hidden_size:
            raise SpecError(where, f"condition vector hidden size {f.vector.hidden_size} does "
                                   f"not match the served model's hidden size {self.hidden_size}")
        d = ConditionDefaults.from_extra(f.vector.metadata.extra, where)
        layer = ref.layer if ref.layer is not None else d.layer
        threshold = ref.threshold if ref.threshold is not None else d.threshold
        missing = [k for k, v in (("layer", layer), ("threshold", threshold)) if v is None]
        if missing:
            raise SpecError(f"{where}.{missing[0]}", "required: the condition vector file has "
                            f"no trained default for it (give '{missing[0]}')")
        assert layer is not None and threshold is not None
        if layer >= self.num_layers:
            raise SpecError(f"{where}.layer", f"layer {layer} out of range: the model has "
                            f"{self.num_layers} layers (0..{self.num_layers - 1})")
        v = f.dirs.get(layer)
        if v is None:
            raise SpecError(f"{where}.layer", f"the condition vector has no direction for "
                                              f"layer {layer} (has {f.vector.layers})")
        if not float(np.linalg.norm(v.astype(np.float64))) > 1e-12:
            raise SpecError(f"{where}.layer", f"the condition direction at layer {layer} is "
                                              "zero")
        files[f.content] = f
        return ResolvedCondition(f.content, int(layer), ref.aggregate or d.aggregate or "mean",
                                 float(threshold), ref.compare or d.compare or "above",
                                 ref.label)

    def _gate(self, spec: SteeringSpec, canon: SteeringSpec, files: dict[str, _File],
              report: str, choices: int) -> ResolvedGate:
        conds: tuple[ResolvedCondition, ...] = ()
        mode = "all"
        if spec.condition is not None:
            rule = spec.condition
            mode = rule.mode
            conds = tuple(self.condition(
                c, "steering.condition" if rule.single else f"steering.condition.{mode}[{i}]",
                files) for i, c in enumerate(rule.conditions))
        else_p = (self._program(spec, "steering.", "else_vectors", files)[0]
                  if spec.else_vectors else None)
        prompt_p = (self._program(spec, "steering.", "prompt_vectors", files)[0]
                    if spec.prompt_vectors else None)
        assert canon.split_position is not None
        return ResolvedGate(conds, mode, spec.decision, else_p, prompt_p, canon.split_position,
                            report if spec.decision is None else "", max(1, choices))

    # -- whole spec ------------------------------------------------------------------
    def resolve(self, spec: SteeringSpec, prompt_len: int, report: str = "",
                choices: int = 1) -> ResolvedSteering:
        """``spec`` for a prompt of ``prompt_len`` tokens; ``report``: the key a gated
        request's condition scores are collected by (its request id); ``choices``: its
        ``n``."""
        program, files = self._program(spec, "steering.")
        canon = spec.at_absolute_positions(prompt_len)
        gate = self._gate(spec, canon, files, report, choices) if spec.gated else None
        if gate is not None and self.transport == "store":
            for cid, f in files.items():
                self.store.ensure(cid, f.dirs)
        mode, start = canon.apply_to, canon.start_position
        end = NO_END if canon.end_position is None else canon.end_position
        ts: tuple[int, ...] = ()
        te: tuple[int, ...] = ()
        if mode in ("thinking", "answer"):
            if not self.thinking_supported:
                raise SpecError("steering.apply_to", f"{mode!r} needs the engine to run without "
                                "async scheduling (start it with --no-async-scheduling)")
            m_start, m_end = self.think_markers
            ts = self._marker_ids(spec.think_start or m_start, "steering.think_start")
            te = self._marker_ids(spec.think_end or m_end, "steering.think_end")
        inline: dict[str, tuple[tuple[int, ...], bytes]] = {}
        if self.transport == "inline":
            inline = {cid: f.encoded() for cid, f in files.items()}
        return ResolvedSteering(program, self.hidden_size, mode, start, end, ts, te,
                                str(self.store.root), inline, gate)

    @property
    def think_markers(self) -> tuple[str, str]:
        """The registry's markers, else the served model's own, else ``<think>``/``</think>``."""
        return self.registry.think_markers or self._model_markers

    def _marker_ids(self, marker: str, where: str) -> tuple[int, ...]:
        if self.tokenizer is None:
            raise SpecError(where, "thinking/answer modes need the engine's tokenizer")
        ids = self._markers.get(marker)
        if ids is None:
            ids = tuple(int(i) for i in self.tokenizer.encode(marker, add_special_tokens=False))
            if len(self._markers) < 1024:
                self._markers[marker] = ids
        if not ids:
            raise SpecError(where, f"marker {marker!r} tokenizes to nothing")
        return ids

