"""agent_ledger: make an AI agent's side effects happen once.

Every tool call gets a deterministic key (workflow id + tool + canonical args). A call whose key already
succeeded returns the recorded result without running the handler; only one worker executes a key; a
crash mid-call is never silently re-executed; everything is an audit row in SQLite or Postgres.
"""

from ._context import current_effect
from ._decide import APPROVAL_TRANSITIONS, TRANSITIONS
from ._flow import NOT_EXECUTED
from ._keys import compute_key, payload_hash
from ._ledger import CallOptions, Ledger, Tool, Workflow, current_workflow
from ._limits import Limit
from ._migrate import migrations_path
from ._models import (
    Approval,
    ApprovalStatus,
    AuditEvent,
    Effect,
    EffectRecord,
    ErrorInfo,
    LimitUsage,
    RecoveryReport,
    Status,
    ToolCall,
)
from ._timeline import Timeline, TimelineEffect, TimelineEntry, WorkflowPage, WorkflowSummary
from .console import ConsoleAuth
from .errors import (
    ApprovalMismatch,
    ApprovalPending,
    ApprovalRefused,
    ApprovalRejected,
    ChannelError,
    ConfigurationError,
    IllegalTransition,
    InProgress,
    InvalidArguments,
    LedgerError,
    LimitExceeded,
    NoWorkflow,
    OutcomeUnknown,
    PayloadMismatch,
    RecordedError,
    ResultNotReplayable,
    SchemaMissing,
    SlackError,
    StepDivergence,
    StorageError,
    WebhookDeliveryError,
)

__version__ = "0.1.0"

__all__ = [
    "NOT_EXECUTED",
    "APPROVAL_TRANSITIONS",
    "TRANSITIONS",
    "Approval",
    "ApprovalMismatch",
    "ApprovalPending",
    "ApprovalRefused",
    "ApprovalRejected",
    "ApprovalStatus",
    "AuditEvent",
    "CallOptions",
    "ChannelError",
    "ConfigurationError",
    "ConsoleAuth",
    "Effect",
    "EffectRecord",
    "ErrorInfo",
    "IllegalTransition",
    "InProgress",
    "InvalidArguments",
    "Ledger",
    "LedgerError",
    "Limit",
    "LimitExceeded",
    "LimitUsage",
    "NoWorkflow",
    "OutcomeUnknown",
    "PayloadMismatch",
    "RecordedError",
    "RecoveryReport",
    "ResultNotReplayable",
    "SchemaMissing",
    "SlackError",
    "Status",
    "StepDivergence",
    "StorageError",
    "Tool",
    "Timeline",
    "TimelineEffect",
    "TimelineEntry",
    "ToolCall",
    "WebhookDeliveryError",
    "Workflow",
    "WorkflowPage",
    "WorkflowSummary",
    "__version__",
    "compute_key",
    "current_effect",
    "current_workflow",
    "migrations_path",
    "payload_hash",
]
