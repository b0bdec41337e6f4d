"""app/db.py's Database on its own."""

import threading

from sqlalchemy import text

import app.db


def test_a_thread_that_comes_while_the_pools_are_built_finds_them_all(database_url, monkeypatch):
    """The first requests of a new API process arrive at once: one thread builds the engines
    under the lock while the others may look without it (a 500 on the first burst before)."""
    building = threading.Event()
    built = threading.Event()
    real = app.db.create_engine
    calls = []

    def slow_create_engine(*args, **kwargs):
        calls.append(kwargs.get("isolation_level"))
        if len(calls) == 2:  # the first engine is made: the other thread looks now
            building.set()
            built.wait(timeout=5)
        return real(*args, **kwargs)

    monkeypatch.setattr(app.db, "create_engine", slow_create_engine)
    database = app.db.Database()
    database.configure(database_url)
    builder = threading.Thread(target=lambda: database.engine)
    builder.start()
    assert building.wait(timeout=5)
    found = []
    looker = threading.Thread(target=lambda: found.append(_select_one(database)))
    looker.start()
    looker.join(timeout=0.5)
    built.set()
    builder.join(timeout=10)
    looker.join(timeout=10)
    assert found == [1]
    database.dispose()


def _select_one(database: app.db.Database) -> int:
    with database.hot() as conn:
        return conn.execute(text("SELECT 1")).scalar_one()
