"""agent statistics and metrics: per-minute and per-hour rollups, cumulative totals, watermarks

Revision ID: 0013_stats
Revises: 0012_logs
Create Date: 2026-12-07 04:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013_stats"
down_revision = "0012_logs"
branch_labels = None
depends_on = None

# Keep in step with app/stats/buckets.py: BUCKETS counters, bucket 0 below 1 ms, bucket i in
# [2^((i-1)/8), 2^(i/8)) ms, the last one everything from 2^27 ms (37 hours) up.
BUCKETS = 218
ZEROS = "{" + ",".join(["0"] * BUCKETS) + "}"
FINISHED = ("succeeded", "failed", "timed_out", "cancelled")

FUNCTIONS = (
    # The histogram bucket of a duration in milliseconds (NULL: nothing to count). The small
    # epsilon puts an exact power of 2^(1/8) in the bucket it starts, despite rounding.
    f"""
    CREATE FUNCTION runyard_hist_bucket(ms float8) RETURNS int
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
      SELECT CASE WHEN ms IS NULL THEN NULL WHEN ms < 1 THEN 0
                  ELSE least(floor(ln(ms) * 8 / ln(2) + 1e-9)::int + 1, {BUCKETS - 1}) END
    $$
    """,
    # plpgsql updates the aggregate's array in place (an expanded array): O(1) per row.
    """
    CREATE FUNCTION runyard_hist_add(state bigint[], bucket int) RETURNS bigint[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
    BEGIN
      IF bucket IS NOT NULL THEN
        state[bucket + 1] := state[bucket + 1] + 1;
      END IF;
      RETURN state;
    END
    $$
    """,
    # A loop in plpgsql, in place: twice as fast as array_agg over unnest.
    """
    CREATE FUNCTION runyard_hist_merge(a bigint[], b bigint[]) RETURNS bigint[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
    BEGIN
      IF a IS NULL THEN RETURN b; END IF;
      IF b IS NULL THEN RETURN a; END IF;
      FOR i IN 1 .. array_length(b, 1) LOOP
        a[i] := a[i] + b[i];
      END LOOP;
      RETURN a;
    END
    $$
    """,
    f"""
    CREATE AGGREGATE runyard_hist(int) (
      SFUNC = runyard_hist_add, STYPE = bigint[], INITCOND = '{ZEROS}'
    )
    """,
)


def _org() -> sa.Column:
    return sa.Column(
        "org_id",
        sa.UUID(),
        sa.ForeignKey("organizations.id", ondelete="CASCADE"),
        nullable=False,
    )


def _agent(primary_key: bool = False) -> sa.Column:
    return sa.Column(
        "agent_id",
        sa.UUID(),
        sa.ForeignKey("agents.id", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
    )


def _hist(name: str) -> sa.Column:
    return sa.Column(name, postgresql.ARRAY(sa.BigInteger()), nullable=False)


def upgrade() -> None:
    for statement in FUNCTIONS:
        op.execute(statement)
    op.create_table(
        "stats_watermarks",
        sa.Column(
            "org_id",
            sa.UUID(),
            sa.ForeignKey("organizations.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "finished_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("'epoch'"),
            nullable=False,
        ),
        sa.Column(
            "finished_id",
            sa.UUID(),
            server_default=sa.text("'00000000-0000-0000-0000-000000000000'"),
            nullable=False,
        ),
        sa.Column(
            "queued_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("'epoch'"),
            nullable=False,
        ),
        sa.Column(
            "queued_id",
            sa.UUID(),
            server_default=sa.text("'00000000-0000-0000-0000-000000000000'"),
            nullable=False,
        ),
    )
    op.create_table(
        "agent_stats_rollups",
        _agent(primary_key=True),
        sa.Column("span_seconds", sa.Integer(), primary_key=True),
        sa.Column("bucket_start", sa.DateTime(timezone=True), primary_key=True),
        _org(),
        *(sa.Column(status, sa.BigInteger(), nullable=False) for status in FINISHED),
        _hist("durations"),
        _hist("queue_waits"),
        sa.Column("last_failure_id", sa.UUID(), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_agent_stats_rollups_bucket_start", "agent_stats_rollups", ["bucket_start"])
    op.create_table(
        "execution_totals",
        _agent(primary_key=True),
        sa.Column("queue", sa.String(63), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        _org(),
        sa.Column("executions", sa.BigInteger(), nullable=False),
        _hist("durations"),
        sa.Column("duration_ms_sum", sa.Float(), nullable=False),
        _hist("queue_waits"),
        sa.Column("queue_wait_ms_sum", sa.Float(), nullable=False),
    )
    op.create_table(
        "submission_totals",
        _agent(primary_key=True),
        _org(),
        sa.Column("submitted", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "schedule_lag_totals",
        sa.Column("id", sa.SmallInteger(), primary_key=True),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("schedule_id", sa.UUID(), nullable=False),
        sa.Column("fire_time", sa.DateTime(timezone=True), nullable=False),
        _hist("lags"),
        sa.Column("lag_ms_sum", sa.Float(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_schedule_lag_totals_one_row")),
    )
    # The tally's watermark on schedule fires (no execution's path touches this table).
    op.create_index("ix_schedule_fires_fired_at", "schedule_fires", ["fired_at"])


def downgrade() -> None:
    op.drop_index("ix_schedule_fires_fired_at", table_name="schedule_fires")
    for table in (
        "schedule_lag_totals",
        "submission_totals",
        "execution_totals",
        "agent_stats_rollups",
        "stats_watermarks",
    ):
        op.drop_table(table)
    op.execute("DROP AGGREGATE runyard_hist(int)")
    op.execute("DROP FUNCTION runyard_hist_merge(bigint[], bigint[])")
    op.execute("DROP FUNCTION runyard_hist_add(bigint[], int)")
    op.execute("DROP FUNCTION runyard_hist_bucket(float8)")
