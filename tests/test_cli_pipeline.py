"""The document pipeline through the CLI, as a user runs it (subprocesses, `fake` provider):
collections, documents, ingesting a folder, a worker draining it, search, model switches,
provider checks, and bad input of every kind answered by one clear line."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import cli_env, run_cli
from tests.test_cli import failed_cleanly, ok

import embedq
from embedq.cli.search import probe
from embedq.providers import ProviderConfig


def one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, no traceback, and one line on stderr naming the problem."""
    stderr = failed_cleanly(result, *needles)
    assert result.returncode == 1, (result.returncode, stderr)
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def make_collection(db_url: str, docs: dict[str, str] | None = None) -> None:
    """Create collection 'notes' (fake provider) with `docs`, in-process: where it is only
    setup, that is faster than a subprocess."""

    async def go() -> None:
        async with embedq.App(database_url=db_url) as app:
            col = await app.collections.create("notes", provider="fake")
            await col.upsert_many([{"key": k, "text": t} for k, t in (docs or {}).items()])

    asyncio.run(go())


def test_collection_lifecycle(db_url: str) -> None:
    env = cli_env(db_url)
    created = json.loads(
        ok(
            run_cli(
                "collection", "create", "notes", "--provider", "fake", "--model", "fake-64",
                "--distance", "l2", "--chunk-size", "100", "--chunk-overlap", "10",
                "--title-prefix", "--option", "rpm=600", "--option", "latency_ms=1",
                "--fallback-url", "http://backup:1", "--json", env=env,
            )
        )
    )  # fmt: skip
    assert created["provider"] == "fake" and created["model"] == "fake-64"
    assert created["dimensions"] == 64 and created["distance"] == "l2"
    assert created["chunk_size"] == 100 and created["chunk_overlap"] == 10
    assert created["title_prefix"] is True
    assert created["active"]["fallback_urls"] == ["http://backup:1"]

    # The same model again is fine with --exist-ok; a different one is a model switch.
    ok(run_cli("collection", "create", "notes", "--provider", "fake", "--model", "fake-64",
               "--exist-ok", env=env))  # fmt: skip
    one_clear_line(
        run_cli("collection", "create", "notes", "--provider", "fake", "--exist-ok", env=env),
        "set-model",
    )

    listed = json.loads(ok(run_cli("collection", "list", "--json", env=env)))
    assert [c["name"] for c in listed] == ["notes"]

    shown = json.loads(ok(run_cli("collection", "show", "notes", "--json", env=env)))
    assert shown["active"]["progress"] == {"done": 0, "total": 0} and shown["building"] is None
    assert "fake/fake-64 (64 dims)" in ok(run_cli("collection", "show", "notes", env=env))

    refused = run_cli("collection", "drop", "notes", env=env)  # no --yes and no terminal
    assert refused.returncode == 1 and "--yes" in refused.stderr
    dropped = json.loads(ok(run_cli("collection", "drop", "notes", "--yes", "--json", env=env)))
    assert dropped == {"dropped": "notes", "documents": 0}
    assert json.loads(ok(run_cli("collection", "list", "--json", env=env))) == []


def test_documents_put_get_list_delete(db_url: str, tmp_path: Path) -> None:
    env = cli_env(db_url)
    make_collection(db_url)
    body = tmp_path / "body.txt"
    body.write_text("Text read from a file.\n", encoding="utf-8")

    first = json.loads(
        ok(run_cli("doc", "put", "notes", "a", "--text", "Alpha text.", "--title", "A",
                   "--metadata", '{"lang": "en", "year": 2024}', "--json", env=env))
    )  # fmt: skip
    assert first["change"] == "created" and first["version"] == 1 and first["job_id"]
    again = json.loads(
        ok(run_cli("doc", "put", "notes", "a", "--text", "Alpha text.", "--title", "A",
                   "--metadata", '{"lang": "en", "year": 2024}', "--json", env=env))
    )  # fmt: skip
    assert again["change"] == "unchanged" and again["job_id"] is None
    assert "created 'b'" in ok(run_cli("doc", "put", "notes", "b", "--file", str(body), env=env))

    doc = json.loads(ok(run_cli("doc", "get", "notes", "b", "--json", env=env)))
    assert doc["text"] == "Text read from a file.\n" and doc["status"] == "pending"
    assert "Alpha text." in ok(run_cli("doc", "get", "notes", "a", env=env))

    listed = json.loads(ok(run_cli("doc", "list", "notes", "--status", "pending", "--json",
                                   env=env)))  # fmt: skip
    assert [d["key"] for d in listed] == ["a", "b"]

    result = run_cli("doc", "delete", "notes", "a", "zzz", "--json", env=env)
    assert result.returncode == 1  # a key that did not exist
    assert json.loads(result.stdout) == {"deleted": ["a"], "missing": ["zzz"]}
    listed = json.loads(ok(run_cli("doc", "list", "notes", "--json", env=env)))
    assert [d["key"] for d in listed] == ["b"]


