"""The sweeper's publishing: batches until done, and the recovery after the broker lost its data.

The agent here routes to a queue no worker serves, so the messages the sweeper publishes stay in
Redis where the tests count them.
"""

import json
import threading
import time
import uuid

import pytest
import redis
from sqlalchemy import text

from app.broker import LOCK_KEY, MARKER_KEY, BrokerWatch
from app.config import current_config
from app.db import db
from app.executions import dispatch, recovery
from app.executions.versions import specs
from tests.beat import BeatProcess
from tests.brokers import redis_broker_only

QUEUE = f"sweeper-test-{uuid.uuid4().hex[:8]}"

# Kombu's Redis keys and the marker key in the broker's Redis; on RabbitMQ the same recovery is
# tested by tests/workers/test_sweeper_rabbitmq.py.
pytestmark = [pytest.mark.worker, redis_broker_only]


@pytest.fixture
def broker():
    client = redis.Redis.from_url(current_config().broker_url)
    yield client
    client.delete(*client.keys(f"{QUEUE}*") or ["-"])


@pytest.fixture
def agent_id(live_client, live_org) -> uuid.UUID:
    created = live_client.post(
        "/api/v1/agents",
        json={
            "name": "unserved",
            "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
            "queue": QUEUE,
        },
        headers=live_org.headers,
    )
    assert created.status_code == 201, created.get_json()
    return uuid.UUID(created.get_json()["id"])


def insert_queued(
    agent_id: uuid.UUID, count: int, *, dispatched: bool, minutes_ago: int = 5
) -> list[uuid.UUID]:
    """Rows as the API leaves them: committed and queued, published (stamped) or not yet."""
    with db.hot() as conn:
        return list(
            conn.execute(
                text(
                    "INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, "
                    "agent_version, status, input, queued_at, dispatched_at) "
                    "SELECT gen_random_uuid(), a.org_id, a.id, a.current_version_id, a.name, "
                    "a.current_version, 'queued', '{}', "
                    "now() - make_interval(mins => :minutes_ago) + n * interval '1 millisecond', "
                    "CASE WHEN :dispatched THEN now() END "
                    "FROM agents a, generate_series(1, :count) n WHERE a.id = :agent "
                    "RETURNING id"
                ),
                {
                    "agent": agent_id,
                    "count": count,
                    "dispatched": dispatched,
                    "minutes_ago": minutes_ago,
                },
            ).scalars()
        )


def queued_messages(broker: redis.Redis) -> list[uuid.UUID]:
    """Execution ids of the messages waiting in QUEUE (every priority list of it)."""
    ids = []
    for key in broker.keys(f"{QUEUE}*"):
        for raw in broker.lrange(key, 0, -1):
            ids.append(uuid.UUID(json.loads(raw)["headers"]["id"]))
    return ids


def settle_marker() -> None:
    """A first sweep: after it the marker is set and any recovery it opened is published."""
    recovery.sweep()


def test_undispatched_rows_are_published_in_batches_until_none_is_left(agent_id, broker):
    settle_marker()
    ids = insert_queued(agent_id, recovery.SWEEP_BATCH * 2 + 37, dispatched=False)
    report = recovery.sweep()
    assert report.republished >= len(ids) and report.recovered == 0
    assert sorted(queued_messages(broker)) == sorted(ids), "each row once, none left over"
    with db.hot() as conn:
        unstamped = conn.execute(
            text("SELECT count(*) FROM executions WHERE id = ANY(:ids) AND dispatched_at IS NULL"),
            {"ids": ids},
        ).scalar()
    assert unstamped == 0
    assert recovery.sweep().republished == 0, "stamped rows are not published again"


def test_a_broker_that_lost_its_data_gets_every_queued_row_again(agent_id, broker):
    settle_marker()
    ids = insert_queued(agent_id, recovery.SWEEP_BATCH + 10, dispatched=True)
    quiet = recovery.sweep()
    assert quiet.broker_reset is None and quiet.recovered == 0
    assert queued_messages(broker) == [], "dispatched rows are left alone while Redis holds data"

    # What FLUSHALL does to the keys that matter here (the test database is shared by the run).
    broker.delete(MARKER_KEY)
    report = recovery.sweep()
    assert report.broker_reset and "lost its data" in report.broker_reset
    assert report.recovered >= len(ids)
    assert sorted(queued_messages(broker)) == sorted(ids)

    after = recovery.sweep()
    assert after.broker_reset is None and after.recovered == 0, "one recovery per loss"


