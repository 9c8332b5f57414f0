"""Fast unit tests: backoff math, job validation, batch coalescing, settings precedence,
error mapping, and the public API."""

from __future__ import annotations

import random
from datetime import datetime

import psycopg
import pytest

import embedq
from embedq.db import describe_target, map_error
from embedq.errors import (
    ConfigurationError,
    DatabaseAuthFailed,
    DatabaseUnavailable,
    InvalidJob,
    ModelNotFound,
    PermanentError,
    RateLimited,
    is_permanent,
)
from embedq.jobs import JobSpec, coalesce_batch
from embedq.retry import RetryPolicy
from embedq.settings import Settings


def test_public_api_is_pinned() -> None:
    assert sorted(embedq.__all__) == sorted(
        [
            "App",
            "BatchOutcome",
            "Collection",
            "CollectionError",
            "CollectionExists",
            "CollectionNotFound",
            "Document",
            "DocumentInput",
            "DocumentNotFound",
            "InvalidDocument",
            "ModelMismatch",
            "PermanentProviderError",
            "ProviderError",
            "SearchHit",
            "TransientProviderError",
            "WriteResult",
            "ConfigurationError",
            "DatabaseError",
            "DatabaseUnavailable",
            "EmbedqError",
            "Enqueued",
            "InvalidJob",
            "Job",
            "JobContext",
            "JobNotFound",
            "JobSpec",
            "JobState",
            "PermanentError",
            "RetryPolicy",
            "SchemaError",
            "Settings",
            "Task",
            "UnknownQueue",
            "UnknownTask",
            "Worker",
            "__version__",
            "load_app",
        ]
    )
    for name in embedq.__all__:
        assert hasattr(embedq, name)


class TestBackoff:
    def test_delays_grow_and_stay_within_the_jittered_step(self) -> None:
        policy = RetryPolicy(max_attempts=10, base_s=1.0, cap_s=30.0)
        rng = random.Random(7)
        for attempt in range(1, 10):
            step = min(30.0, 2.0 ** (attempt - 1))
            for _ in range(50):
                assert step / 2 <= policy.delay(attempt, rng=rng) <= step

    def test_lower_bound_of_each_step_grows_until_the_cap(self) -> None:
        policy = RetryPolicy(max_attempts=10, base_s=0.5, cap_s=8.0)
        lows = [min(8.0, 0.5 * 2 ** (a - 1)) / 2 for a in range(1, 8)]
        assert lows == sorted(lows) and lows[-1] == 4.0
        assert all(policy.delay(7) <= 8.0 for _ in range(100))

    def test_permanent_errors_and_last_attempts_are_not_retried(self) -> None:
        policy = RetryPolicy(max_attempts=3)
        assert policy.next_delay(1, RuntimeError("x")) is not None
        assert policy.next_delay(2, RuntimeError("x")) is not None
        assert policy.next_delay(3, RuntimeError("x")) is None
        assert policy.next_delay(1, PermanentError("x")) is None
        assert policy.next_delay(1, ModelNotFound("404")) is None

    def test_retry_after_is_honoured_within_the_cap(self) -> None:
        policy = RetryPolicy(max_attempts=5, base_s=0.1, cap_s=60.0)
        assert policy.next_delay(1, RateLimited("429", retry_after=30)) == 30
        assert policy.next_delay(1, RateLimited("429", retry_after=600)) == 60

    @pytest.mark.parametrize("kw", [{"max_attempts": 0}, {"base_s": 0}, {"base_s": 5, "cap_s": 1}])
    def test_invalid_policies_are_refused(self, kw: dict[str, float]) -> None:
        with pytest.raises(InvalidJob):
            RetryPolicy(**kw)  # type: ignore[arg-type]

    def test_error_classes_decide_permanence(self) -> None:
        assert is_permanent(ModelNotFound("m"))
        assert not is_permanent(RateLimited("r"))
        assert not is_permanent(ValueError("v"))


class TestJobSpec:
    @pytest.mark.parametrize(
        ("kw", "needle"),
        [
            ({"priority": -1}, "priority -1"),
            ({"priority": 1001}, "out of range"),
            ({"priority": True}, "priority"),
            ({"queue": ""}, "queue name"),
            ({"queue": "bad queue"}, "queue name"),
            ({"queue": ["a"]}, "queue name"),
            ({"max_attempts": 0}, "max_attempts"),
            ({"timeout_s": -1}, "timeout_s"),
            ({"timeout_s": float("nan")}, "timeout_s"),
            ({"run_at": datetime(2030, 1, 1)}, "timezone-aware"),
            ({"lock_key": ""}, "lock_key"),
            ({"args": {"when": datetime(2030, 1, 1)}}, "cannot be stored as JSON"),
            ({"args": {"x": float("inf")}}, "cannot be stored as JSON"),
            ({"args": {"x": object()}}, "cannot be stored as JSON"),
            ({"args": [1, 2]}, "must be a dict"),
        ],
    )
    def test_bad_input_is_refused_with_a_message(self, kw: dict[str, object], needle: str) -> None:
        with pytest.raises(InvalidJob, match=needle):
            JobSpec("t", **kw)  # type: ignore[arg-type]

    @pytest.mark.parametrize("name", ["", "has space", "1starts-with-digit", "x" * 300])
    def test_bad_task_names(self, name: str) -> None:
        with pytest.raises(InvalidJob, match="task name"):
            JobSpec(name)

    def test_args_are_serialised_once(self) -> None:
        assert JobSpec("t", {"a": [1, "b"]}).args_json == '{"a":[1,"b"]}'


