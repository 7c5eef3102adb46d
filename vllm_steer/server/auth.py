"""Who may call what: inference keys, admin keys, and the role each route needs.

Keys (bearer tokens) and where they come from:

- vLLM's ``--api-key`` values (else ``VLLM_API_KEY``): **inference** keys;
- ``VLLMSTEER_ADMIN_KEY`` (``vllm-steer serve --steering-admin-key KEY``): an **admin** key;
- ``VLLMSTEER_KEYS_FILE`` (``vllm-steer serve --steering-keys FILE``): keys with ids and
  roles, YAML or JSON::

      keys:
        - {id: ops, role: admin, sha256: "<hex sha256 of the key>"}
        - {id: web-frontend, role: inference, key: "sk-..."}

Roles: ``admin`` may do everything; ``inference`` may use the model (completions,
probes), read the registry and the stats. Only an admin key may upload, replace, delete,
train and trigger a store collection (``ADMIN``). The rules:

- an inference route needs a known key (any role) when inference is guarded (vLLM runs
  with ``--api-key``): no key or an unknown one is 401;
- an admin route, once an admin key is configured, needs an admin key: no key or an
  unknown one is 401, a known key without the role is 403. Without an admin key the
  admin routes follow the inference rule, as before roles existed (``vllm-steer serve``
  says so at start).

vLLM's own ``--api-key`` middleware, which guards ``/v1`` before any route runs, also
accepts the admin and file keys (``vllm_adapter.openai_requests.install_auth``), so an
admin key works for inference too. A key is never logged: callers are named by their
``id`` (file keys), ``env-admin`` or ``api-key-<first 8 hex of its sha256>``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vllm_steer import envvars

INFERENCE = "inference"
ADMIN = "admin"
ROLES = (INFERENCE, ADMIN)
#: The id of the key given in ``VLLMSTEER_ADMIN_KEY``.
ENV_ADMIN_ID = "env-admin"
_FILE_KEYS = {"keys"}
_ENTRY_KEYS = {"id", "role", "key", "sha256"}


class KeyConfigError(ValueError):
    """A keys file or key variable that cannot be used; the message names it."""


@dataclass(frozen=True)
class ApiKey:
    """A key the server knows: its id (safe to log), role and the sha256 of its text."""

    id: str
    role: str
    digest: bytes = field(repr=False)


@dataclass(frozen=True)
class Caller:
    """Who made a request: the key's id (None without a key) and its role."""

    key_id: str | None
    role: str | None


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def fingerprint(key: str) -> str:
    """A loggable name for a key that has no id."""
    return "api-key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header (None if absent or malformed)."""
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    return value if scheme.lower() == "bearer" and value else None


@dataclass(frozen=True)
class KeyRing:
    """Every key the server knows, and whether inference is guarded."""

    keys: tuple[ApiKey, ...] = ()
    #: vLLM runs with ``--api-key``: inference needs a key.
    inference_guarded: bool = False

    @property
    def admin_configured(self) -> bool:
        return any(k.role == ADMIN for k in self.keys)

    def match(self, token: str | None) -> ApiKey | None:
        """The key whose text is ``token`` (constant-time over every key), or None."""
        if not token:
            return None
        digest = key_digest(token)
        found = None
        for k in self.keys:
            if secrets.compare_digest(digest, k.digest):
                found = k
        return found

    def with_vllm_keys(self, vllm_keys: Iterable[str]) -> KeyRing:
        """This ring plus vLLM's ``--api-key`` values as inference keys."""
        extra = tuple(ApiKey(fingerprint(k), INFERENCE, key_digest(k)) for k in vllm_keys if k)
        return KeyRing(self.keys + extra, self.inference_guarded or bool(extra))