def test_a_restarted_broker_is_noticed_by_its_new_run_id(agent_id, broker):
    settle_marker()
    ids = insert_queued(agent_id, 3, dispatched=True)
    broker.set(MARKER_KEY, "run id of the server before the restart")
    report = recovery.sweep()
    assert report.broker_reset == "restarted"
    assert set(ids) <= set(queued_messages(broker))
    assert broker.get(MARKER_KEY) == broker.info("server")["run_id"].encode()


def test_recovery_cut_short_by_its_budget_goes_on_at_the_next_sweep(agent_id, broker):
    settle_marker()
    ids = insert_queued(agent_id, 5, dispatched=True)
    broker.delete(MARKER_KEY)
    watch = BrokerWatch.for_broker(current_config().broker_url, current_config().redis_url)
    report = recovery.SweepReport()
    # A budget already spent: the loss is noticed and recorded, nothing is published yet.
    recovery._recover_from_broker_reset(watch, report, deadline=0, chain_stall_seconds=60)
    assert report.broker_reset and report.recovered == 0
    assert watch.recovery()["published_all"] is False
    later = recovery.sweep()
    assert later.broker_reset is None and later.recovered >= len(ids)
    assert set(ids) <= set(queued_messages(broker))


def sweeps_at_once(count: int) -> list[recovery.SweepReport]:
    """The reports of `count` sweeps started together (as beats on several hosts would)."""
    reports: list[recovery.SweepReport] = []
    sweeps = [
        threading.Thread(target=lambda: reports.append(recovery.sweep())) for _ in range(count)
    ]
    for thread in sweeps:
        thread.start()
    for thread in sweeps:
        thread.join()
    return reports


def test_two_sweeps_at_once_recover_once(agent_id, broker):
    settle_marker()
    ids = insert_queued(agent_id, 50, dispatched=True)
    broker.delete(MARKER_KEY)
    reports = sweeps_at_once(2)
    assert sum(1 for report in reports if report.broker_reset) == 1, reports
    assert sorted(queued_messages(broker)) == sorted(ids)


def test_a_sweep_that_finds_the_lock_held_publishes_nothing(agent_id, broker):
    settle_marker()
    insert_queued(agent_id, 4, dispatched=False)
    broker.delete(MARKER_KEY)
    lock = broker.lock(LOCK_KEY, timeout=30)
    assert lock.acquire(blocking=False)
    try:
        report = recovery.sweep()
    finally:
        lock.release()
    assert report.skipped and report.republished == 0 and report.broker_reset is None
    assert queued_messages(broker) == []
    assert broker.get(MARKER_KEY) is None, "the loss is left for the sweep holding it"
    assert recovery.sweep().broker_reset


def test_redis_and_rabbitmq_brokers_are_watched():
    redis_url = "redis://127.0.0.1:6379/4"
    on_redis = BrokerWatch.for_broker("redis://127.0.0.1:6379/3", redis_url)
    assert on_redis.reads_messages and on_redis.client.connection_pool.connection_kwargs["db"] == 3
    on_rabbitmq = BrokerWatch.for_broker("amqp://guest:guest@127.0.0.1:5672//", redis_url)
    assert not on_rabbitmq.reads_messages
    assert on_rabbitmq.client.connection_pool.connection_kwargs["db"] == 4
    assert BrokerWatch.for_broker("memory://", redis_url) is None


