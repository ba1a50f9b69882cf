"""API keys, the caller's identity, and who may see what.

Keys are Bearer tokens (``Authorization: Bearer <key>``). The service never holds a key: it
reads *entries* from an environment variable and/or a secret file (``auth:`` in AppArgs),
one per line (or comma-separated)::

    <name>:<scope>:sha256:<hex digest of the key>          scope: user | admin

``python -m serve_app.auth new NAME [--admin]`` prints a fresh key and its entry. A request's
key is hashed and looked up; the entry's name owns every job, experiment and batch the
request creates. A ``user`` sees and changes only its own (another key's id answers 404, as
an unknown id does); ``admin`` sees and cleans up everything.

With no entries at all the service runs keyless, for one machine: it must bind a loopback
address (:func:`check_bind`), every caller is the local admin, and it says so at start-up.

Webhook deliveries are signed with a secret derived from the key
(:func:`webhook_secret`: HMAC-SHA256(key, ``"recon3d-webhook-v1"``)), so the holder of a key
can verify its own webhooks and nobody else can forge them.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("recon3d.serve")

#: Label of the webhook-secret derivation (versioned so it can change without ambiguity).
WEBHOOK_SECRET_LABEL = b"recon3d-webhook-v1"
#: Name of the caller when no keys are configured (loopback only).
LOCAL_ADMIN = "local"
#: Paths any caller may reach without a key. A trailing ``*`` matches a prefix.
DEFAULT_OPEN_PATHS = ("/health", "/ready", "/", "/ui", "/ui/*", "/static/*", "/favicon.ico", "/docs", "/openapi.json")

_ENTRY_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._@-]{0,63}):(?P<scope>user|admin):sha256:(?P<hex>[0-9a-f]{64})$"
)


class AuthSettings(BaseModel):
    """``auth:`` in serve_config.yaml's args."""

    model_config = ConfigDict(extra="forbid")

    api_keys_env: str | None = Field(
        "RECON3D_API_KEYS", description="Environment variable holding key entries (name:scope:sha256:<hex>)."
    )
    api_keys_file: str | None = Field(
        None, description="Secret file holding key entries, one per line (a mounted Kubernetes secret, ...)."
    )
    open_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_OPEN_PATHS),
        description="Paths reachable without a key ('*' suffix: prefix). Add '/metrics' to open a metrics route.",
    )


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``name`` owns what it creates; ``admin`` sees everything."""

    name: str
    admin: bool = False


#: The caller of an open path without a key: owns nothing, sees nothing.
ANONYMOUS = Principal("", admin=False)


class AuthConfigError(ValueError):
    """A key entry is malformed, or the bind address needs keys that are not configured."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def entry_for(name: str, key: str, scope: Literal["user", "admin"] = "user") -> str:
    """The configuration entry of ``key`` (what goes in RECON3D_API_KEYS or the secret file)."""
    return f"{name}:{scope}:sha256:{hash_key(key)}"


def webhook_secret(key: str) -> str:
    """Hex HMAC secret that signs the webhooks of jobs submitted with ``key``."""
    return hmac.new(key.encode("utf-8"), WEBHOOK_SECRET_LABEL, hashlib.sha256).hexdigest()


def parse_entries(text: str, source: str) -> dict[str, Principal]:
    """key hash -> Principal of every entry in ``text`` (blank lines and ``#`` comments skipped)."""
    out: dict[str, Principal] = {}
    for raw in re.split(r"[\n,]", text):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _ENTRY_RE.match(line)
        if m is None:
            shown = line.split(":")[0][:40]
            raise AuthConfigError(
                f"{source}: entry {shown!r}... is not 'name:user|admin:sha256:<64 hex>'; "
                "make one with `python -m serve_app.auth new NAME`"
            )
        out[m["hex"]] = Principal(m["name"], m["scope"] == "admin")
    return out


