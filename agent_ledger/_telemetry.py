"""Observability: an OpenTelemetry span per call (when ``opentelemetry-api`` is installed and a tracer
provider is configured) and a structured log record per call on the ``agent_ledger`` logger (fields
under ``record.agent_ledger``: INFO for executions and failures, DEBUG for replays). When neither is
enabled, a call pays one logger-level check and nothing else."""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ._flow import Invoke, Op, Plan, Replayed

__all__ = ["CallObserver", "Telemetry"]

log = logging.getLogger("agent_ledger")
_MISSING = object()

try:
    from opentelemetry import trace as _otel
except ImportError:  # the optional extra is not installed
    _otel = None  # type: ignore[assignment]


@dataclass
class CallObserver:
    """What a driver saw while carrying out one call, and the span around it."""

    plan: Plan
    span: Any = None
    started: float = field(default_factory=time.perf_counter)
    attempt: int | None = None
    executed: bool = False
    replayed: bool = False

    def saw(self, op: Op) -> None:
        """Note an operation the driver is about to perform."""
        if isinstance(op, Invoke):
            self.executed = True
            self.attempt = op.effect.attempt
        elif isinstance(op, Replayed):
            self.replayed = True
            self.attempt = op.event.get("attempt")

    def end(self, error: BaseException | None) -> None:
        """Close the span and write the log record."""
        plan = self.plan
        outcome = (
            f"raised {type(error).__name__}" if error is not None else ("replayed" if self.replayed else "executed")
        )
        fields = {
            "key": plan.key,
            "tool": plan.tool,
            "workflow_id": plan.workflow_id,
            "outcome": outcome,
            "attempt": self.attempt,
            "replay": self.replayed,
            "executed": self.executed,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
        }
        span = self.span
        if span is not None:
            for name, value in fields.items():
                if value is not None:
                    span.set_attribute(f"agent_ledger.{name}", value)
            if error is not None:
                if plan.redaction is None:
                    span.record_exception(error)
                    span.set_status(_otel.Status(_otel.StatusCode.ERROR, str(error)))
                else:  # the same event as record_exception, with the redacted values' texts scrubbed
                    scrub = plan.redaction.scrub
                    cls = type(error)
                    span.add_event(
                        "exception",
                        {
                            "exception.type": f"{cls.__module__}.{cls.__qualname__}",
                            "exception.message": scrub(str(error)),
                            "exception.stacktrace": scrub(
                                "".join(traceback.format_exception(cls, error, error.__traceback__))
                            ),
                            "exception.escaped": "False",
                        },
                    )
                    span.set_status(_otel.Status(_otel.StatusCode.ERROR, scrub(str(error))))
            span.end()
        level = logging.DEBUG if self.replayed else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s (%s)", plan.tool, outcome, plan.key, extra={"agent_ledger": fields})


class Telemetry:
    """Starts observers for calls."""

    def __init__(self, tracer_provider: Any = None) -> None:
        self._provider = tracer_provider
        self._tracers: dict[int, Any] = {}
        # Whether the SDK would build a global provider from the environment (read once: asking
        # os.environ on every call costs a raised and caught KeyError per call).
        self._env_provider = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ

    def _tracer(self) -> Any:
        if _otel is None:
            return None
        provider = self._provider
        if provider is None:
            # No global provider yet (the API's own module global, read directly; an API version
            # without it takes the public call every time): nothing would record a span.
            if getattr(_otel, "_TRACER_PROVIDER", _MISSING) is None and not self._env_provider:
                return None
            provider = _otel.get_tracer_provider()
            if isinstance(provider, (_otel.ProxyTracerProvider, _otel.NoOpTracerProvider)):
                return None  # nothing would record the span: don't pay for it
            # The global provider can be set only once: from now on it is this one.
            self._provider = provider
        tracer = self._tracers.get(id(provider))
        if tracer is None:
            tracer = self._tracers[id(provider)] = _otel.get_tracer("agent_ledger", tracer_provider=provider)
        return tracer

    def begin(self, plan: Plan) -> CallObserver | None:
        """An observer for this call, or None when nothing would record it."""
        tracer = self._tracer()
        if tracer is None and not log.isEnabledFor(logging.INFO):
            return None  # DEBUG implies INFO: one check covers both log levels
        span = tracer.start_span(f"agent_ledger {plan.tool}") if tracer is not None else None
        return CallObserver(plan, span)
