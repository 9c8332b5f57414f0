"""Webhooks: one URL per collection, called when a document is embedded or fails for good.

    hooks = Webhooks(app)
    saved = await hooks.set("articles", "https://example.com/hooks/embedq")
    saved.secret  # 'whsec_…', shown this once; receivers check X-Embedq-Signature with it

An event is recorded *in the same transaction* as the change it reports: the pipeline's swap
enqueues an `embedq.webhook` job per embedded document of a collection with a webhook, and
marking documents failed enqueues one per failed document (`enqueue_events`). So a call is
never made for a write that rolled back, and never lost for one that committed.

A delivery is a job on the `webhooks` queue: it POSTs the event as JSON, signed with
HMAC-SHA256 over `<timestamp>.<body>`. A 2xx is success; a 408, 429, 5xx, time-out or refused
connection is retried with exponential backoff up to `webhook_max_attempts`, then
dead-lettered with the last error; any other 4xx (or a redirect) is dead at once. The secret
is kept encrypted with EMBEDQ_SECRET_KEY and is never logged or shown again after creation.

A receiver checks a delivery with `verify(secret, headers, body)` (or the few lines of
docs/webhooks.md in any language).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx
from cryptography.fernet import Fernet, InvalidToken

from embedq import queries, stored_settings
from embedq.errors import ConfigurationError, WebhookError, WebhookRejected
from embedq.retry import RetryPolicy

if TYPE_CHECKING:
    from embedq.app import App
    from embedq.jobs import AnyConn
    from embedq.settings import Settings
    from embedq.tasks import JobContext

log = logging.getLogger("embedq.webhooks")

WEBHOOK_TASK = "embedq.webhook"
WEBHOOK_QUEUE = "webhooks"
EVENTS = ("embedded", "failed")
ALIASES = {"dead": "failed"}  # the document's embed job was dead-lettered
SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2000
TOLERANCE_S = 300  # how old a timestamp `verify` accepts, against replays
_BODY_KEYS = ("event", "delivery_id", "collection", "key", "version", "status", "error", "at")
_USER_AGENT = "embedq-webhook/1"
Event = Literal["embedded", "failed"]


@dataclass(frozen=True)
class Webhook:
    """A collection's webhook as embedq shows it: never its secret."""

    id: int
    collection: str
    url: str
    events: tuple[str, ...]
    enabled: bool
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "collection": self.collection,
            "url": self.url,
            "events": list(self.events),
            "enabled": self.enabled,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Webhook:
        return cls(
            id=int(row["id"]),
            collection=str(row["collection"]),
            url=str(row["url"]),
            events=tuple(row["events"]),
            enabled=bool(row["enabled"]),
            created_at=row.get("created_at"),
            updated_at=row.get("updated_at"),
        )


@dataclass(frozen=True)
class Saved:
    """What `Webhooks.set` did: the webhook, whether it is new, and its secret when one was
    made (a new webhook, or a rotation): shown this once, never again."""

    webhook: Webhook
    created: bool
    secret: str | None = None


# --- configuration -----------------------------------------------------------------------


def parse_events(events: str | Iterable[str] | None) -> list[str]:
    """'embedded,failed' or ['embedded'] → a checked list (None: every event). `dead` is
    accepted for `failed`."""
    if events is None:
        return list(EVENTS)
    items = events.split(",") if isinstance(events, str) else list(events)
    wanted = set()
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(f"webhook event {item!r} must be a string")
        name = item.strip().lower()
        if name:
            wanted.add(ALIASES.get(name, name))
    unknown = sorted(wanted - set(EVENTS))
    if unknown or not wanted:
        problem = "no webhook event"
        if unknown:
            problem = f"unknown webhook event(s) {', '.join(map(repr, unknown))}"
        raise ConfigurationError(
            f"{problem}; choose from {', '.join(EVENTS)} (e.g. --events embedded,failed)"
        )
    return [e for e in EVENTS if e in wanted]


def check_url(url: str) -> str:
    """The URL, checked: absolute http(s) with a host, at most MAX_URL_CHARS."""
    problem = None
    if not isinstance(url, str) or not url.strip():
        problem = "it is empty"
    elif len(url) > MAX_URL_CHARS:
        problem = f"it is longer than {MAX_URL_CHARS} characters"
    elif any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        problem = "it contains spaces or control characters"
    else:
        try:
            parsed = httpx.URL(url)
            absolute = parsed.scheme in ("http", "https") and bool(parsed.host)
            port_ok = parsed.port is None or 0 < parsed.port < 65536
        except (httpx.InvalidURL, ValueError, TypeError):  # IDNA errors are ValueErrors
            absolute = port_ok = False
        if not absolute:
            problem = "it is not an absolute http:// or https:// URL"
        elif not port_ok:
            problem = "its port is out of range"
    if problem:
        raise ConfigurationError(
            f"webhook URL {str(url)[:80]!r} is invalid: {problem}. Give the full address the "
            "receiver listens on, e.g. https://example.com/hooks/embedq"
        )
    scheme, rest = url.split(":", 1)
    return scheme.lower() + ":" + rest  # 'HTTPS://…' is 'https://…'


