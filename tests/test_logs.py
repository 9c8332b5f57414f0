"""Log lines carry the ids of the job or request they belong to: JSON lines as an operator's
log shipper reads them."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

from tests.api_helpers import client, token
from tests.conftest import drain

import embedq
from embedq import logs
from embedq.jobs import JobSpec
from embedq.settings import Settings


@contextlib.contextmanager
def _capture(fmt: str = "json") -> Iterator[io.StringIO]:
    """embedq's own logging set up as the CLI does, writing to a buffer; the root logger's
    handlers and level are put back afterwards (pytest's capture lives there)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    logs.setup(Settings.load(cli={"log_format": fmt, "log_level": "INFO"}))
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        yield stream
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def test_job_log_lines_carry_the_job_and_worker_ids(app: embedq.App) -> None:
    @app.task(name="test.logs.talk")
    async def talk(word: str) -> None:
        logging.getLogger("user.task").info("said %s", word)

    with _capture() as stream:
        [ticket] = await app.enqueue([JobSpec("test.logs.talk", {"word": "hello"})])
        w = await drain(app)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    [said] = [r for r in lines if r["logger"] == "user.task"]
    assert said["message"] == "said hello"
    assert said["job_id"] == ticket.id
    assert said["worker_id"] == w.id
    assert {"ts", "level", "logger", "message"} <= set(said)


def test_text_lines_append_the_ids() -> None:
    with _capture("text") as stream:
        with logs.context(request_id="r-1", job_id=7):
            logging.getLogger("embedq.test").warning("inside")
        logging.getLogger("embedq.test").warning("outside")
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("inside [request_id=r-1 job_id=7]")
    assert outside.endswith("outside")


async def test_request_log_lines_carry_the_request_id(app: embedq.App) -> None:
    secret = await token(app, "logs-reader", "read")
    with _capture() as stream:
        async with client(app, secret) as c:
            r = await c.get("/v1/queues", headers={"X-Request-ID": "trace-me-42"})
            assert r.status_code == 200
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [r for r in lines if r["logger"] == "embedq.api.access"]
    assert access and access[-1]["request_id"] == "trace-me-42"
    assert "GET /v1/queues 200" in access[-1]["message"]
