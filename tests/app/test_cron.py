"""Cron fire times through the daylight-saving changes of Europe/Paris and America/New_York."""

import datetime as dt
import itertools
from zoneinfo import ZoneInfo

import pytest

from app.errors import ValidationFailed
from app.schedules.cron import check, next_after

UTC = dt.UTC


def times_between(expression, zone, after, until, limit):
    found, current = [], after
    while len(found) < limit:
        current = next_after(expression, zone, current)
        if current > until:
            break
        found.append(current)
    return found


def local_times(expression, zone, start_utc, end_utc):
    tz = ZoneInfo(zone)
    found = times_between(expression, zone, start_utc, end_utc, limit=1000)
    return [t.astimezone(tz).strftime("%m-%d %H:%M%z") for t in found]


def utc(*args):
    return dt.datetime(*args, tzinfo=UTC)


def test_paris_spring_forward_daily_job_runs_once_past_the_gap():
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    assert local_times("30 2 * * *", "Europe/Paris", utc(2026, 3, 27), utc(2026, 3, 31)) == [
        "03-27 02:30+0100",
        "03-28 02:30+0100",
        "03-29 03:30+0200",
        "03-30 02:30+0200",
    ]


def test_paris_spring_forward_hourly_job_never_fires_twice():
    got = local_times("30 * * * *", "Europe/Paris", utc(2026, 3, 29, 0), utc(2026, 3, 29, 3))
    assert got == ["03-29 01:30+0100", "03-29 03:30+0200", "03-29 04:30+0200"]


def test_paris_fall_back_daily_job_runs_once_at_the_first_occurrence():
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    got = local_times("30 2 * * *", "Europe/Paris", utc(2026, 10, 24), utc(2026, 10, 27))
    assert got == ["10-24 02:30+0200", "10-25 02:30+0200", "10-26 02:30+0100"]


def test_paris_fall_back_frequent_job_keeps_its_rhythm_through_the_repeated_hour():
    got = local_times("*/30 * * * *", "Europe/Paris", utc(2026, 10, 24, 23), utc(2026, 10, 25, 2))
    assert got == [
        "10-25 01:30+0200",
        "10-25 02:00+0200",
        "10-25 02:30+0200",
        "10-25 02:00+0100",
        "10-25 02:30+0100",
        "10-25 03:00+0100",
    ]
    # Every 30 minutes of real time, none twice.
    instants = times_between(
        "*/30 * * * *", "Europe/Paris", utc(2026, 10, 24, 23), utc(2026, 10, 25, 2), 100
    )
    assert all(b - a == dt.timedelta(minutes=30) for a, b in itertools.pairwise(instants))


def test_new_york_spring_forward_and_fall_back():
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT. 2026-11-01: 02:00 EDT falls back to 01:00 EST.
    assert local_times(
        "0 2 * * *", "America/New_York", utc(2026, 3, 7, 12), utc(2026, 3, 9, 12)
    ) == [
        "03-08 03:00-0400",
        "03-09 02:00-0400",
    ]
    assert local_times(
        "30 1 * * *", "America/New_York", utc(2026, 10, 31, 12), utc(2026, 11, 2, 12)
    ) == ["11-01 01:30-0400", "11-02 01:30-0500"]
    assert local_times(
        "*/20 * * * *", "America/New_York", utc(2026, 11, 1, 5, 10), utc(2026, 11, 1, 7)
    ) == [
        "11-01 01:20-0400",
        "11-01 01:40-0400",
        "11-01 01:00-0500",
        "11-01 01:20-0500",
        "11-01 01:40-0500",
        "11-01 02:00-0500",
    ]


def test_next_after_is_strict_and_works_from_inside_the_repeated_hour():
    paris = ZoneInfo("Europe/Paris")
    first_0230 = dt.datetime(2026, 10, 25, 2, 30, tzinfo=paris)  # fold 0: CEST
    again = next_after("*/30 * * * *", "Europe/Paris", first_0230)
    assert again.astimezone(paris).strftime("%H:%M%z") == "02:00+0100"
    second_0230 = dt.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=paris)
    assert next_after("30 2 * * *", "Europe/Paris", first_0230).date() == dt.date(2026, 10, 26)
    assert next_after("30 2 * * *", "Europe/Paris", second_0230).date() == dt.date(2026, 10, 26)


def test_six_fields_put_seconds_first():
    start = utc(2026, 1, 1, 0, 0, 0)
    assert next_after("*/20 * * * * *", "UTC", start) == utc(2026, 1, 1, 0, 0, 20)
    assert next_after("5 1 * * * *", "UTC", start) == utc(2026, 1, 1, 0, 1, 5)


@pytest.mark.parametrize(
    ("expression", "zone"),
    [
        ("* * * *", "UTC"),
        ("0 0 * * * * *", "UTC"),
        ("99 * * * *", "UTC"),
        ("* * * * *", "Nope/Nowhere"),
    ],
)
def test_invalid_expressions_and_zones(expression, zone):
    with pytest.raises(ValidationFailed):
        check(expression, zone)


def test_six_field_daily_job_runs_once_in_the_repeated_hour():
    # 2026-10-25 in Paris: 02:00-03:00 happens twice; seconds first must not change the rule.
    assert local_times("0 30 2 * * *", "Europe/Paris", utc(2026, 10, 24), utc(2026, 10, 26)) == [
        "10-24 02:30+0200",
        "10-25 02:30+0200",
    ]


def test_an_expression_no_date_matches_is_refused():
    with pytest.raises(ValidationFailed) as refused:
        check("0 0 30 2 *", "UTC")
    assert "never fires" in refused.value.errors["/cron"][0]
