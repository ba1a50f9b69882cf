"""Webhook deliveries that cannot reach inside the service's network, signed for the receiver.

* :func:`check_webhook_url` (at submit time, 422 ``WEBHOOK_URL_REFUSED``) and
  :func:`resolve_public` (again at each delivery) resolve the host and refuse loopback, private,
  link-local (cloud metadata 169.254.169.254 included), multicast, reserved and unspecified
  addresses, unless the host or address is in ``webhooks.allow_hosts``.
* A delivery connects to the address it resolved and checked (pinned: a DNS answer that changes
  between the check and the connection cannot redirect it), sends the original Host header and
  TLS server name, follows no redirects, has one total deadline and reads at most
  ``max_response_bytes`` of the answer.
* Every delivery is signed: ``X-Recon3D-Signature: sha256=<hex>``, the HMAC-SHA256 of
  ``<X-Recon3D-Timestamp>.<raw body>`` with the job's webhook secret (see serve_app/auth.py:
  derived from the API key, so the key's holder can verify it; keyless, the service secret).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from . import errors as E

SIGNATURE_HEADER = "X-Recon3D-Signature"
TIMESTAMP_HEADER = "X-Recon3D-Timestamp"
#: Store key of the secret that signs webhooks of jobs submitted keyless (loopback mode).
SERVICE_SECRET_KEY = "service/webhook_secret"
#: Addresses refused even though ``ipaddress`` calls them global (cloud metadata services).
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})


class WebhookSettings(BaseModel):
    """``webhooks:`` in AppArgs."""

    model_config = ConfigDict(extra="forbid")

    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Host names, addresses or networks (CIDR) a webhook may reach although they are "
        "loopback/private (a receiver inside the cluster, tests on 127.0.0.1).",
    )
    deadline_s: float = Field(10.0, gt=0, le=120, description="Total seconds of one delivery attempt.")
    resolve_timeout_s: float = Field(5.0, gt=0, le=60, description="Seconds to resolve the host.")
    max_response_bytes: int = Field(65536, ge=0, description="Bytes of the receiver's answer read at most.")
    max_url_length: int = Field(2048, ge=16, description="Longest accepted webhook_url.")
    secret_env: str | None = Field(
        "RECON3D_WEBHOOK_SECRET",
        description="Environment variable with the secret of keyless jobs' webhooks; unset = a random "
        f"secret kept in the store at {SERVICE_SECRET_KEY}.",
    )


class WebhookRefusedError(E.ServiceError):
    """The webhook_url is not an http(s) URL, or it resolves to an address inside the network (HTTP 422)."""

    code = "WEBHOOK_URL_REFUSED"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``timestamp + "." + body`` with ``secret`` (what receivers recompute)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def service_secret(settings: WebhookSettings, store) -> str:
    """The secret of keyless jobs: from ``secret_env``, else one random secret persisted in the store."""
    if settings.secret_env and os.environ.get(settings.secret_env):
        return os.environ[settings.secret_env]
    try:
        return store.get(SERVICE_SECRET_KEY).decode()
    except KeyError:
        secret = secrets.token_hex(32)
        store.put(SERVICE_SECRET_KEY, secret.encode())
        return secret


def _allowed(host: str, addr: ipaddress._BaseAddress, allow: list[str]) -> bool:
    for entry in allow:
        if entry.lower() == host.lower():
            return True
        try:
            if addr in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def is_internal(addr: ipaddress._BaseAddress) -> bool:
    """Loopback, private, link-local, multicast, reserved, unspecified, metadata (IPv4-mapped too)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr in METADATA_ADDRESSES or not addr.is_global or addr.is_multicast


def _split(url: str, settings: WebhookSettings) -> tuple[str, str, int]:
    if not isinstance(url, str) or len(url) > settings.max_url_length or any(c.isspace() for c in url):
        raise E.InvalidRequestError("webhook_url must be an http(s) URL", details={"field": "webhook_url"})
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise E.InvalidRequestError("webhook_url is not a valid URL", details={"field": "webhook_url"}) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise E.InvalidRequestError(
            "webhook_url must be an http(s) URL with a host and no credentials", details={"field": "webhook_url"}
        )
    return parts.hostname, parts.scheme, port or (443 if parts.scheme == "https" else 80)