def load_keys(settings: AuthSettings) -> dict[str, Principal]:
    """Every configured key hash -> Principal, from the environment variable and the secret file."""
    keys: dict[str, Principal] = {}
    if settings.api_keys_env and os.environ.get(settings.api_keys_env):
        keys.update(parse_entries(os.environ[settings.api_keys_env], f"${settings.api_keys_env}"))
    if settings.api_keys_file:
        path = Path(settings.api_keys_file)
        if not path.is_file():
            raise AuthConfigError(f"auth.api_keys_file {path} does not exist")
        keys.update(parse_entries(path.read_text(), str(path)))
    return keys


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str | None, keys: dict) -> None:
    """Refuse to serve a non-loopback address without keys (AuthConfigError); log the keyless mode."""
    if keys:
        logger.info("authentication: %d API key(s) configured; Bearer keys required", len(keys))
        return
    if not is_loopback(host):
        raise AuthConfigError(
            f"no API keys are configured and HTTP binds {host!r}: refusing to start, since anyone who can "
            "reach that address could read, cancel and delete every job. Either bind 127.0.0.1 "
            "(http_options.host in serve_config.yaml) or configure keys (auth.api_keys_env / "
            "auth.api_keys_file; `python -m serve_app.auth new NAME` makes one)."
        )
    logger.warning(
        "authentication: no API keys configured; serving keyless on loopback %s only (every local caller is admin)",
        host,
    )


def path_is_open(path: str, open_paths: list[str]) -> bool:
    for p in open_paths:
        if p.endswith("*") and path.startswith(p[:-1]):
            return True
        if path == p:
            return True
    return False


def principal_of(request) -> Principal:
    """The caller of a request that passed :class:`AuthMiddleware` (local admin when keyless)."""
    # An open path reached without a key carries no principal: it is nobody, not the admin.
    return request.scope.get("recon3d.principal") or ANONYMOUS


def bearer_key(request) -> str | None:
    """The raw Bearer key of a request, if it sent one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def can_access(principal: Principal, owner: str | None) -> bool:
    """Whether ``principal`` may see a resource owned by ``owner`` (None: created keyless or before keys)."""
    return principal.admin or (owner is not None and owner == principal.name)


def _unauthorized(scope, message: str) -> tuple[dict, bytes]:
    headers = dict(scope.get("headers") or [])
    rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
    body = json.dumps(
        {"error": {"code": "UNAUTHORIZED", "message": message, "details": {}}, "request_id": rid}
    ).encode()
    start = {
        "type": "http.response.start",
        "status": 401,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="recon3d"'),
            (b"x-request-id", rid.encode()),
        ],
    }
    return start, body


class AuthMiddleware:
    """Pure ASGI: checks the Bearer key of every request outside ``open_paths`` (401 UNAUTHORIZED).

    ``state_of()`` returns ``(keys, open_paths)``; with no keys every caller is the local admin.
    The caller's :class:`Principal` is put in ``scope["recon3d.principal"]``.
    """

    def __init__(self, app, state_of):
        self.app = app
        self.state_of = state_of

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        keys, open_paths = self.state_of()
        if not keys:
            scope["recon3d.principal"] = Principal(LOCAL_ADMIN, admin=True)
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        principal = None
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            digest = hashlib.sha256(token.strip()).hexdigest()
            principal = keys.get(digest)
        if principal is not None:
            scope["recon3d.principal"] = principal
            return await self.app(scope, receive, send)
        if path_is_open(scope.get("path", ""), open_paths):
            return await self.app(scope, receive, send)
        msg = "an API key is required: send 'Authorization: Bearer <key>'" if not header else "the API key is not valid"
        start, body = _unauthorized(scope, msg)
        await send(start)
        await send({"type": "http.response.body", "body": body})
        return None


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (from the controller), or None when it cannot be read."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        return ray.get(client._controller.get_http_config.remote(), timeout=30).host
    except Exception as e:  # an older/newer Serve without this call: treat as unknown (not loopback)
        logger.warning("cannot read Serve's HTTP host: %s", e)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_app.auth", description="Make an API key and its entry.")
    sub = p.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("new", help="print a fresh key and the entry to configure")
    new.add_argument("name")
    new.add_argument("--admin", action="store_true")
    a = p.parse_args(argv)
    key = "r3d_" + secrets.token_urlsafe(32)
    print(f"key:   {key}")
    print(f"entry: {entry_for(a.name, key, 'admin' if a.admin else 'user')}")
    print(f"webhook secret: {webhook_secret(key)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
