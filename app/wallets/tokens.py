"""The wallet service's access token: the organization's secret named by
RUNYARD_WALLET_ENGINE_TOKEN_SECRET, opened where it is used and never stored elsewhere."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection

from app.config import current_config
from app.secrets.services import SecretsMissing, values
from app.wallets.engine import WalletServiceFailed


def access_token(conn: Connection, org_id: uuid.UUID) -> str:
    name = current_config().wallet.token_secret
    try:
        return values(conn, org_id, frozenset({name}))[name]
    except SecretsMissing:
        raise WalletServiceFailed(
            f"the organization has no secret {name!r} with the wallet service's access token",
            hint=f"PUT /api/v1/secrets/{name} with the access token "
            "(RUNYARD_WALLET_ENGINE_TOKEN_SECRET names the secret)",
        ) from None
