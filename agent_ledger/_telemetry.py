"""Observability: an OpenTelemetry span per call (when ``opentelemetry-api`` is installed) and a
structured log record per call on the ``agent_ledger`` logger (fields under ``record.agent_ledger``)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._flow import Invoke, Op, Plan, Replayed

__all__ = ["CallObserver", "Telemetry"]

log = logging.getLogger("agent_ledger")


@dataclass
class CallObserver:
    """What a driver saw while carrying out one call."""

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


class Telemetry:
    """Spans and log records for calls."""

    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError:  # the optional extra is not installed
            self._tracer: Any = None
        else:
            self._tracer = trace.get_tracer("agent_ledger", tracer_provider=tracer_provider)

    @contextlib.contextmanager
    def call(self, plan: Plan) -> Iterator[CallObserver]:
        """Observe one call: a span around it and a log record after it."""
        seen = CallObserver()
        span_cm = (
            self._tracer.start_as_current_span(f"agent_ledger {plan.tool}", record_exception=True)
            if self._tracer is not None
            else contextlib.nullcontext()
        )
        started = time.perf_counter()
        with span_cm as span:
            outcome = "error"
            try:
                yield seen
                outcome = "replayed" if seen.replayed else "executed"
            except BaseException as exc:
                outcome = f"raised {type(exc).__name__}"
                raise
            finally:
                fields = {
                    "key": plan.key,
                    "tool": plan.tool,
                    "workflow_id": plan.workflow_id,
                    "outcome": outcome,
                    "attempt": seen.attempt,
                    "replay": seen.replayed,
                    "executed": seen.executed,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                }
                if span is not None:
                    for name, value in fields.items():
                        if value is not None:
                            span.set_attribute(f"agent_ledger.{name}", value)
                level = logging.DEBUG if seen.replayed else logging.INFO
                if log.isEnabledFor(level):
                    log.log(level, "%s %s (%s)", plan.tool, outcome, plan.key, extra={"agent_ledger": fields})
