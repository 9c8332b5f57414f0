"""embedq: background embeddings and a durable job queue on PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"

from embedq.app import App, load_app
from embedq.documents import Collection, Document, DocumentInput, WriteResult
from embedq.errors import (
    CollectionError,
    CollectionExists,
    CollectionNotFound,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    DocumentNotFound,
    EmbedqError,
    InvalidDocument,
    InvalidJob,
    JobNotFound,
    ModelMismatch,
    PermanentError,
    PermanentProviderError,
    ProviderError,
    SchemaError,
    TransientProviderError,
    UnknownQueue,
    UnknownTask,
)
from embedq.jobs import Enqueued, Job, JobSpec, JobState
from embedq.retry import RetryPolicy
from embedq.search import SearchHit
from embedq.settings import Settings
from embedq.tasks import BatchOutcome, JobContext, Task
from embedq.worker import Worker

__all__ = [
    "App",
    "BatchOutcome",
    "Collection",
    "CollectionError",
    "CollectionExists",
    "CollectionNotFound",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailable",
    "Document",
    "DocumentInput",
    "DocumentNotFound",
    "EmbedqError",
    "Enqueued",
    "InvalidDocument",
    "InvalidJob",
    "Job",
    "JobContext",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "ModelMismatch",
    "PermanentError",
    "PermanentProviderError",
    "ProviderError",
    "RetryPolicy",
    "SchemaError",
    "SearchHit",
    "Settings",
    "Task",
    "TransientProviderError",
    "UnknownQueue",
    "UnknownTask",
    "Worker",
    "WriteResult",
    "__version__",
    "load_app",
]
