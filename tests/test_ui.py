"""End to end: the dashboard at /ui in headless Chromium, against `embedq serve` run as a
subprocess on a fresh data directory.

The served App (tests/ui_app.py) has a task that fails permanently while a marker file
exists. The test watches such a job die, finds it and its error in the dashboard, removes the
marker, presses Retry, and sees the job succeed; it also signs in with a wrong token, walks
every view, and checks that the page loaded nothing from outside the server.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`, or
`make install`). Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = (
    "the dashboard test drives Debian's Chromium: install it with "
    "`apt-get install chromium chromium-driver` (or run `make install`, which does it via "
    "scripts/ensure_chromium.sh)"
)
WAIT_S = 20.0
START_S = 90.0  # the first start runs initdb and the migrations
PNG = b"\x89PNG\r\n\x1a\n"
TRANSIENT = (
    StaleElementReferenceException,
    NoSuchElementException,
    ElementClickInterceptedException,
    ElementNotInteractableException,
)


@dataclass
class Server:
    url: str
    token: str
    marker: Path
    job_id: int
    later_id: int  # a job due in an hour: pending
    collection: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str) -> dict[str, object]:
        r = httpx.get(
            self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        r.raise_for_status()
        result: dict[str, object] = r.json()
        return result

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], object], what: str, timeout: float, log: Callable[[], str]
) -> None:
    """Poll `check` until it returns something true; fail naming `what` and the server log."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout:g} s (last error: {last!r}); server log:\n{log()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def stop_postmaster(data_dir: Path) -> None:
    """Stop the embedded PostgreSQL our server started, should a kill have left it running."""
    pgdata = data_dir / "pgdata"
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return  # it stopped with the server, as it should
    if str(pgdata).encode() not in cmdline:
        return  # a stale pid file: that pid is someone else's now
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """`embedq serve` with one in-process worker on a fresh data directory, seeded with a
    collection and one `ui.flaky` job that has died."""
    # Not under pytest's tmp_path: as root, the embedded server runs as another user that
    # must traverse the path, and each pytest session resets pytest-of-root to mode 0700.
    base = Path(tempfile.mkdtemp(prefix="embedq-ui-"))
    data_dir, marker, log = base / "data", base / "marker", base / "serve.log"
    marker.write_text("while this file exists, ui.flaky fails\n")
    port = free_port()
    token = "eq_" + secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env.pop("DATABASE_URL", None)
    env.update(
        EMBEDQ_DATA_DIR=str(data_dir),
        EMBEDQ_ADMIN_TOKEN=token,
        EMBEDQ_APP="ui_app:app",
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, "-m", "embedq", "--data-dir", str(data_dir), "serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base)
    srv = Server(f"http://127.0.0.1:{port}", token, marker, 0, 0, "", proc, log)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"embedq serve exited with {proc.returncode}:\n{srv.log_tail()}")
            return httpx.get(srv.url + "/health/ready", timeout=5).status_code == 200

        wait_for(ready, "embedq serve was not ready", START_S, srv.log_tail)
        seeded = subprocess.run(
            [sys.executable, "-m", "ui_app", str(marker)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=base,
        )
        assert seeded.returncode == 0, seeded.stderr
        ids = json.loads(seeded.stdout.strip().splitlines()[-1])
        srv.job_id, srv.later_id = int(ids["job_id"]), int(ids["later_id"])
        srv.collection = str(ids["collection"])
        wait_for(
            lambda: srv.api(f"/v1/jobs/{srv.job_id}")["state"] == "dead",
            f"job {srv.job_id} did not die",
            WAIT_S,
            srv.log_tail,
        )
        yield srv
    finally:
        stop(proc)
        stop_postmaster(data_dir)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def chromium() -> None:
    """Fail (never skip) at once when the browser is missing: before the server starts."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: {INSTALL}")


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager never tries to download one.
    d = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture
def page(server: Server, driver: WebDriver) -> WebDriver:
    """The dashboard's sign-in page, with no token remembered."""
    driver.get(server.url + "/ui")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    visible(driver, "login-token")
    return driver


# --- helpers -----------------------------------------------------------------------------


def by_testid(testid: str) -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{testid}"]'


def visible(driver: WebDriver, testid: str) -> WebElement:
    """The displayed element with this data-testid, waiting up to WAIT_S for it."""

    def shown(d: WebDriver) -> WebElement | bool:
        e = d.find_element(*by_testid(testid))
        return e if e.is_displayed() else False

    try:
        found: WebElement = WebDriverWait(driver, WAIT_S, ignored_exceptions=TRANSIENT).until(shown)
    except TimeoutException:
        pytest.fail(f"[data-testid={testid!r}] not shown within {WAIT_S:g} s; {banner(driver)}")
    return found


def click(driver: WebDriver, testid: str) -> None:
    """Click it once it is shown and enabled; an auto-refresh may replace it meanwhile."""

    def clicked(d: WebDriver) -> bool:
        e = d.find_element(*by_testid(testid))
        if not (e.is_displayed() and e.is_enabled()):
            return False
        e.click()
        return True

    try:
        WebDriverWait(driver, WAIT_S, ignored_exceptions=TRANSIENT).until(clicked)
    except TimeoutException:
        pytest.fail(f"could not click [data-testid={testid!r}]; {banner(driver)}")


def text_becomes(driver: WebDriver, testid: str, expected: str | Callable[[str], bool]) -> str:
    """Wait until the element's text is `expected` (or passes it); return the text."""
    seen: list[str] = []

    def matches(d: WebDriver) -> bool:
        text = d.find_element(*by_testid(testid)).text.strip()
        seen.append(text)
        return expected(text) if callable(expected) else text == expected

    try:
        WebDriverWait(driver, WAIT_S, ignored_exceptions=TRANSIENT).until(matches)
    except TimeoutException:
        last = seen[-1] if seen else "(never found)"
        pytest.fail(
            f"[data-testid={testid!r}] still reads {last!r}, not {expected!r}; {banner(driver)}"
        )
    return seen[-1]


def banner(driver: WebDriver) -> str:
    """What the page's error banner says, for failure messages."""
    try:
        e = driver.find_element(*by_testid("error-banner"))
        return f"error banner: {e.text!r}" if e.is_displayed() else "no error shown"
    except NoSuchElementException:
        return "no error banner"


def sign_in(driver: WebDriver, token: str) -> None:
    field = visible(driver, "login-token")
    field.clear()
    field.send_keys(token)
    click(driver, "login-submit")


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000, f"{path} is not a PNG screenshot"
    return path


# --- tests -------------------------------------------------------------------------------


def test_wrong_token_is_refused_at_sign_in(server: Server, page: WebDriver) -> None:
    sign_in(page, "eq_" + "x" * 40)
    message = text_becomes(page, "login-error", lambda t: "not valid" in t)
    assert "request id" in message
    assert page.find_element(*by_testid("view-login")).is_displayed()
    assert not page.find_element(By.ID, "nav").is_displayed()

    # A remembered token that stops working sends the user back here with the reason.
    page.execute_script("sessionStorage.setItem('embedq.token', arguments[0])", "eq_" + "y" * 40)
    page.refresh()
    text_becomes(page, "login-error", lambda t: "not valid" in t)


def test_failed_job_is_retried_from_the_dashboard(server: Server, page: WebDriver) -> None:
    job = server.job_id
    sign_in(page, server.token)
    text_becomes(page, "whoami", lambda t: "admin" in t)
    click(page, "nav-failed")

    row = visible(page, f"failed-job-{job}")
    assert "ui.flaky" in row.text
    text_becomes(page, f"failed-state-{job}", "dead")
    text_becomes(page, f"error-kind-{job}", lambda t: t not in ("", "\u2013"))
    assert page.find_elements(*by_testid(f"retry-{job}"))
    assert not page.find_elements(*by_testid(f"cancel-{job}"))

    # The error unfolds, and API text is shown as text: the tag in it is not markup.
    click(page, f"failed-error-summary-{job}")
    error = text_becomes(page, f"failed-error-text-{job}", lambda t: "marker file" in t)
    assert "<b>not bold</b>" in error
    assert not visible(page, f"failed-job-{job}").find_elements(By.TAG_NAME, "b")
    screenshot(page, "ui-failed-job.png")

    server.marker.unlink()
    click(page, f"retry-{job}")
    text_becomes(page, "notice-text", f"Job #{job} queued again.")
    click(page, "notice-link")
    text_becomes(page, "job-detail-state", "succeeded")
    assert "ui.flaky" in visible(page, "job-detail").text
    events = visible(page, "job-events").text
    assert "succeeded" in events

    # The jobs list agrees, and the job has left the failed view.
    page.get(f"{server.url}/ui/#jobs?task=ui.flaky")
    text_becomes(page, f"job-state-{job}", "succeeded")
    click(page, "nav-failed")
    visible(page, "failed-table")
    WebDriverWait(page, WAIT_S).until(
        lambda d: not d.find_elements(*by_testid(f"failed-job-{job}"))
    )


def test_pending_job_is_cancelled_from_its_page(server: Server, page: WebDriver) -> None:
    job = server.later_id
    sign_in(page, server.token)
    visible(page, "view-overview")
    page.get(f"{server.url}/ui/#job/{job}")
    text_becomes(page, "job-detail-state", "pending")
    assert not page.find_elements(*by_testid(f"job-retry-{job}"))
    click(page, f"job-cancel-{job}")
    text_becomes(page, "notice-text", f"Job #{job} cancelled.")
    text_becomes(page, "job-detail-state", "cancelled")
    visible(page, f"job-retry-{job}")

    # An API error reaches the user with its message and request id.
    page.get(f"{server.url}/ui/#job/999999")
    text_becomes(page, "error-message", lambda t: "999999" in t)
    text_becomes(page, "error-request-id", lambda t: t.startswith("request id "))


def test_every_view_renders_from_the_server_alone(server: Server, page: WebDriver) -> None:
    sign_in(page, server.token)

    # Overview: counts, the chart drawn from the last hour's jobs, and the queue table.
    text_becomes(page, "stat-value-workers_alive", "1")
    visible(page, "stat-pending")
    WebDriverWait(page, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="throughput-chart"] svg g.bar')
    )
    visible(page, "queue-row-ui")
    click(page, "pause-ui")
    text_becomes(page, "queue-state-ui", "paused")
    click(page, "resume-ui")
    text_becomes(page, "queue-state-ui", "active")
    screenshot(page, "ui-overview.png")

    # Workers: the server's in-process worker.
    click(page, "nav-workers")
    pids = WebDriverWait(page, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid^="worker-pid-"]')
    )
    assert str(server.proc.pid) in [p.text for p in pids]

    # Collections: the seeded one, embedded by that worker.
    click(page, "nav-collections")
    visible(page, f"collection-{server.collection}")
    assert "fake" in visible(page, f"collection-{server.collection}").text
    text_becomes(page, f"progress-text-{server.collection}", "3 / 3 (100%)")

    # Search: a keyword query finds the one document that has the word.
    click(page, "nav-search")
    WebDriverWait(page, WAIT_S).until(
        lambda d: (
            server.collection
            in [o.text for o in Select(d.find_element(*by_testid("search-collection"))).options]
        )
    )
    Select(page.find_element(*by_testid("search-collection"))).select_by_visible_text(
        server.collection
    )
    Select(page.find_element(*by_testid("search-mode"))).select_by_value("keyword")
    visible(page, "search-query").send_keys("vinegar")
    click(page, "search-submit")
    text_becomes(page, "hit-key-0", "kettle")
    marked = visible(page, "hit-text-0").find_elements(By.TAG_NAME, "mark")
    assert [m.text for m in marked] == ["vinegar"]

    # Settings: each with its source; the admin token masked.
    click(page, "nav-settings")
    visible(page, "setting-worker_concurrency")
    source = text_becomes(
        page,
        "setting-source-worker_concurrency",
        lambda t: t in ("cli", "env", "database", "default"),
    )
    assert source == "default"
    value = visible(page, "setting-input-worker_concurrency")
    value.clear()
    value.send_keys("7")
    click(page, "setting-save-worker_concurrency")
    text_becomes(page, "notice-text", "Saved worker_concurrency.")
    text_becomes(page, "setting-source-worker_concurrency", "database")
    text_becomes(page, "setting-value-worker_concurrency", "7")
    click(page, "setting-reset-worker_concurrency")
    text_becomes(page, "setting-source-worker_concurrency", "default")
    # Masked by the API ("*"), or by the page for settings flagged secret ("\u2022").
    text_becomes(page, "setting-value-admin_token", lambda t: bool(t) and set(t) <= {"*", "\u2022"})
    assert server.token not in visible(page, "settings-table").text
    assert server.token not in page.page_source

    # Every resource the page loaded came from the server itself.
    origin = page.execute_script("return location.origin")
    assert origin == server.url
    urls = page.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat(performance.getEntriesByType('navigation').map(e => e.name))"
    )
    assert any(u.endswith("/ui/app.js") for u in urls), urls
    outside = [u for u in urls if not u.startswith(origin + "/")]
    assert not outside, f"the dashboard loaded resources from elsewhere: {outside}"