def _entry(raw: Any, where: str) -> ApiKey:
    if not isinstance(raw, dict):
        raise KeyConfigError(f"{where}: must be a mapping with id, role and key or sha256")
    unknown = sorted(str(k) for k in raw if k not in _ENTRY_KEYS)
    if unknown:
        raise KeyConfigError(f"{where}.{unknown[0]}: unknown field (known: "
                             f"{', '.join(sorted(_ENTRY_KEYS))})")
    kid, role = raw.get("id"), raw.get("role")
    if not isinstance(kid, str) or not kid.strip():
        raise KeyConfigError(f"{where}.id: required, a non-empty string")
    if role not in ROLES:
        raise KeyConfigError(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
    key, sha = raw.get("key"), raw.get("sha256")
    if (key is None) == (sha is None):
        raise KeyConfigError(f"{where}: give exactly one of 'key' or 'sha256'")
    if key is not None:
        if not isinstance(key, str) or len(key) < 8 or any(c.isspace() for c in key):
            raise KeyConfigError(f"{where}.key: must be a string of at least 8 characters "
                                 "without spaces")
        return ApiKey(kid, role, key_digest(key))
    if not isinstance(sha, str) or len(sha) != 64:
        raise KeyConfigError(f"{where}.sha256: must be 64 hex digits")
    try:
        return ApiKey(kid, role, bytes.fromhex(sha))
    except ValueError:
        raise KeyConfigError(f"{where}.sha256: must be 64 hex digits") from None


def read_keys_file(path: str | os.PathLike[str]) -> tuple[ApiKey, ...]:
    """The keys of a keys file (see the module docstring)."""
    p = Path(path).expanduser()
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KeyConfigError(f"{envvars.KEYS_FILE}={p}: cannot read ({e})") from e
    if not isinstance(raw, dict) or set(raw) - _FILE_KEYS or not isinstance(raw.get("keys"),
                                                                              list):
        raise KeyConfigError(f"{p}: expected a mapping with one field, 'keys' (a list)")
    keys = tuple(_entry(e, f"{p}: keys[{i}]") for i, e in enumerate(raw["keys"]))
    ids = [k.id for k in keys]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise KeyConfigError(f"{p}: key id {dup[0]!r} given more than once")
    return keys


def from_environment(environ: Mapping[str, str] | None = None) -> KeyRing:
    """The admin and file keys (``VLLMSTEER_ADMIN_KEY``, ``VLLMSTEER_KEYS_FILE``)."""
    keys: list[ApiKey] = []
    admin = envvars.get(envvars.ADMIN_KEY, environ)
    if admin is not None:
        admin = admin.strip()
        if len(admin) < 8 or any(c.isspace() for c in admin):
            raise KeyConfigError(f"{envvars.ADMIN_KEY}: must be at least 8 characters "
                                 "without spaces")
        keys.append(ApiKey(ENV_ADMIN_ID, ADMIN, key_digest(admin)))
    path = envvars.get(envvars.KEYS_FILE, environ)
    if path is not None:
        keys.extend(read_keys_file(path))
    digests = [k.digest for k in keys]
    if len(set(digests)) != len(digests):
        raise KeyConfigError("the same key is given twice (admin key and keys file)")
    return KeyRing(tuple(keys))


def check_inference_guard(ring: KeyRing) -> None:
    """Refuse a keys file with inference keys on a server whose inference is open: vLLM
    only checks keys on ``/v1`` when it runs with ``--api-key``, so those keys would
    guard nothing there."""
    if ring.inference_guarded:
        return
    if any(k.role == INFERENCE for k in ring.keys):
        raise KeyConfigError(f"{envvars.KEYS_FILE} lists inference keys, but vLLM runs "
                             "without --api-key, so /v1 would answer requests without "
                             "any key; start it with --api-key (every --api-key value is "
                             "an inference key too)")


def describe(ring: KeyRing) -> str:
    """One line for the log at start: what is guarded, by which keys (ids only)."""
    admins = [k.id for k in ring.keys if k.role == ADMIN]
    if not admins:
        return ("no steering admin key: every caller that may use the model may also "
                "upload, replace, delete and train vectors (set --steering-admin-key or "
                f"{envvars.ADMIN_KEY})")
    n = sum(k.role == INFERENCE for k in ring.keys)
    how = (f"{n} inference keys" if ring.inference_guarded else
           "inference open (no --api-key)")
    return f"steering admin keys {admins}; {how}"
