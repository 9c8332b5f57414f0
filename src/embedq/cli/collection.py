"""`embedq collection ...` (create, list, show, drop, switch model) and `embedq doc ...`
(write, read, delete and list the documents of a collection). Each command has `--json`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedq.app import App
from embedq.cli.common import (
    JSON_OPTION,
    YES_OPTION,
    confirm,
    console,
    console_err,
    print_json,
    run,
    state,
    table,
    with_app,
)
from embedq.documents import Collection, Space
from embedq.errors import CollectionError, ConfigurationError, InvalidDocument

collection_app = typer.Typer(
    help="Collections: documents sharing one chunking and one embedding model.",
    no_args_is_help=True,
)
doc_app = typer.Typer(
    help="Write, read and delete the documents of a collection.", no_args_is_help=True
)

DOC_STATUSES = ("pending", "embedded", "failed")
POLL_S = 0.5

# Options shared by `create` and `set-model`. Providers, distances and the like are plain
# strings so that a wrong one is answered by embedq's one-line error, not a usage box.
PROVIDER_OPTION = typer.Option(
    None, "--provider", help="local, ollama, openai or fake (default: embedding_provider)."
)
DIMENSIONS_OPTION = typer.Option(
    None,
    "--dimensions",
    help="Vector length; probed from the provider when not given (openai and fake can "
    "shorten vectors to it).",
)
BASE_URL_OPTION = typer.Option(
    None,
    "--base-url",
    help="Endpoint of the model (another Ollama host, an OpenAI-compatible server); "
    "default: the provider's setting.",
)
FALLBACK_URL_OPTION = typer.Option(
    None,
    "--fallback-url",
    help="Further endpoint serving the same model, tried in order when the first is down "
    "(repeatable).",
)
OPTION_OPTION = typer.Option(
    None,
    "--option",
    help="Provider option key=value (repeatable): rpm, tpm, max_batch, max_batch_tokens, or "
    "the adapter's own (fake: fail_on, latency_ms; ollama: keep_alive).",
)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`--option key=value` pairs as a dict; a value that reads as JSON (a number, true, an
    object) is taken as such, anything else as a string.

    >>> parse_options(["rpm=60", "fail_on=boom", 'options={"num_ctx": 2048}'])
    {'rpm': 60, 'fail_on': 'boom', 'options': {'num_ctx': 2048}}
    """
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigurationError(
                f"--option {pair!r} is not key=value; example: --option rpm=500"
            )
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


def parse_json_object(raw: str | None, flag: str, example: str) -> dict[str, Any] | None:
    """The JSON object given to `flag`, or InvalidDocument naming the flag and an example."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise InvalidDocument(
            f"{flag} is not valid JSON ({exc}); example: {flag} '{example}'"
        ) from None
    if not isinstance(value, dict):
        raise InvalidDocument(f"{flag} must be a JSON object, like {flag} '{example}'")
    return value


def describe_space(space: Space) -> str:
    return f"{space.config.provider}/{space.config.model} ({space.dimensions} dims)"


K1_OPTION = typer.Option(
    None, "--k1", help="BM25 term-frequency saturation k1, 0-10 (default 0.9)."
)
B_OPTION = typer.Option(None, "--b", help="BM25 length normalisation b, 0-1 (default 0.4).")
FUSION_OPTION = typer.Option(
    None, "--fusion", help="How hybrid search fuses its legs: convex (default) or rrf."
)
ALPHA_OPTION = typer.Option(
    None, "--alpha", help="Convex fusion: the weight of the semantic leg, 0-1 (default 0.5)."
)
RRF_K_OPTION = typer.Option(None, "--rrf-k", help="RRF fusion: its constant (default 60).")


# --- collections ---------------------------------------------------------------------------


@collection_app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Letters, digits, '_', '.', '-'."),
    provider: str | None = PROVIDER_OPTION,
    model: str | None = typer.Option(None, "--model", help="Model name (default: the provider's)."),
    dimensions: int | None = DIMENSIONS_OPTION,
    distance: str | None = typer.Option(None, "--distance", help="cosine (default), l2 or ip."),
    chunk_size: int | None = typer.Option(
        None, "--chunk-size", help="Tokens per chunk (default 200 local/fake, 400 APIs)."
    ),
    chunk_overlap: int | None = typer.Option(
        None, "--chunk-overlap", help="Tokens shared by neighbouring chunks (default size/8)."
    ),
    title_prefix: bool = typer.Option(
        False, "--title-prefix", help="Embed each chunk with its document's title in front."
    ),
    language: str = typer.Option(
        "english", "--language", help="PostgreSQL text search configuration for keyword search."
    ),
    base_url: str | None = BASE_URL_OPTION,
    fallback_urls: list[str] | None = FALLBACK_URL_OPTION,
    options: list[str] | None = OPTION_OPTION,
    exist_ok: bool = typer.Option(
        False, "--exist-ok", help="Succeed if it exists with the same model."
    ),
    k1: float | None = K1_OPTION,
    b: float | None = B_OPTION,
    fusion: str | None = FUSION_OPTION,
    alpha: float | None = ALPHA_OPTION,
    rrf_k: int | None = RRF_K_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Create a collection (its vector length is probed from the provider if not given)."""
    opts = parse_options(options)

    async def go(app: App) -> Collection:
        return await app.collections.create(
            name,
            provider=provider,
            model=model,
            dimensions=dimensions,
            distance=distance,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            title_prefix=title_prefix,
            language=language,
            base_url=base_url,
            fallback_urls=fallback_urls or (),
            options=opts,
            exist_ok=exist_ok,
            bm25_k1=k1,
            bm25_b=b,
            fusion=fusion,
            alpha=alpha,
            rrf_k=rrf_k,
        )

    col = run(with_app(state(ctx), go))
    if json_out:
        print_json(col.to_json())
        return
    console.print(
        f"collection {escape(col.name)!r} ready: {escape(describe_space(col.active))}, "
        f"{col.distance} distance, chunks of {col.chunk_size} tokens "
        f"(overlap {col.chunk_overlap}), keyword search in {escape(col.language)}"
    )