def test_ingest_drain_and_search(db_url: str, tmp_path: Path) -> None:
    env = cli_env(db_url)
    make_collection(db_url)
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "giraffes.txt").write_text(
        "Giraffes graze acacia leaves across the dry savanna.", encoding="utf-8"
    )
    (docs / "sub" / "kubernetes.md").write_text(
        "# Kubernetes\n\nThe kubelet runs pods on every node of the cluster.\n", encoding="utf-8"
    )
    (docs / "bread.html").write_text(
        "<html><head><title>Sourdough</title></head><body><p>Sourdough bread rises with a "
        "levain starter, flour, water and patience.</p></body></html>",
        encoding="utf-8",
    )
    (docs / "x.txt").write_bytes(b"\x00\x01\x02\xff\xfe binary \x00 data" * 20)
    (docs / "empty.txt").write_bytes(b"")

    report = json.loads(ok(run_cli("ingest", str(docs), "--collection", "notes", "--json",
                                   env=env)))  # fmt: skip
    assert report["files"] == 5 and report["created"] == 3 and report["skipped"] == 2
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped_files"]}
    assert set(skipped) == {"x.txt", "empty.txt"} and all(skipped.values())

    again = run_cli("ingest", str(docs), "--collection", "notes", env=env)
    assert "created 0, updated 0, metadata 0, unchanged 3, skipped 2" in ok(again)
    assert f"skipped {docs / 'x.txt'}: binary" in again.stdout  # listed, with the reason

    ok(run_cli("worker", "--exit-when-idle", env=env))
    embedded = json.loads(ok(run_cli("doc", "list", "notes", "--status", "embedded", "--json",
                                     env=env)))  # fmt: skip
    assert len(embedded) == 3

    def top(query: str, mode: str) -> dict[str, Any]:
        out = json.loads(ok(run_cli("search", query, "--collection", "notes", "--mode", mode,
                                    "--json", env=env)))  # fmt: skip
        assert out["hits"], out
        return out["hits"][0]  # type: ignore[no-any-return]

    semantic = top("sourdough levain starter", "semantic")
    assert semantic["key"].endswith("bread.html") and semantic["chunks"]
    keyword = top("kubelet", "keyword")
    assert keyword["key"].endswith("kubernetes.md") and "kubelet" in keyword["snippet"].lower()
    assert top("giraffes acacia savanna", "hybrid")["key"].endswith("giraffes.txt")
    filtered = json.loads(
        ok(run_cli("search", "sourdough kubelet giraffes", "--collection", "notes", "--mode",
                   "semantic", "--filter", '{"type": {"$in": [".md"]}}', "--json", env=env))
    )  # fmt: skip
    assert [h["key"] for h in filtered["hits"]] == ["sub/kubernetes.md"]
    assert "giraffes" in ok(run_cli("search", "giraffes acacia", "--collection", "notes", env=env))


def test_ingest_of_nothing_readable_fails(db_url: str, tmp_path: Path) -> None:
    make_collection(db_url)
    (tmp_path / "x.txt").write_bytes(b"\x00\xff" * 50)
    result = run_cli("ingest", str(tmp_path), "--collection", "notes", env=cli_env(db_url))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "x.txt" in result.stdout and "no file could be ingested" in result.stderr


