"""Optional OpenTelemetry tracing: a span per job, per embed batch and per provider call.

    with tracing.span("embedq.job", job_id=7, task="send", queue="default") as sp:
        ...                                 # attributes embedq.job_id, embedq.task, ...
        sp.set_attribute("embedq.outcome", "succeeded")

Without the `opentelemetry` package `span` is a shared do-nothing context manager: no import,
no warning, no cost worth measuring. With it, spans come from the global tracer provider, which
is OpenTelemetry's own no-op until something configures one: `setup()` does when the standard
OTLP variables ask for it (`pip install 'embedq[otel]'`, then OTEL_EXPORTER_OTLP_ENDPOINT),
or the embedding application configures its own.

Attributes carry ids, names and counts, never document text or secrets. A failure marks its
span with the error's class (`error.type`), not its message: messages can quote inputs, and
the job's `last_error` in the database has them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

try:
    from opentelemetry import trace as otel_trace

    OTEL_AVAILABLE = True
except ImportError:  # the `otel` extra is not installed
    OTEL_AVAILABLE = False

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

AttributeValue = str | bool | int | float


class Span(Protocol):
    """What a `with span(...) as sp` block gets: OpenTelemetry's span, or a stand-in."""

    def set_attribute(self, key: str, value: AttributeValue) -> None: ...


class _NoSpan:
    """The span and context manager of a process without OpenTelemetry: stateless, shared."""

    __slots__ = ()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


_NO_SPAN = _NoSpan()
_tracer: Tracer | None = None
_configured = False


def span(name: str, **attributes: AttributeValue | None) -> contextlib.AbstractContextManager[Span]:
    """A span around a block (sync or async code alike), current for the spans it encloses.
    A plain keyword attribute is prefixed `embedq.` (`task=` gives `embedq.task`); a dotted
    one is kept as it is (`**{"http.method": "GET"}`). None values are left out."""
    if not OTEL_AVAILABLE:
        return _NO_SPAN
    return _otel_span(
        name,
        {k if "." in k else f"embedq.{k}": v for k, v in attributes.items() if v is not None},
    )


@contextlib.contextmanager
def _otel_span(name: str, attributes: dict[str, AttributeValue]) -> Iterator[Span]:
    global _tracer
    if _tracer is None:
        # A proxy until a provider is configured, then that provider's tracer: safe to keep.
        _tracer = otel_trace.get_tracer("embedq")
    with _tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as sp:
        try:
            yield sp
        except Exception as exc:
            failed(sp, exc)
            raise


def failed(sp: Span, exc: BaseException) -> None:
    """Mark a span failed with the error's class (the message stays out, see above)."""
    if not OTEL_AVAILABLE or isinstance(sp, _NoSpan):
        return
    kind = type(exc).__name__
    sp.set_attribute("error.type", kind)
    if isinstance(sp, otel_trace.Span):
        sp.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, kind))


def use_provider(provider: TracerProvider | None) -> None:
    """Take spans from `provider` rather than the global one (None: back to the global).
    For tests: OpenTelemetry lets a process set its global provider only once."""
    global _tracer
    _tracer = provider.get_tracer("embedq") if provider is not None else None


def setup() -> bool:
    """Export spans over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT)
    is set, the SDK and exporter are installed and no tracer provider is configured yet.
    The service name comes from OTEL_SERVICE_NAME (default "embedq"); the exporter reads the
    other OTEL_EXPORTER_OTLP_* variables itself. Idempotent; True when spans are exported.
    Otherwise it does nothing, silently: tracing is optional."""
    global _configured
    if _configured:
        return True
    if not OTEL_AVAILABLE or not (
        # OpenTelemetry's standard variables, read where OpenTelemetry itself would read them
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return False
    if not isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider):
        return False  # the application configured its own: spans go there
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "embedq"}))
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    otel_trace.set_tracer_provider(provider)
    _configured = True
    return True
