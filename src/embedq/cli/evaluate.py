"""`embedq eval`: a collection's search quality on judged queries (BEIR's formats)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedq.app import App
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
from embedq.errors import InvalidDocument
from embedq.evaluate import EvalReport, evaluate, load_judged
from embedq.search import MODES


def eval_(
    ctx: typer.Context,
    collection: str = typer.Option(..., "--collection", "-c", help="The collection to measure."),
    queries: Path = typer.Option(
        ..., "--queries", help='Queries as JSON lines: {"_id": ..., "text": ...} (BEIR).'
    ),
    qrels: Path = typer.Option(
        ..., "--qrels", help="Judgements as TSV with a header: query-id, corpus-id, score."
    ),
    mode: str = typer.Option(
        ",".join(MODES), "--mode", "-m", help="Modes to measure, comma-separated."
    ),
    k: int = typer.Option(100, "--k", help="Depth of each ranking (recall@k), 10-1000."),
    alpha_sweep: bool = typer.Option(
        False, "--alpha-sweep", help="Also fuse hybrid at alpha 0, 0.05, ..., 1: the best alpha."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Measure search quality: nDCG@10, recall@k, MRR@10, queries with no hit and latency
    per mode. A hit whose key equals the query's id is skipped (BEIR's convention)."""
    modes = [m.strip() for m in mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise InvalidDocument(f"--mode {mode!r} is invalid: a comma-separated list of "
                              f"{', '.join(MODES)}")  # fmt: skip
    judged = load_judged(queries, qrels)
    total = len(judged.evaluated) * len(modes)

    async def go(app: App) -> EvalReport:
        col = await app.collections.get(collection)
        progress = Progress(
            TextColumn("[bold]evaluating[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console_err,
            disable=json_out or not console_err.is_terminal,
        )
        with progress:
            bar = progress.add_task("searches", total=total)
            return await evaluate(
                col,
                judged,
                modes=modes,
                k=k,
                alpha_sweep=alpha_sweep,
                progress=lambda n: progress.update(bar, completed=n),
            )

    report = run(with_app(state(ctx), go))
    if report.unknown_queries or report.unknown_documents:
        console_err.print(
            f"[yellow]note:[/] {report.unknown_queries} judged queries are not in "
            f"{escape(str(queries))} (skipped); {report.unknown_documents} judged documents "
            f"are not in collection {escape(collection)!r} (they count as relevant, unfound)"
        )
    if json_out:
        print_json(report.to_json())
        return
    rows = [{"mode": m, **r.to_json()} for m, r in report.modes.items()]
    table(f"{escape(collection)}: {report.queries} judged queries", rows)
    if report.sweep is not None:
        s = report.sweep.to_json()
        console.print(
            f"alpha sweep (convex fusion): best alpha {s['best_alpha']} nDCG@10 "
            f"{s['ndcg@10']:.4f}, {s['gain']:+.4f} over the collection's default fusion "
            f"({s['default_ndcg@10']:.4f})"
        )
