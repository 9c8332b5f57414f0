"""`embedq search`, `embedq ingest` and `embedq provider test`: using a collection, filling
it from files, and checking that its embedding provider answers as the collection needs."""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedq.app import App
from embedq.cli.collection import ALPHA_OPTION, FUSION_OPTION, RRF_K_OPTION, parse_json_object
from embedq.cli.common import (
    JSON_OPTION,
    console,
    console_err,
    print_json,
    run,
    state,
    table,
    with_app,
)
from embedq.documents import DocumentInput, provider_config, validate_document
from embedq.errors import (
    AuthenticationFailed,
    ConfigurationError,
    EmbedqError,
    InvalidDocument,
    ModelNotFound,
    PermanentProviderError,
    ProviderError,
    RateLimited,
)
from embedq.providers import ProviderConfig, make_provider

provider_app = typer.Typer(help="Check embedding providers.", no_args_is_help=True)
COLLECTION_OPTION = typer.Option(..., "--collection", "-c", help="The collection.")
_TAGS = re.compile(r"</?b>")
_SPACE = re.compile(r"\s+")


def _preview(text: str | None, width: int = 80) -> str:
    """One line of at most `width` characters, ts_headline's <b> marks removed."""
    flat = _SPACE.sub(" ", _TAGS.sub("", text or "")).strip()
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# --- search --------------------------------------------------------------------------------


def search(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="What to look for."),
    collection: str = COLLECTION_OPTION,
    mode: str = typer.Option(
        "hybrid", "--mode", "-m", help="hybrid (both legs fused), semantic or keyword (BM25)."
    ),
    k: int = typer.Option(10, "-k", help="Documents to return (1-1000)."),
    filter_json: str | None = typer.Option(
        None,
        "--filter",
        help='Metadata filter as JSON: {"lang": "en", "year": {"$gte": 2023}}; operators '
        "$eq $ne $in $nin $gt $gte $lt $lte $exists.",
    ),
    fusion: str | None = FUSION_OPTION,
    alpha: float | None = ALPHA_OPTION,
    rrf_k: int | None = RRF_K_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Search a collection: semantic, keyword (BM25: any term matches, "quoted phrases" must,
    -word excludes) or hybrid, with metadata filters. --fusion/--alpha/--rrf-k override the
    collection's default fusion for this search."""
    filters = parse_json_object(filter_json, "--filter", '{"lang": "en"}')

    async def go(app: App) -> list[dict[str, Any]]:
        col = await app.collections.get(collection, counts=False)
        hits = await col.search(
            query, mode=mode, k=k, filters=filters, fusion=fusion, alpha=alpha, rrf_k=rrf_k
        )
        return [h.to_json() for h in hits]

    hits = run(with_app(state(ctx), go))
    if json_out:
        print_json({"collection": collection, "query": query, "mode": mode, "hits": hits})
        return
    rows = [
        {
            "rank": i,
            "key": escape(h["key"]),
            "title": escape(h["title"] or "") or None,
            "score": h["score"],
            "match": escape(_preview(h["chunks"][0]["text"] if h["chunks"] else h["snippet"])),
        }
        for i, h in enumerate(hits, 1)
    ]
    table(f"{mode} search in {escape(collection)}", rows)


# --- ingest --------------------------------------------------------------------------------


@dataclass
class IngestReport:
    """What an ingest did, for the summary line and --json."""

    files: int = 0
    changes: Counter[str] = field(default_factory=Counter)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def ingested(self) -> int:
        return sum(self.changes.values())

    def to_json(self) -> dict[str, Any]:
        counts = {c: self.changes.get(c, 0) for c in ("created", "updated", "metadata")}
        return {
            "files": self.files,
            **counts,
            "unchanged": self.changes.get("unchanged", 0),
            "skipped": len(self.skipped),
            "skipped_files": self.skipped,
        }


