"""`ctx.wallet`'s side in the worker: the agent's wallet address, and the decide / send / refresh
calls of app/wallets/transfers.py, each answered as the JSON the execution's journal records
(workers/context_wallet.py makes them durable steps)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

from sqlalchemy import text

from app.errors import ValidationFailed
from app.wallets import transfers
from app.wallets.engine import WalletServiceFailed
from workers.attempt import AttemptDatabase
from workers.context_wallet import ServiceUnanswered

# The execution's organization's: a catalog run of another organization's agent has none.
_ADDRESS = text("SELECT address FROM agent_wallets WHERE agent_id = :agent_id AND org_id = :org_id")


def _journal_form(decision: transfers.Decision) -> dict[str, Any]:
    """The decision as JSON: what a replay reads back from the journal."""

    def plain(value: Any) -> str:
        return value.isoformat() if isinstance(value, dt.datetime) else str(value)

    return json.loads(json.dumps(decision.as_dict(), default=plain))


class DatabaseWallet:
    """The WalletGateway of one attempt."""

    def __init__(
        self,
        database: AttemptDatabase,
        execution_id: uuid.UUID,
        attempt: int,
        org_id: Any,
        agent_id: Any,
    ) -> None:
        self._database = database
        self._execution_id = execution_id
        self._attempt = attempt
        self._org_id = org_id
        self._agent_id = agent_id

    def address(self) -> str | None:
        with self._database.connection() as conn:
            params = {"agent_id": self._agent_id, "org_id": self._org_id}
            return conn.execute(_ADDRESS, params).scalar()

    def decide(self, key: str, chain: str, to: str, amount: str, reason: str) -> dict[str, Any]:
        try:
            decision = transfers.decide(
                self._execution_id, self._attempt, key, chain, to, amount, reason
            )
        except ValidationFailed as exc:
            # The agent's mistake (a malformed address, an amount with 19 decimals): an error
            # it can catch, named like Python's own.
            problems = "; ".join(f"{k}: {', '.join(v)}" for k, v in exc.errors.items())
            raise ValueError(f"ctx.wallet.transfer: {exc.message} ({problems})") from exc
        return _journal_form(decision)

    # An execution moves its own decisions only (the id comes from its journal, which its own
    # code could have written).

    def send(self, decision_id: str) -> dict[str, Any]:
        with _service_answers():
            return _journal_form(transfers.send(uuid.UUID(decision_id), self._execution_id))

    def refresh(self, decision_id: str) -> dict[str, Any]:
        with _service_answers():
            return _journal_form(transfers.refresh(uuid.UUID(decision_id), self._execution_id))

    def expire(self, decision_id: str, reason: str) -> dict[str, Any]:
        return _journal_form(transfers.expire(uuid.UUID(decision_id), self._execution_id, reason))


@contextlib.contextmanager
def _service_answers() -> Iterator[None]:
    """The wallet service's failures as the one error ctx.wallet tries again after a pause."""
    try:
        yield
    except WalletServiceFailed as exc:
        raise ServiceUnanswered(exc.message) from exc