def _list_row(col: Collection) -> dict[str, Any]:
    b = col.building
    return {
        "name": escape(col.name),
        "provider": col.active.config.provider,
        "model": escape(col.active.config.model),
        "dims": col.active.dimensions,
        **{k: col.counts.get(k, 0) for k in ("documents", "pending", "embedded", "failed")},
        "switching-to": escape(describe_space(b)) if b else None,
    }


@collection_app.command("list")
def list_(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Every collection with its model and document counts."""
    cols = run(with_app(state(ctx), lambda a: a.collections.list()))
    if json_out:
        print_json([c.to_json() for c in cols])
    else:
        table("collections", [_list_row(c) for c in cols])


async def _show(app: App, name: str) -> dict[str, Any]:
    col = await app.collections.get(name)
    out = col.to_json()
    done, total = await col.progress(col.active)
    out["active"]["progress"] = {"done": done, "total": total}
    if col.building is not None:
        done, total = await col.progress(col.building)
        out["building"]["progress"] = {"done": done, "total": total}
    return out


@collection_app.command("show")
def show(ctx: typer.Context, name: str, json_out: bool = JSON_OPTION) -> None:
    """One collection: settings, model, document counts and model-switch progress."""
    out = run(with_app(state(ctx), lambda a: _show(a, name)))
    if json_out:
        print_json(out)
        return
    for key in ("name", "distance", "chunk_size", "chunk_overlap", "title_prefix", "language"):
        console.print(f"{key:>14}: {escape(str(out[key]))}")
    o = out["search"]
    console.print(
        f"{'search':>14}: BM25 k1 {o['bm25_k1']} b {o['bm25_b']}; hybrid fusion {o['fusion']} "
        f"(alpha {o['alpha']}, rrf_k {o['rrf_k']})"
    )
    console.print(f"{'created_at':>14}: {out['created_at']}")
    counts = out["documents"]
    console.print(
        f"{'documents':>14}: {counts.get('documents', 0)} (pending {counts.get('pending', 0)}, "
        f"embedded {counts.get('embedded', 0)}, failed {counts.get('failed', 0)})"
    )
    for label, space in (("model", out["active"]), ("switching to", out["building"])):
        if space is None:
            continue
        p = space["progress"]
        endpoints = [u for u in [space["base_url"], *space["fallback_urls"]] if u]
        console.print(
            f"{label:>14}: {escape(space['provider'])}/{escape(space['model'])} "
            f"({space['dimensions']} dims), holds {p['done']}/{p['total']} documents"
            + (f", endpoints {escape(', '.join(endpoints))}" if endpoints else "")
        )


@collection_app.command("drop")
def drop(
    ctx: typer.Context, name: str, yes: bool = YES_OPTION, json_out: bool = JSON_OPTION
) -> None:
    """Remove a collection with its documents, chunks, indexes and pending embed jobs."""

    async def go(app: App) -> int:
        col = await app.collections.get(name)
        n = col.counts.get("documents", 0)
        confirm(f"Drop collection {name!r} and its {n} documents?", yes)
        await app.collections.drop(name)
        return n

    n = run(with_app(state(ctx), go))
    if json_out:
        print_json({"dropped": name, "documents": n})
    else:
        console.print(f"dropped collection {escape(name)!r} and its {n} documents")


@collection_app.command("set-search")
def set_search(
    ctx: typer.Context,
    name: str,
    k1: float | None = K1_OPTION,
    b: float | None = B_OPTION,
    fusion: str | None = FUSION_OPTION,
    alpha: float | None = ALPHA_OPTION,
    rrf_k: int | None = RRF_K_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Change a collection's keyword parameters (BM25 k1, b) or the default fusion of its
    hybrid searches (docs/search.md); options left out keep their value."""
    if all(v is None for v in (k1, b, fusion, alpha, rrf_k)):
        raise InvalidDocument("give at least one of --k1, --b, --fusion, --alpha, --rrf-k")

    async def go(app: App) -> Collection:
        col = await app.collections.get(name, counts=False)
        return await col.set_search_options(
            bm25_k1=k1, bm25_b=b, fusion=fusion, alpha=alpha, rrf_k=rrf_k
        )

    col = run(with_app(state(ctx), go))
    if json_out:
        print_json({"name": col.name, "search": col.to_json()["search"]})
        return
    o = col.to_json()["search"]
    resort = " (postings re-sorted at the next compaction)" if (k1, b) != (None, None) else ""
    console.print(
        f"collection {escape(col.name)!r}: BM25 k1 {o['bm25_k1']} b {o['bm25_b']}, hybrid "
        f"fusion {o['fusion']} (alpha {o['alpha']}, rrf_k {o['rrf_k']}){resort}"
    )


@collection_app.command("compact")
def compact(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="One collection (default: every one)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Merge the keyword-search postings that writes appended into sorted segments, now
    (workers do it every bm25_compaction_s seconds): after a large load, searches read
    fewer postings. Searches are exact either way."""
    from embedq import bm25

    async def go(app: App) -> bm25.Compaction:
        target = None if name is None else (await app.collections.get(name, counts=False)).id
        return await bm25.compact(app, target)

    report = run(with_app(state(ctx), go))
    if json_out:
        print_json(report.to_json())
    elif report.busy:
        console.print("another process is compacting; try again when it is done")
    else:
        console.print(
            f"compacted {report.collections} collection(s): {report.terms} terms, "
            f"{report.postings} postings sorted in {report.seconds:.1f} s"
        )


@collection_app.command("set-model")
def set_model(
    ctx: typer.Context,
    name: str,
    model: str = typer.Option(..., "--model", help="The new model."),
    provider: str | None = typer.Option(
        None, "--provider", help="local, ollama, openai or fake (default: the current one)."
    ),
    dimensions: int | None = DIMENSIONS_OPTION,
    base_url: str | None = BASE_URL_OPTION,
    fallback_urls: list[str] | None = FALLBACK_URL_OPTION,
    options: list[str] | None = OPTION_OPTION,
    wait: bool = typer.Option(
        False,
        "--wait",
        help="Show progress until search uses the new model (a worker must be running).",
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Switch a collection to another model: every document is re-embedded in the background
    by the workers (`embedq worker` must be running), search keeps the old model until the
    new one holds every document, then switches at once. Ctrl-C during --wait leaves the
    switch running."""
    opts = parse_options(options)
    st = state(ctx)

    async def start(app: App) -> tuple[Collection, Space]:
        col = await app.collections.get(name)
        space = await col.set_model(
            provider=provider,
            model=model,
            dimensions=dimensions,
            base_url=base_url,
            fallback_urls=fallback_urls or (),
            options=opts,
        )
        return await col.with_fresh_state(), space

    col, space = run(with_app(st, start))
    try:
        if not json_out:
            console.print(
                f"switching {escape(name)!r} from {escape(describe_space(col.active))} to "
                f"{escape(describe_space(space))}; workers re-embed every document, search "
                "keeps the old model until the new one holds them all"
            )
        if wait:
            run(with_app(st, lambda a: _wait_for_switch(a, name, space, quiet=json_out)))
    except KeyboardInterrupt:
        console_err.print(
            f"stopped waiting; the switch goes on in the background "
            f"(`embedq collection show {escape(name)}`)"
        )
        raise typer.Exit(130) from None
    if json_out:
        out = run(with_app(st, lambda a: _show(a, name)))
        print_json({**out, "switch": {"space": space.id, "completed": wait}})
    elif wait:
        console.print(f"{escape(name)!r} now searches with {escape(describe_space(space))}")


async def _wait_for_switch(app: App, name: str, space: Space, *, quiet: bool) -> None:
    """Poll until `space` is the collection's active one, with a progress bar on stderr."""
    progress = Progress(
        TextColumn("[bold]re-embedding[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console_err,
        disable=quiet,
    )
    with progress:
        bar = progress.add_task("", total=None)
        while True:
            col = await app.collections.get(name)
            done, total = await col.progress(space)
            # A document that failed for good holds the switch back until it is fixed.
            failed = col.counts.get("failed", 0)
            note = (
                f"[yellow]{failed} failed: `embedq doc list {escape(name)} --status failed`[/]"
                if failed
                else ""
            )
            progress.update(bar, completed=done, total=total, description=note)
            if col.active.id == space.id:
                return
            if col.building is None or col.building.id != space.id:
                raise CollectionError(
                    f"the switch of {name!r} to {describe_space(space)} ended without "
                    f"completing; it now uses {describe_space(col.active)}"
                )
            await asyncio.sleep(POLL_S)


# --- documents -----------------------------------------------------------------------------


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidDocument(f"--file {path}: no such file") from None
    except IsADirectoryError:
        raise InvalidDocument(
            f"--file {path} is a directory; to load a folder use `embedq ingest {path}`"
        ) from None
    except UnicodeDecodeError:
        raise InvalidDocument(
            f"--file {path} is not UTF-8 text; for PDFs and other formats use `embedq ingest`"
        ) from None
    except OSError as exc:
        raise InvalidDocument(f"--file {path}: cannot read it ({exc.strerror})") from None


@doc_app.command("put")
def put(
    ctx: typer.Context,
    collection: str,
    key: str,
    text: str | None = typer.Option(None, "--text", help="The document's text."),
    file: str | None = typer.Option(
        None, "--file", help="Read the text from this UTF-8 file ('-': standard input)."
    ),
    title: str | None = typer.Option(None, "--title"),
    metadata: str | None = typer.Option(None, "--metadata", help="A JSON object."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Write a document; new content is embedded by the workers, the same content is a no-op."""
    if (text is None) == (file is None):
        raise InvalidDocument("give the document's text with exactly one of --text or --file")
    body = text if text is not None else _read_text(str(file))
    meta = parse_json_object(metadata, "--metadata", '{"lang": "en"}')

    async def go(app: App) -> dict[str, Any]:
        col = await app.collections.get(collection)
        result = await col.upsert(key, body, title=title, metadata=meta)
        return result.to_json()

    out = run(with_app(state(ctx), go))
    if json_out:
        print_json(out)
        return
    job = f", embed job {out['job_id']}" if out["job_id"] else ""
    console.print(f"{out['change']} {escape(key)!r} (version {out['version']}{job})")


@doc_app.command("get")
def get(ctx: typer.Context, collection: str, key: str, json_out: bool = JSON_OPTION) -> None:
    """One document with its text, metadata and embedding status."""

    async def go(app: App) -> dict[str, Any]:
        col = await app.collections.get(collection)
        return (await col.get(key)).to_json()

    out = run(with_app(state(ctx), go))
    if json_out:
        print_json(out)
        return
    for k, v in out.items():
        if k != "text":
            console.print(f"{k:>12}: {escape(json.dumps(v) if isinstance(v, dict) else str(v))}")
    console.print()
    console.print(out["text"], markup=False)


@doc_app.command("delete")
def delete(
    ctx: typer.Context,
    collection: str,
    keys: list[str] = typer.Argument(..., help="Keys of the documents to delete."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Delete documents with their chunks. Exit 1 when a key did not exist."""

    async def go(app: App) -> list[str]:
        col = await app.collections.get(collection)
        return await col.delete(*keys)

    deleted = run(with_app(state(ctx), go))
    missing = [k for k in dict.fromkeys(keys) if k not in set(deleted)]
    if json_out:
        print_json({"deleted": deleted, "missing": missing})
    else:
        console.print(f"deleted {len(deleted)} documents")
        if missing:
            console.print(f"[yellow]not found[/]: {escape(', '.join(missing))}")
    if missing:
        raise typer.Exit(1)


@doc_app.command("list")
def list_docs(
    ctx: typer.Context,
    collection: str,
    status: str | None = typer.Option(None, "--status", help="pending, embedded or failed."),
    limit: int = typer.Option(100, "--limit", "-n", help="At most this many (by key)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """The documents of a collection, by key, with their embedding status."""
    if status is not None and status not in DOC_STATUSES:
        raise InvalidDocument(f"--status {status!r} is invalid: use {', '.join(DOC_STATUSES)}")
    if not 1 <= limit <= 100_000:
        raise InvalidDocument(f"--limit {limit} is invalid: from 1 to 100000")

    async def go(app: App) -> list[dict[str, Any]]:
        col = await app.collections.get(collection)
        return await col.documents(status=status, limit=limit)

    rows = run(with_app(state(ctx), go))
    if json_out:
        print_json(rows)
        return
    for r in rows:
        r["key"], r["title"] = escape(r["key"]), escape(r["title"] or "") or None
        lines = (r["error"] or "").strip().splitlines()
        r["error"] = escape(lines[-1][:80]) if lines else None
    columns = ["key", "title", "version", "status", "error", "updated_at"]
    table(f"documents of {escape(collection)}", rows, columns)