def where(url: str) -> str:
    """A URL fit for logs and job errors: scheme, host and port only. Paths and query
    strings often carry tokens (many services put the credential in the webhook URL)."""
    try:
        parsed = httpx.URL(url)
        host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host  # IPv6
        port = f":{parsed.port}" if parsed.port else ""
        rest = "/…" if parsed.raw_path not in (b"", b"/") else ""
        return f"{parsed.scheme}://{host}{port}{rest}"
    except (httpx.InvalidURL, ValueError, TypeError):
        return "the webhook URL"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _fernet(settings: Settings) -> Fernet:
    return stored_settings.fernet(
        settings,
        what="webhook secrets",
        where="wherever embedq runs (where webhooks are set, and on the workers that sign "
        "deliveries)",
    )


class Webhooks:
    """The app's webhooks (the `webhooks` table): set, get, list, remove."""

    def __init__(self, app: App) -> None:
        self.app = app

    @property
    def q(self) -> dict[str, str]:
        return queries.load("webhooks.sql", self.app.settings.db_schema)

    async def set(
        self,
        collection: str,
        url: str,
        *,
        events: str | Iterable[str] | None = None,
        enabled: bool = True,
        rotate_secret: bool = False,
    ) -> Saved:
        """Create or change a collection's webhook (its secret is kept unless
        `rotate_secret`)."""
        checked_url = check_url(url)
        checked_events = parse_events(events)
        cipher = _fernet(self.app.settings)  # before anything is written
        target = await self.app.collections.get(collection)
        secret = new_secret()
        [row] = await self.app.store.fetch_sql(
            self.q["upsert"],
            {
                "collection": target.id,
                "name": target.name,
                "url": checked_url,
                "secret": cipher.encrypt(secret.encode()).decode(),
                "events": checked_events,
                "enabled": enabled,
                "rotate": rotate_secret,
            },
        )
        hook, created = Webhook.from_row(row), bool(row["created"])
        log.debug(
            "webhook of collection %s %s: %s on %s%s",
            hook.collection,
            "created" if created else "changed",
            where(hook.url),
            ",".join(hook.events),
            " (new secret)" if rotate_secret and not created else "",
        )
        return Saved(hook, created, secret if created or rotate_secret else None)

    async def get(self, collection: str) -> Webhook | None:
        """The collection's webhook, or None (CollectionNotFound when there is no such
        collection)."""
        rows = await self.app.store.fetch_sql(self.q["list"], {"name": collection})
        if rows:
            return Webhook.from_row(rows[0])
        await self.app.collections.get(collection)
        return None

    async def list(self) -> list[Webhook]:
        rows = await self.app.store.fetch_sql(self.q["list"], {"name": None})
        return [Webhook.from_row(r) for r in rows]

    async def remove(self, collection: str) -> bool:
        """Remove the collection's webhook; False when it had none. Deliveries still queued
        for it end as skipped."""
        rows = await self.app.store.fetch_sql(self.q["remove"], {"name": collection})
        if not rows:
            await self.app.collections.get(collection)
            return False
        log.debug("webhook of collection %s removed", collection)
        return True


# --- events ------------------------------------------------------------------------------


async def enqueue_events(
    app: App,
    conn: AnyConn,
    event: Event,
    documents: Sequence[int],
    versions: Sequence[int | None],
    errors: Sequence[str | None] | None = None,
) -> int:
    """Enqueue a delivery per document whose collection's webhook wants `event`, in `conn`'s
    transaction; call it before the transaction sets the documents' status (see the query).
    Returns how many were enqueued. Without any webhook that wants the event, this costs one
    probe of a small table and writes nothing."""
    if not documents:
        return 0
    q = queries.load("webhooks.sql", app.settings.db_schema)
    [probe] = await app.store.fetch_sql(q["any_wanting"], {"event": event}, conn=conn)
    if not probe["wanted"]:
        return 0
    task = app.tasks.get(WEBHOOK_TASK)
    rows = await app.store.fetch_sql(
        q["enqueue_events"],
        {
            "documents": list(documents),
            "versions": list(versions),
            "errors": list(errors) if errors is not None else [None] * len(documents),
            "event": event,
            "task": WEBHOOK_TASK,
            "queue": WEBHOOK_QUEUE,
            "max_attempts": task.retry.max_attempts if task else app.settings.webhook_max_attempts,
            "log_all": app.settings.job_events == "all",
        },
        conn=conn,
    )
    return int(rows[0]["n"]) if rows else 0


# --- signing -----------------------------------------------------------------------------


def encode_body(body: Mapping[str, Any]) -> bytes:
    """The bytes sent (and signed): compact JSON, fields in a fixed order."""
    ordered = {k: body[k] for k in _BODY_KEYS if k in body}
    ordered.update({k: v for k, v in body.items() if k not in ordered})
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The X-Embedq-Signature of `body` sent at `timestamp`: 'sha256=' and the hex
    HMAC-SHA256, keyed with the whole secret, of '<timestamp>.<body>'."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether a received delivery is genuine and fresh: for receivers written in Python.

    `headers` must look names up case-insensitively (any web framework's headers do)."""
    signature = headers.get("X-Embedq-Signature") or ""
    stamp = headers.get("X-Embedq-Timestamp") or ""
    if not stamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, stamp, body), signature)


