"""Cron fire times in a timezone, through daylight-saving changes.

croniter walks naive wall-clock times; zoneinfo turns each into the instant(s) it names. The
rules at the two changes of the year (tests/app/test_cron.py pins them):

- A wall time that does not exist (spring forward, e.g. 02:30 in Paris on the last Sunday of
  March) fires once, at the same distance past the gap: 02:30 becomes 03:30 CEST (PEP 495, fold 0).
  A daily job still runs that day; if that instant is also a regular fire time it fires once.
- A wall time that happens twice (fall back) fires at its first occurrence. Its second occurrence
  fires too only when the expression fires in every hour (`*/15 * * * *`), so a frequent job keeps
  its rhythm through the repeated hour while `30 2 * * *` still runs once.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from app.errors import ValidationFailed

UTC = dt.UTC


def check(expression: str, timezone: str) -> None:
    """422 for an expression that is not 5 or 6 (seconds first) valid fields, or an unknown zone."""
    errors: dict[str, list[str]] = {}
    fields = expression.split()
    if len(fields) not in (5, 6):
        errors["/cron"] = [
            f"{len(fields)} fields: give 5 (minute hour day month weekday) "
            "or 6 (second minute hour day month weekday)"
        ]
    elif not croniter.is_valid(expression, second_at_beginning=True):
        errors["/cron"] = [f"{expression!r} is not a valid cron expression"]
    try:
        zone(timezone)
    except ValueError:
        errors["/timezone"] = [f"{timezone!r} is not an IANA timezone name"]
    if not errors:
        try:
            next_after(expression, timezone, dt.datetime.now(UTC))
        except CroniterBadDateError:
            # Valid fields that never meet, as `0 0 30 2 *` (February 30th).
            errors["/cron"] = [f"{expression!r} never fires: no date matches it"]
    if errors:
        raise ValidationFailed(
            "invalid cron expression or timezone",
            errors=errors,
            hint="e.g. cron '0 2 * * *' (02:00 daily) or '*/10 * * * * *' (every 10 s), "
            "timezone 'Europe/Paris'",
        )


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(name) from exc


@lru_cache(maxsize=4096)
def _every_hour(expression: str) -> bool:
    # croniter moves a 6-field expression's seconds to the end: the hour is field 1 either way.
    hours = croniter(expression, second_at_beginning=True).expanded[1]
    return hours == ["*"] or len(hours) == 24


def _instants(wall: dt.datetime, tz: ZoneInfo, every_hour: bool) -> list[dt.datetime]:
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if second > first:  # the wall time happens twice
        return [first, second] if every_hour else [first]
    return [first]  # an ordinary time, or one in a gap (fold 0 lands past the gap)


def next_after(expression: str, timezone: str, after: dt.datetime) -> dt.datetime:
    """The first fire time strictly after `after` (aware), in UTC."""
    tz = zone(timezone)
    after = after.astimezone(UTC)
    local = after.astimezone(tz)
    wall = local.replace(tzinfo=None)
    if local.fold == 0 and local.replace(fold=1).astimezone(UTC) > after:
        # In the first pass of a repeated hour: its second pass still lies ahead, at wall
        # times before this one, so walk from where the repetition starts.
        wall -= local.utcoffset() - local.replace(fold=1).utcoffset()
    walk = croniter(expression, wall - dt.timedelta(microseconds=1), second_at_beginning=True)
    every_hour = _every_hour(expression)
    best: dt.datetime | None = None
    horizon: dt.datetime | None = None
    while True:
        candidate = walk.get_next(dt.datetime)
        if horizon is not None and candidate > horizon:
            return best
        for instant in _instants(candidate, tz, every_hour):
            if instant > after and (best is None or instant < best):
                best = instant
                # Wall time only runs backwards where the offset drops (fall back): until the
                # walk passes the found time by that drop, a later wall time may still be an
                # earlier instant.
                found = best.astimezone(tz)
                drop = max(local.utcoffset() - found.utcoffset(), dt.timedelta(0))
                horizon = found.replace(tzinfo=None) + drop
                break
