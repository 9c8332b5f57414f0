"""The exceptions embedq raises, one tree, so callers and the retry policy read the class.

    EmbedqError
    ├── ConfigurationError          a setting is invalid or missing; the message names it
    ├── DatabaseError               the database cannot be used
    │   ├── DatabaseUnavailable     unreachable, refused, restarting (transient)
    │   ├── DatabaseAuthFailed      wrong user or password
    │   ├── DatabaseConflict        deadlock or serialization failure: retry (transient)
    │   ├── ExtensionMissing        the server lacks pgvector
    │   └── SchemaError             schema too new for this code, or not migrated
    ├── JobError                    a job cannot be enqueued or changed as asked
    │   ├── InvalidJob              bad task name, arguments, priority, cron, queue
    │   ├── UnknownTask             no task of that name is registered
    │   ├── UnknownQueue            no queue of that name is known
    │   └── JobNotFound
    ├── InvalidInput                a value PostgreSQL refuses (a NUL character, out of range)
    ├── TokenError                  an API token cannot be created or revoked as asked
    ├── WebhookError                a webhook delivery failed: retried with backoff
    │   └── WebhookRejected         the receiver refused it for good (a 4xx): dead at once
    ├── PermanentError              raised by a task: dead-letter at once, never retry
    ├── TaskTimeout                 a task ran past its timeout (transient)
    ├── CollectionError             a collection or document cannot be used as asked
    │   ├── CollectionNotFound
    │   ├── CollectionExists
    │   ├── DocumentNotFound
    │   ├── InvalidDocument         bad key, text, metadata or filter
    │   ├── ModelMismatch           a model change that must be a model switch
    │   └── InvalidWatch            a table watch cannot be created or used as asked
    └── ProviderError               an embedding provider failed
        ├── TransientProviderError  (RateLimited, ProviderTimeout, ProviderUnavailable,
        │                            CircuitOpen)
        └── PermanentProviderError  (ModelNotFound, AuthenticationFailed, BadInput,
                                     ProviderMissing)

A task signals "do not retry" by raising `PermanentError` (or a subclass such as
`PermanentProviderError`); every other exception is transient and retried with backoff
until the job's attempts are spent.
"""

from __future__ import annotations


class EmbedqError(Exception):
    """Base of every error embedq raises on purpose."""


class ConfigurationError(EmbedqError):
    """A setting is invalid or missing; the message names the setting and the fix."""


class DatabaseError(EmbedqError):
    """The database cannot be used."""


class DatabaseUnavailable(DatabaseError):
    """The database is unreachable or refusing connections; usually transient."""


class DatabaseAuthFailed(DatabaseError):
    """The server rejected the user or password."""


class DatabaseConflict(DatabaseError):
    """A concurrent transaction conflicted (deadlock, serialization failure); retry."""


class ExtensionMissing(DatabaseError):
    """The server has no pgvector extension available."""


class SchemaError(DatabaseError):
    """The database schema is not what this code needs (too new, or not migrated)."""


class JobError(EmbedqError):
    """A job cannot be enqueued or changed as asked."""


class InvalidJob(JobError):
    """A job's task name, arguments, priority, schedule or queue is invalid."""


class UnknownTask(JobError):
    """No task of that name is registered with the app."""


class UnknownQueue(JobError):
    """No queue of that name is known to the database."""


class JobNotFound(JobError):
    """No job has that id (or it is not in a state the action applies to)."""


class InvalidInput(EmbedqError):
    """A value the database cannot store: a NUL character in text, a number out of range."""


class TokenError(EmbedqError):
    """An API token cannot be created or revoked as asked (bad name or scope, unknown)."""


class PermanentError(EmbedqError):
    """Raised by a task to dead-letter its job at once: retrying cannot help."""


class WebhookError(EmbedqError):
    """A webhook delivery failed in a way that may pass (5xx, 408, 429, time-out, refused
    connection); `retry_after` holds the receiver's Retry-After in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WebhookRejected(WebhookError, PermanentError):
    """The receiver refused a delivery for good (a 4xx other than 408 and 429, a redirect)."""


class TaskTimeout(EmbedqError):
    """A task ran longer than its timeout; retried like any transient failure."""


class CollectionError(EmbedqError):
    """A collection or document cannot be used as asked."""


class CollectionNotFound(CollectionError):
    """No collection of that name exists."""


class CollectionExists(CollectionError):
    """A collection of that name already exists."""


class DocumentNotFound(CollectionError):
    """No document of that key exists in the collection."""


class InvalidDocument(CollectionError):
    """A document's key, text, title or metadata (or a search filter) is invalid."""


class ModelMismatch(CollectionError):
    """A different model was asked of a collection outside a model switch."""


class InvalidWatch(CollectionError):
    """A table watch cannot be created or used as asked (unknown table or column, a key
    column that is not unique, a collection already watched)."""


class ProviderError(EmbedqError):
    """An embedding provider failed."""


class TransientProviderError(ProviderError):
    """A provider failure that may pass: retried with backoff."""


class RateLimited(TransientProviderError):
    """The provider answered 429; `retry_after` holds its Retry-After in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProviderTimeout(TransientProviderError):
    """The provider did not answer in time."""


class ProviderUnavailable(TransientProviderError):
    """The provider is unreachable or answered 5xx."""


class CircuitOpen(TransientProviderError):
    """The endpoint's circuit breaker is open: no call is made until `retry_after` passes."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentProviderError(ProviderError, PermanentError):
    """A provider failure that retrying cannot fix: dead-lettered at once."""


class ModelNotFound(PermanentProviderError):
    """The provider does not serve the configured model."""


class AuthenticationFailed(PermanentProviderError):
    """The provider rejected the API key."""


class BadInput(PermanentProviderError):
    """The provider rejected the input itself (400)."""


def is_permanent(exc: BaseException) -> bool:
    """Whether a failure must dead-letter its job at once rather than be retried."""
    return isinstance(exc, PermanentError)


class ProviderMissing(PermanentProviderError):
    """The provider's optional dependencies are not installed; the message says which extra."""