def test_model_switch_waits_for_the_workers(db_url: str) -> None:
    env = cli_env(db_url)
    make_collection(db_url, {f"d{i}": f"document number {i}" for i in range(3)})
    worker = subprocess.Popen(
        [sys.executable, "-m", "embedq", "worker"],
        env=cli_env(db_url, EMBEDQ_POLL_INTERVAL_S="0.2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = json.loads(
            ok(run_cli("collection", "set-model", "notes", "--model", "fake-32", "--wait",
                       "--json", env=env, timeout=60))
        )  # fmt: skip
    finally:
        worker.terminate()
        worker.wait(30)
    assert out["model"] == "fake-32" and out["dimensions"] == 32 and out["building"] is None
    assert out["active"]["progress"] == {"done": 3, "total": 3}
    one_clear_line(
        run_cli("collection", "set-model", "notes", "--model", "fake-32", env=env),
        "already embeds with fake/fake-32",
    )


def test_ctrl_c_during_wait_leaves_the_switch_running(db_url: str) -> None:
    env = cli_env(db_url)
    make_collection(db_url, {"a": "some text"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedq", "collection", "set-model", "notes", "--model",
         "fake-16", "--wait"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert "switching 'notes'" in proc.stdout.readline()  # the switch has started
    time.sleep(1.0)  # and the command polls its progress
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in stderr, (stdout, stderr)
    assert "goes on in the background" in stderr, (stdout, stderr)
    shown = json.loads(ok(run_cli("collection", "show", "notes", "--json", env=env)))
    assert shown["model"] == "fake-384" and shown["building"]["model"] == "fake-16"


def test_provider_test(db_url: str) -> None:
    env = cli_env(db_url)
    make_collection(db_url)
    out = json.loads(ok(run_cli("provider", "test", "--provider", "fake", "--json", env=env)))
    assert out["ok"] and out["model"] == "fake-384"
    assert [c["check"] for c in out["checks"]] == ["reachable", "model", "dimensions"]
    text = ok(run_cli("provider", "test", "--collection", "notes", env=env))
    assert "✓ matches collection" in text and "384-dimensional" in text

    closed = run_cli("provider", "test", "--provider", "ollama", "--base-url",
                     "http://127.0.0.1:9", env=env)  # fmt: skip
    assert closed.returncode == 1 and "Traceback" not in closed.stdout + closed.stderr
    assert "✗ reachable: cannot reach Ollama at http://127.0.0.1:9" in closed.stdout
    assert "EMBEDQ_OLLAMA_URL" in closed.stdout  # names the fix


async def test_probe_reports_a_dimension_mismatch(app: embedq.App) -> None:
    _, checks = await probe(ProviderConfig("fake", "fake-64"), app, expected=384)
    [last] = [c for c in checks if c.check == "matches collection"]
    assert last.ok is False and "expects 384 dimensions" in last.detail
    assert "set-model" in last.detail


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["search", "q", "--collection", "nope"], "no collection named 'nope'"),
        (["search", "q", "-c", "notes", "--filter", "{bad"], "--filter is not valid JSON"),
        (
            ["search", "q", "-c", "notes", "--filter", '{"a": {"$regex": "x"}}'],
            "unknown filter operator '$regex'",
        ),
        (["search", "q", "-c", "notes", "--mode", "fuzzy"], "search mode 'fuzzy'"),
        (["collection", "create", "c2", "--provider", "fake", "--option", "rpm"], "key=value"),
        (["collection", "create", "c2", "--provider", "fake", "--option", "rpm=lots"], "rpm"),
        (
            "collection create c2 --provider fake --chunk-size 100 --chunk-overlap 100".split(),
            "chunk_overlap < chunk_size",
        ),
        (["collection", "create", "c2", "--provider", "nope"], "unknown provider 'nope'"),
        (["collection", "create", "notes", "--provider", "fake"], "already exists"),
        (["doc", "put", "notes", "k", "--file", "/no/such/file.txt"], "no such file"),
        (["doc", "put", "notes", "k"], "exactly one of --text or --file"),
        (["doc", "put", "notes", "k", "--text", "t", "--metadata", "[1]"], "JSON object"),
        (["doc", "get", "notes", "missing"], "no document 'missing'"),
        (["doc", "list", "notes", "--status", "done"], "--status 'done'"),
        (["ingest", "/no/such/dir", "--collection", "notes"], "/no/such/dir"),
        (["provider", "test", "-c", "notes", "--model", "m"], "leave out --provider"),
    ],
)
def test_bad_input_gets_one_clear_line(db_url: str, args: list[str], needle: str) -> None:
    make_collection(db_url)
    one_clear_line(run_cli(*args, env=cli_env(db_url)), needle)


def test_demo_embeds_and_searches_the_bundled_documents(db_url: str) -> None:
    out = json.loads(
        ok(run_cli("demo", "--jobs", "5", "--provider", "fake", "--json", env=cli_env(db_url)))
    )
    assert out["collection"]["documents"]["embedded"] == 8
    first = out["search"][0]
    assert first["query"].startswith("how do bees") and first["hits"][0]["key"] == "honeybees.md"