async def resolve_public(url: str, settings: WebhookSettings) -> str:
    """The address to connect to for ``url``: resolved, and refused (WebhookRefusedError) when any
    address the name resolves to is internal and not allow-listed."""
    host, _, port = _split(url, settings)
    try:
        infos = await asyncio.wait_for(
            asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM), settings.resolve_timeout_s
        )
    except (OSError, TimeoutError, UnicodeError) as e:
        raise WebhookRefusedError(
            f"webhook_url host {host!r} does not resolve: {e}", details={"field": "webhook_url", "host": host}
        ) from None
    addrs = list(dict.fromkeys(ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos))
    for addr in addrs:
        if is_internal(addr) and not _allowed(host, addr, settings.allow_hosts):
            raise WebhookRefusedError(
                f"webhook_url host {host!r} resolves to {addr}, an address inside the network; "
                "webhooks reach public addresses only (allow-list: webhooks.allow_hosts)",
                details={"field": "webhook_url", "host": host, "address": str(addr)},
            )
    if not addrs:
        raise WebhookRefusedError(f"webhook_url host {host!r} has no address", details={"field": "webhook_url"})
    return str(addrs[0])


async def check_webhook_url(url: str, settings: WebhookSettings) -> None:
    """Submit-time check (422 WEBHOOK_URL_REFUSED); the delivery checks again and pins the address."""
    await resolve_public(url, settings)


async def deliver(url: str, body: bytes, headers: dict[str, str], secret: str, settings: WebhookSettings) -> int:
    """POST ``body`` once to the pinned address of ``url``; returns the HTTP status.

    Raises WebhookRefusedError (address refused now), httpx.HTTPError or TimeoutError.
    """
    address = await resolve_public(url, settings)
    host, scheme, port = _split(url, settings)
    parts = urlsplit(url)
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    timestamp = str(int(time.time()))
    default_port = port == (443 if scheme == "https" else 80)
    all_headers = {
        **headers,
        "Host": host if default_port else f"{host}:{port}",
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }

    async def attempt() -> int:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            req = client.build_request(
                "POST", pinned, content=body, headers=all_headers, extensions={"sni_hostname": host}
            )
            r = await client.send(req, stream=True)
            try:
                read = 0
                async for chunk in r.aiter_raw():
                    read += len(chunk)
                    if read >= settings.max_response_bytes:
                        break  # the status is what counts; a receiver cannot make us read more
            finally:
                await r.aclose()
            return r.status_code

    return await asyncio.wait_for(attempt(), settings.deadline_s)


def webhook_body(rec) -> dict:
    """What the webhook of a job's terminal state POSTs: status, error, each model's status and quality, links."""
    return {
        "job_id": rec.job_id,
        "status": rec.status,
        "error": rec.error.model_dump() if rec.error else None,
        "models": {m: {"status": r.status, "quality": r.quality} for m, r in rec.runs.items()},
        "links": {"self": f"/jobs/{rec.job_id}", "download": f"/jobs/{rec.job_id}/download"},
    }


async def deliver_webhook(
    rec,
    *,
    attempts: int,
    backoff_s: float,
    settings: WebhookSettings,
    secret: str,
    post=None,
    sleep=asyncio.sleep,
) -> bool:
    """POST :func:`webhook_body`, signed, to ``rec.webhook.url`` until a 2xx or ``attempts`` tries, with a
    doubling delay; updates ``rec.webhook`` and returns whether it was delivered.

    ``post(url, body, headers, secret, settings) -> status`` sends one try (default :func:`deliver`, which
    re-checks the address each time; tests pass a fake). A refused address is never retried.
    """
    post = post or deliver
    wh = rec.webhook
    raw = json.dumps(webhook_body(rec), separators=(",", ":")).encode()  # signed exactly as sent
    delay = backoff_s
    while wh.attempts < attempts and not wh.delivered:
        wh.attempts += 1
        try:
            status = await post(wh.url, raw, {"x-recon3d-event": "job." + rec.status}, secret, settings)
            if status < 300:
                wh.delivered = True
                wh.last_error = None
                break
            wh.last_error = f"HTTP {status}"
        except WebhookRefusedError as e:  # the name now resolves inside the network: never retried
            wh.last_error = e.message
            break
        except (httpx.HTTPError, TimeoutError, OSError) as e:
            wh.last_error = f"{type(e).__name__}: {e}"
        await sleep(delay)
        delay *= 2
    return wh.delivered
