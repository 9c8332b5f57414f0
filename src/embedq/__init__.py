"""embedq: background embeddings and a durable job queue on PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"

from embedq.app import App, load_app
from embedq.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    EmbedqError,
    InvalidJob,
    JobNotFound,
    PermanentError,
    SchemaError,
    UnknownQueue,
    UnknownTask,
)
from embedq.jobs import Enqueued, Job, JobSpec, JobState
from embedq.retry import RetryPolicy
from embedq.settings import Settings
from embedq.tasks import JobContext, Task
from embedq.worker import Worker

__all__ = [
    "App",
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