def test_coalesce_batch_keeps_the_last_of_each_dedup_key() -> None:
    specs = [
        JobSpec("t", {"v": 1}, dedup_key="a"),
        JobSpec("t", {"v": 2}),
        JobSpec("t", {"v": 3}, dedup_key="a"),
        JobSpec("t", {"v": 4}, dedup_key="b"),
    ]
    unique, index = coalesce_batch(specs)
    assert [s.args["v"] for s in unique] == [3, 2, 4]
    assert index == [0, 1, 0, 2]


class TestSettings:
    def test_precedence_cli_env_database_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("EMBEDQ_POLL_INTERVAL_S", "3")
        monkeypatch.setenv("EMBEDQ_LEASE_S", "40")
        s = Settings.load(
            cli={"lease_s": 50},
            database={"lease_s": 60, "poll_interval_s": 4, "heartbeat_s": 2},
        )
        assert (s.lease_s, s.source("lease_s")) == (50, "cli")
        assert (s.poll_interval_s, s.source("poll_interval_s")) == (3, "env")
        assert (s.heartbeat_s, s.source("heartbeat_s")) == (2, "database")
        assert (s.retry_base_s, s.source("retry_base_s")) == (1.0, "default")

    def test_database_url_alias(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("EMBEDQ_DATABASE_URL", raising=False)
        monkeypatch.setenv("DATABASE_URL", "postgresql://a@b/c")
        s = Settings.load()
        assert s.database_url is not None
        assert s.database_url.get_secret_value() == "postgresql://a@b/c"
        assert s.source("database_url") == "env"

    @pytest.mark.parametrize(
        ("env", "value", "needle"),
        [
            ("EMBEDQ_WORKER_CONCURRENCY", "many", "worker_concurrency"),
            ("EMBEDQ_WORKER_CONCURRENCY", "0", "greater than or equal to 1"),
            ("EMBEDQ_SCHEMA", "Bad-Schema", "db_schema"),
            ("EMBEDQ_FINISHED_JOBS", "keep", "finished_jobs"),
            ("EMBEDQ_WORKER_QUEUES", "a,b c", "queue name"),
        ],
    )
    def test_invalid_values_name_the_setting_and_the_fix(
        self, monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str
    ) -> None:
        monkeypatch.setenv(env, value)
        with pytest.raises(ConfigurationError, match=needle) as info:
            Settings.load()
        assert env in str(info.value)

    def test_bad_stored_value_points_at_settings_set(self) -> None:
        with pytest.raises(ConfigurationError, match="embedq settings set lease_s"):
            Settings.load(database={"lease_s": "soon"})

    def test_queues_split_on_commas(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("EMBEDQ_WORKER_QUEUES", "high, default,low")
        assert Settings.load().worker_queues == ["high", "default", "low"]


class TestErrorMapping:
    def test_refused_connection(self) -> None:
        err = map_error(
            psycopg.OperationalError("connection refused"), "postgresql://u:secret@h:5/d"
        )
        assert isinstance(err, DatabaseUnavailable)
        assert "u@h:5/d" in str(err) and "secret" not in str(err)

    def test_bad_password(self) -> None:
        err = map_error(
            psycopg.OperationalError('FATAL:  password authentication failed for user "u"')
        )
        assert isinstance(err, DatabaseAuthFailed)
        assert "EMBEDQ_DATABASE_URL" in str(err)

    def test_deadlocks_and_serialization_failures_are_conflicts_not_outages(self) -> None:
        from psycopg import errors as pgerrors

        from embedq.errors import DatabaseConflict, InvalidInput

        for cls in (pgerrors.DeadlockDetected, pgerrors.SerializationFailure):
            err = map_error(cls("deadlock detected"))
            assert isinstance(err, DatabaseConflict), cls
            assert "Retry" in str(err)
        assert isinstance(map_error(pgerrors.UntranslatableCharacter("\\u0000")), InvalidInput)

    def test_describe_target_hides_passwords(self) -> None:
        assert (
            describe_target("postgresql://me:pw@db.internal:5432/app") == "me@db.internal:5432/app"
        )
        assert "pw" not in describe_target("postgresql://me:pw@/app?host=/tmp/sock")


async def test_pool_connections_speak_pgvector(app: embedq.App) -> None:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = await conn.execute("SELECT '[1,2,3]'::vector AS v")
        row = await cur.fetchone()
    assert row is not None and not isinstance(row["v"], str)  # parsed by pgvector, not text
    assert list(row["v"].to_list()) == [1.0, 2.0, 3.0]


def test_heartbeat_must_fit_in_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDQ_LEASE_S", "3")
    with pytest.raises(ConfigurationError, match=r"heartbeat_s \(5\) must be at most half"):
        Settings.load()
    assert Settings.load(cli={"heartbeat_s": 1}).heartbeat_s == 1