def test_beat_runs_the_sweeper_itself_whatever_the_workers_do(agent_id, broker, tmp_path):
    """Not a task on `default`, which would wait behind the work it rescues: beat sweeps in a
    thread of its own, with its own settings. The session's worker keeps the 30 s dispatch grace,
    so only beat's own sweep (grace 0) can publish these rows within seconds."""
    settle_marker()
    ids = insert_queued(agent_id, 3, dispatched=False, minutes_ago=0)
    beat = BeatProcess(
        tmp_path,
        "sweeping-beat",
        env={"RUNYARD_SWEEP_INTERVAL_SECONDS": "0.5", "RUNYARD_DISPATCH_GRACE_SECONDS": "0"},
    )
    try:
        beat.wait_ready()
        deadline = time.monotonic() + 10
        while sorted(queued_messages(broker)) != sorted(ids):
            assert time.monotonic() < deadline, beat.log()
            time.sleep(0.1)
        jobs = "sweep, chains-resume, flow-tick, durable-tick, idempotency-prune"
        assert f"maintenance in beat: {jobs}" in beat.log()
        # The slow jobs have a thread of their own: they never hold back the flow tick.
        assert "housekeeping in beat: retention, stats-tally, stats-prune" in beat.log()
    finally:
        beat.stop()


def test_messages_a_dead_worker_took_but_never_claimed_go_back_to_their_queue(agent_id, broker):
    """What a SIGKILLed worker leaves: messages popped from the queue into kombu's `unacked`
    hash (as its consumer does on taking them) and never acknowledged. More than one page of
    them, some of whose executions are running (their worker is alive: left alone)."""
    settle_marker()
    ids = insert_queued(agent_id, recovery.STRANDED_PAGE + 300, dispatched=False)
    assert recovery.sweep().republished >= len(ids)
    taken_at = time.time() - 600
    with broker.pipeline() as pipe:
        for key in broker.keys(f"{QUEUE}*"):
            for raw in broker.lrange(key, 0, -1):
                message = json.loads(raw)
                tag = message["properties"]["delivery_tag"]
                pipe.hset("unacked", tag, json.dumps([message, "", QUEUE]))
                pipe.zadd("unacked_index", {tag: taken_at})
            pipe.delete(key)
        pipe.execute()
    running = ids[: recovery.STRANDED_PAGE - 200]
    with db.hot() as conn:
        conn.execute(
            text("UPDATE executions SET status = 'running' WHERE id = ANY(:ids)"), {"ids": running}
        )
    try:
        report = recovery.sweep()
        stranded = sorted(set(ids) - set(running))
        assert report.restored == len(stranded)
        assert sorted(queued_messages(broker)) == stranded, "each stranded message once"
        assert recovery.sweep().restored == 0, "given back once"
        still_held = {
            uuid.UUID(json.loads(raw)[0]["headers"]["id"]) for raw in broker.hvals("unacked")
        }
        assert set(running) <= still_held and not still_held & set(stranded)
    finally:
        with db.hot() as conn:
            conn.execute(text("DELETE FROM executions WHERE id = ANY(:ids)"), {"ids": ids})
        for raw_tag, raw in broker.hgetall("unacked").items():
            if json.loads(raw)[2] == QUEUE:
                broker.hdel("unacked", raw_tag)
                broker.zrem("unacked_index", raw_tag)


def test_queued_rows_whose_message_vanished_are_published_again(agent_id, broker):
    """A message taken out of Redis by a worker killed between its BRPOP and its HSET into
    `unacked` is nowhere: its row, queued and stamped long ago, is published again; a row whose
    message still waits is left alone."""
    settle_marker()
    ids = insert_queued(agent_id, 5, dispatched=True)
    with db.hot() as conn:
        conn.execute(
            text(
                "UPDATE executions SET dispatched_at = now() - interval '5 minutes' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )
        spec = specs.get(
            conn,
            conn.execute(
                text("SELECT version_id FROM executions WHERE id = :id"), {"id": ids[0]}
            ).scalar(),
        )
    waiting = ids[:2]
    dispatch.publish_many([dispatch.Dispatch(execution_id, spec, 5) for execution_id in waiting])
    report = recovery.sweep()
    assert report.vanished == 3, report
    assert sorted(queued_messages(broker)) == sorted(ids), "each row's message once"
    assert recovery.sweep().vanished == 0, "found in the queue now"