# --- delivery ----------------------------------------------------------------------------


def register(app: App) -> None:
    """Add the delivery task to an app (every app has it)."""
    s = app.settings

    @app.task(
        name=WEBHOOK_TASK,
        queue=WEBHOOK_QUEUE,
        pass_context=True,
        retry=RetryPolicy(
            max_attempts=s.webhook_max_attempts,
            base_s=s.retry_base_s,
            cap_s=max(s.retry_cap_s, s.retry_base_s),
        ),
    )
    async def webhook(ctx: JobContext, webhook: int, body: dict[str, Any]) -> dict[str, Any]:
        return await deliver(app, ctx, webhook, body)


async def deliver(
    app: App, ctx: JobContext, webhook_id: int, body: Mapping[str, Any]
) -> dict[str, Any]:
    """One attempt at one delivery: the job's result, or WebhookError (retried) /
    WebhookRejected (dead at once)."""
    q = queries.load("webhooks.sql", app.settings.db_schema)
    rows = await app.store.fetch_sql(q["for_delivery"], {"id": webhook_id})
    if not rows or not rows[0]["enabled"]:
        why = "the webhook was removed" if not rows else "the webhook is disabled"
        log.info("webhook delivery %s skipped: %s", body.get("delivery_id"), why)
        return {"skipped": why}
    row = rows[0]
    try:
        secret = _fernet(app.settings).decrypt(str(row["secret_encrypted"]).encode()).decode()
    except InvalidToken:
        raise ConfigurationError(
            f"the secret of the webhook of collection {row['collection']!r} cannot be "
            "decrypted with this EMBEDQ_SECRET_KEY: set the key it was created with on this "
            "worker, or give the webhook a new secret with `embedq webhook set --collection "
            f"{row['collection']} --url URL --rotate-secret`"
        ) from None
    url, target = str(row["url"]), where(str(row["url"]))
    raw = encode_body(body)
    stamp = str(int(time.time()))
    event = str(body.get("event", ""))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": _USER_AGENT,
        "X-Embedq-Event": event,
        "X-Embedq-Delivery": str(body.get("delivery_id", "")),
        "X-Embedq-Timestamp": stamp,
        "X-Embedq-Signature": sign(secret, stamp, raw),
        "X-Embedq-Attempt": str(ctx.job.attempts),
    }
    timeout = app.settings.webhook_timeout_s
    tls = await asyncio.to_thread(_make_tls) if _TLS is None else _TLS
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, verify=tls) as client:
            response = await client.post(url, content=raw, headers=headers)
    except httpx.TimeoutException:
        raise WebhookError(
            f"webhook {target} did not answer within {timeout:g} s (webhook_timeout_s)"
        ) from None
    except httpx.HTTPError as exc:
        reason = (str(exc) or type(exc).__name__).replace(url, target)
        raise WebhookError(f"cannot reach webhook {target}: {reason}") from None
    ms = (time.perf_counter() - started) * 1000
    status = response.status_code
    if 200 <= status < 300:
        log.debug(
            "webhook %s of %s/%s delivered to %s: %d in %.0f ms (attempt %d)",
            event,
            body.get("collection"),
            body.get("key"),
            target,
            status,
            ms,
            ctx.job.attempts,
        )
        return {"status": status, "attempt": ctx.job.attempts, "ms": round(ms, 1)}
    raise _refusal(response, target, ctx, str(row["collection"]))


def _refusal(
    response: httpx.Response, target: str, ctx: JobContext, collection: str
) -> WebhookError:
    """The error a non-2xx answer means: retried (WebhookError), or dead at once
    (WebhookRejected)."""
    status = response.status_code
    said = f"webhook {target} answered {status} {response.reason_phrase}".rstrip()
    snippet = " ".join(response.text[:200].split())
    if snippet:
        said += f" ({snippet})"
    if status in (408, 429) or status >= 500:
        return WebhookError(said, retry_after=_retry_after(response))
    if 300 <= status < 400:
        return WebhookRejected(
            f"{said}: a redirect, which embedq does not follow. Set the webhook's URL to the "
            f"final address (`embedq webhook set --collection {collection} --url URL`), then "
            f"`embedq queue retry {ctx.job.id}`"
        )
    return WebhookRejected(
        f"{said}: a {status} is permanent, so this delivery is dead. Fix the receiver or the "
        f"URL (`embedq webhook set --collection {collection} --url URL`), then "
        f"`embedq queue retry {ctx.job.id}`"
    )


_TLS: ssl.SSLContext | None = None


def _make_tls() -> ssl.SSLContext:
    """The TLS settings of every delivery, made once per process (in a thread): loading the
    CA bundle costs about 80 ms of CPU, a hundred times the rest of a client."""
    global _TLS
    if _TLS is None:
        _TLS = httpx.create_ssl_context()
    return _TLS


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None
