"""The HTTP API reference (docs/api.md) names every route the app serves, and the settings
table in docs/operations.md is the one scripts/gen_settings_doc.py generates. No database."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import pytest
from tests.conftest import ROOT

import embedq
from embedq.api.app import create_app

API_MD = ROOT / "docs" / "api.md"
UNDOCUMENTED = {"/", "/ui", "/openapi.json"}  # redirects to the dashboard, and the spec itself
_CONVERTER = re.compile(r"\{(\w+):\w+\}")  # {key:path} is written {key} in the docs
_HEADING = re.compile(r"^#+ (GET|POST|PUT|PATCH|DELETE) (/\S*)$", re.MULTILINE)


def _generator() -> ModuleType:
    path = ROOT / "scripts" / "gen_settings_doc.py"
    spec = importlib.util.spec_from_file_location("gen_settings_doc", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _walk(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, including those of included routers (which recent
    FastAPI versions keep as one lazy entry per router in `app.routes`)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _walk(included.routes, prefix + route.include_context.prefix)
            continue
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                yield method, _CONVERTER.sub(r"{\1}", prefix + route.path)


def _routes() -> set[tuple[str, str]]:
    api = create_app(embedq.App(), manage=False)  # no database: only App.open() connects
    found = set(_walk(api.routes))
    for path, operations in api.openapi()["paths"].items():
        found.update((method.upper(), path) for method in operations)
    return {(m, p) for m, p in found if p not in UNDOCUMENTED and not p.startswith("/ui/")}


def _mentions(text: str, method: str, path: str) -> bool:
    """Whether `text` names the route, not merely a longer one (GET /v1/queues/stats does
    not document GET /v1/queues)."""
    return re.search(re.escape(f"{method} {path}") + r"(?![\w/{])", text) is not None


def test_every_route_is_documented() -> None:
    routes = _routes()
    assert ("GET", "/v1/jobs/{job_id}") in routes  # the walk found the included routers
    assert ("PUT", "/v1/collections/{name}/documents/{key}") in routes
    text = API_MD.read_text()
    missing = sorted(f"{m} {p}" for m, p in routes if not _mentions(text, m, p))
    assert not missing, f"routes missing from docs/api.md: {', '.join(missing)}"


def test_documented_routes_exist() -> None:
    routes = _routes()
    headings = _HEADING.findall(API_MD.read_text())
    assert len(headings) >= len(routes)
    stale = sorted(f"{m} {p}" for m, p in headings if (m, p) not in routes)
    assert not stale, f"docs/api.md documents routes the app does not serve: {', '.join(stale)}"


def test_operations_settings_block_is_current() -> None:
    gen = _generator()
    text = gen.OPERATIONS.read_text()
    assert text == gen.splice(text), (
        "the settings table in docs/operations.md is stale: run python scripts/gen_settings_doc.py"
    )


def test_operations_settings_block_lists_every_setting() -> None:
    gen = _generator()
    text = gen.OPERATIONS.read_text()
    block = text[text.index(gen.START) : text.index(gen.END)]
    for name in embedq.Settings.model_fields:
        assert f"| `{name}` |" in block


def test_splice_needs_both_markers() -> None:
    gen = _generator()
    with pytest.raises(SystemExit, match="markers"):
        gen.splice("# Operations\n\nno generated block here\n")
    spliced = gen.splice(f"before\n{gen.START}\nold table\n{gen.END}\nafter\n")
    assert spliced.startswith("before\n") and spliced.endswith(f"{gen.END}\nafter\n")
    assert "old table" not in spliced