def ingest(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., help="Files and folders (searched recursively)."),
    collection: str = COLLECTION_OPTION,
    batch_size: int = typer.Option(200, "--batch-size", help="Documents per transaction."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Load text, Markdown and HTML files into a collection; the workers embed them.

    A file's key is its path relative to the folder given (or its name). Files that cannot
    be read as text are skipped and listed at the end; the exit status is 1 only when files
    were found and none could be ingested.
    """
    if not 1 <= batch_size <= 10_000:
        raise InvalidDocument(f"--batch-size {batch_size} is invalid: from 1 to 10000")

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InvalidDocument(f"no such file or folder: {', '.join(missing)}")
    # Imported here: readers of some formats pull in parsers the other commands never need.
    from embedq import ingest as ingest_files

    async def go(app: App) -> IngestReport:
        col = await app.collections.get(collection)
        limit = app.settings.max_document_chars
        sources = [
            (f, p if p.is_dir() else p.parent) for p in paths for f in ingest_files.discover([p])
        ]
        report = IngestReport(files=len(sources))
        batch: list[DocumentInput] = []

        async def flush() -> None:
            if batch:
                report.changes.update(r.change for r in await col.upsert_many(batch))
                batch.clear()

        progress = Progress(
            TextColumn("[bold]ingesting[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console_err,
            disable=json_out or not console_err.is_terminal,
        )
        with progress:
            bar = progress.add_task("files", total=len(sources))
            for path, root in sources:
                for item in ingest_files.read_file(path, root):
                    if isinstance(item, ingest_files.Skipped):
                        report.skipped.append({"path": str(item.path), "reason": item.reason})
                        continue
                    doc = DocumentInput(item.key, item.text, item.title, item.metadata)
                    try:
                        batch.append(validate_document(doc, limit))
                    except InvalidDocument as exc:
                        report.skipped.append({"path": str(path), "reason": str(exc)})
                    if len(batch) >= batch_size:
                        await flush()
                progress.advance(bar)
            await flush()
        return report

    report = run(with_app(state(ctx), go))
    out = report.to_json()
    if json_out:
        print_json({"collection": collection, **out})
    else:
        for s in report.skipped:
            console.print(f"[yellow]skipped[/] {escape(s['path'])}: {escape(s['reason'])}")
        console.print(
            f"{report.files} files: created {out['created']}, updated {out['updated']}, "
            f"metadata {out['metadata']}, unchanged {out['unchanged']}, "
            f"skipped {out['skipped']}"
            + (" (run `embedq worker` to embed them)" if out["created"] + out["updated"] else "")
        )
    if report.ingested == 0 and report.skipped:
        if not json_out:
            console_err.print("[bold red]error:[/] no file could be ingested")
        raise typer.Exit(1)


# --- provider test -------------------------------------------------------------------------


@dataclass
class Check:
    check: str
    ok: bool | None  # None: not checked, an earlier check failed
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "detail": self.detail}


_PROBE_TEXT = "embedq provider test"


async def probe(config: ProviderConfig, app: App, expected: int | None) -> tuple[str, list[Check]]:
    """Reach the provider, embed one short text, and compare the vector length with the
    collection's (`expected`); returns the endpoint and one Check per step."""
    model = f"{config.provider}/{config.model}"
    try:
        provider = make_provider(config, app.settings)
    except EmbedqError as exc:
        return "-", [Check("reachable", False, str(exc))]
    endpoint = provider.endpoint
    checks: list[Check] = []
    try:
        started = time.perf_counter()
        vectors = await provider.embed([_PROBE_TEXT])
        took = time.perf_counter() - started
    except (AuthenticationFailed, ModelNotFound, RateLimited) as exc:
        # The server answered: it is reachable, but refused this model or these credentials.
        step = "credentials" if isinstance(exc, AuthenticationFailed) else "model"
        checks += [Check("reachable", True, f"{endpoint} answered"), Check(step, False, str(exc))]
    except PermanentProviderError as exc:  # ProviderMissing, BadInput
        checks.append(Check("reachable" if provider.name == "local" else "model", False, str(exc)))
    except ProviderError as exc:  # unreachable, timed out, 5xx
        checks.append(Check("reachable", False, str(exc)))
    else:
        dims = int(vectors.shape[1])
        where = "runs in this process" if provider.name in ("local", "fake") else "answered"
        checks += [
            Check("reachable", True, f"{endpoint} {where}"),
            Check("model", True, f"{model} embedded a test text in {took * 1000:.0f} ms"),
            Check("dimensions", True, f"{model} returns {dims}-dimensional vectors"),
        ]
        if expected is not None:
            checks.append(
                Check("matches collection", True, f"the collection expects {expected} dimensions")
                if dims == expected
                else Check(
                    "matches collection",
                    False,
                    f"the collection expects {expected} dimensions but {model} at {endpoint} "
                    f"returns {dims}: point --base-url at a server running the collection's "
                    "model, or switch models with `embedq collection set-model`",
                )
            )
    finally:
        await provider.close()
    steps = ["reachable", "model", "dimensions"] + (["matches collection"] if expected else [])
    named = {c.check for c in checks}
    checks += [Check(s, None, "not checked") for s in steps if s not in named]
    return endpoint, checks


@provider_app.command("test")
def provider_test(
    ctx: typer.Context,
    collection: str | None = typer.Option(
        None, "--collection", "-c", help="Test this collection's model (and its dimensions)."
    ),
    provider: str | None = typer.Option(None, "--provider", help="local, ollama, openai, fake."),
    model: str | None = typer.Option(None, "--model", help="Model (default: the provider's)."),
    base_url: str | None = typer.Option(None, "--base-url", help="Endpoint to test."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Check a provider: reachable, serves the model, the vector length (and, with
    --collection, that it matches the collection's). Exit 1 when a check fails."""
    if collection and (provider or model):
        raise ConfigurationError(
            "--collection tests the collection's own model; leave out --provider and --model "
            "(--base-url may point it at another endpoint)"
        )

    async def go(app: App) -> tuple[ProviderConfig, str, list[Check]]:
        expected: int | None = None
        if collection:
            col = await app.collections.get(collection)
            config, expected = col.active.config, col.active.dimensions
            if base_url:
                config = dataclasses.replace(config, base_url=base_url)
        else:
            config = provider_config(app.settings, provider, model, None, base_url, (), {})
        endpoint, checks = await probe(config, app, expected)
        return config, endpoint, checks

    config, endpoint, checks = run(with_app(state(ctx), go))
    ok = all(c.ok is not False for c in checks)
    if json_out:
        print_json(
            {
                "ok": ok,
                "provider": config.provider,
                "model": config.model,
                "endpoint": endpoint,
                "checks": [c.to_json() for c in checks],
            }
        )
    else:
        marks = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[dim]-[/]"}
        for c in checks:
            console.print(f"{marks[c.ok]} {c.check}: {escape(c.detail)}")
    if not ok:
        raise typer.Exit(1)
