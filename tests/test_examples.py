"""The documented example runs as written."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, cli_env


def test_receipts_example_runs(db_url: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "receipts.py")],
        env=cli_env(db_url),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "synced 50 businesses" in result.stdout
    assert "business -1 does not exist" in result.stdout


def test_settings_reference_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_settings_doc.py"), "--check"]
    )
    assert result.returncode == 0, (
        "docs/settings.md is stale: run python scripts/gen_settings_doc.py"
    )
