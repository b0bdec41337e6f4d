"""Every model in one import, so the metadata is complete for Alembic and its tests."""

from app.agents.models import Agent, AgentVersion
from app.chains.models import Chain, ChainExecution, ChainVersion
from app.console.models import UiSession
from app.db import Base
from app.documents.models import Document, ExecutionDocument
from app.events.models import Event
from app.executions.models import Execution, ExecutionLog, ExecutionToken, JournalEntry
from app.idempotency.models import IdempotencyKey
from app.notifications.models import Notification, NotificationEvent
from app.orgs.models import ApiToken, Organization
from app.schedules.models import Schedule, ScheduleFire
from app.secrets.models import Secret
from app.state.models import AgentState
from app.stats.models import (
    AgentStatsRollup,
    ExecutionTotal,
    ScheduleLagTotal,
    StatsWatermark,
    SubmissionTotal,
)
from app.triggers.models import Trigger, TriggerDelivery
from app.wallets.models import AgentWallet, Decision

metadata = Base.metadata

__all__ = [
    "Agent",
    "AgentState",
    "AgentStatsRollup",
    "AgentVersion",
    "AgentWallet",
    "ApiToken",
    "Chain",
    "ChainExecution",
    "ChainVersion",
    "Decision",
    "Document",
    "Event",
    "Execution",
    "ExecutionDocument",
    "ExecutionLog",
    "ExecutionToken",
    "ExecutionTotal",
    "IdempotencyKey",
    "JournalEntry",
    "Notification",
    "NotificationEvent",
    "Organization",
    "Schedule",
    "ScheduleFire",
    "ScheduleLagTotal",
    "Secret",
    "StatsWatermark",
    "SubmissionTotal",
    "Trigger",
    "TriggerDelivery",
    "UiSession",
    "metadata",
]
