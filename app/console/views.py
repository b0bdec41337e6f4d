"""What the console's templates share: filters, the pager, status labels, small SVG charts."""

from __future__ import annotations

import datetime as dt
import difflib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint
from markupsafe import Markup, escape

from app.console import auth
from app.errors import ValidationFailed

PAGE_SIZE = 25
MAX_PAGE_SIZE = 100


@dataclass
class Pager:
    page: int
    size: int
    total: int = 0

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> Pager:
        try:
            page = max(1, int(args.get("page", 1)))
            size = min(MAX_PAGE_SIZE, max(1, int(args.get("page_size", PAGE_SIZE))))
        except ValueError as exc:
            raise ValidationFailed(
                "page and page_size are whole numbers", hint="drop them to see the first page"
            ) from exc
        return cls(page, size)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))


def execution_filters(args: Mapping[str, str]) -> dict[str, Any]:
    """/ui/executions' query: status, agent, since (an ISO date or time, UTC unless it says), and
    q: an execution id goes to its page, any other text is an agent name."""
    filters: dict[str, Any] = {
        "status": args.get("status") or None,
        "agent": args.get("agent") or None,
        "since": None,
    }
    q = (args.get("q") or "").strip()
    if q:
        try:
            filters["execution_id"] = uuid.UUID(q)
        except ValueError:
            filters["agent"] = filters["agent"] or q
    if args.get("since"):
        try:
            since = dt.datetime.fromisoformat(args["since"])
        except ValueError as exc:
            raise ValidationFailed(
                f"since={args['since']!r} is not a date or time",
                errors={"since": ["use 2026-12-07 or 2026-12-07T10:00:00Z"]},
                hint="use an ISO 8601 date or time",
            ) from exc
        filters["since"] = since if since.tzinfo else since.replace(tzinfo=dt.UTC)
    return filters


def time_tag(value: dt.datetime | None) -> Markup:
    """A <time> the page's script shows in the viewer's time zone; without script, UTC."""
    if value is None:
        return Markup('<span class="muted">—</span>')
    utc = value.astimezone(dt.UTC)
    return Markup('<time datetime="{}">{}</time>').format(
        utc.isoformat(), utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    )


STATUS_MARKS = {
    "queued": "◷",
    "running": "▶",
    "waiting": "◐",
    "done": "✓",
    "received": "✉",
    "succeeded": "✓",
    "failed": "✗",
    "timed_out": "⌛",
    "cancelled": "⊘",
    "compensating": "↺",
    "compensated": "↺",
    "pending": "…",
    "skipped": "»",
    "reused": "✓",
    "delivered": "✓",
    "paused": "⏸",
    "enabled": "▶",
    "healthy": "✓",
    "degraded": "!",
    "failing": "✗",
    "idle": "…",
}


def status_badge(status: str | None) -> Markup:
    """A status with a colour AND a text label and mark: it reads without colour too."""
    status = status or "unknown"
    return Markup('<span class="status status-{}">{} {}</span>').format(
        status, STATUS_MARKS.get(status, "•"), status.replace("_", " ")
    )


def pretty_json(value: Any) -> Markup:
    if value is None:
        return Markup('<span class="muted">none</span>')
    return Markup("<pre>{}</pre>").format(json.dumps(value, indent=2, default=str))


def duration(ms: int | None) -> str:
    if ms is None:
        return "—"
    return f"{ms} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def bar_chart(points: list[tuple[str, float]], unit: str = "", label: str = "") -> Markup:
    """A small horizontal bar chart as inline SVG (server-side: no chart library, no script).
    Its labels and values are text in the picture; `label` names it for screen readers."""
    if not points:
        return Markup('<p class="muted">Nothing to draw yet.</p>')
    summary = label or ", ".join(f"{name} {value:g}{unit}" for name, value in points)
    top = max(value for _, value in points) or 1
    height = 22 * len(points)
    rows = []
    for i, (label, value) in enumerate(points):
        width = 300 * value / top
        rows.append(
            Markup(
                '<text x="0" y="{y}" class="chart-label">{label}</text>'
                '<rect x="120" y="{ry}" width="{w:.1f}" height="14" class="chart-bar"/>'
                '<text x="{tx:.1f}" y="{y}" class="chart-value">{value}{unit}</text>'
            ).format(
                y=i * 22 + 15,
                ry=i * 22 + 4,
                w=width,
                tx=126 + width,
                label=label,
                value=f"{value:g}",
                unit=unit,
            )
        )
    return Markup(
        '<svg class="chart" role="img" aria-label="{summary}" viewBox="0 0 480 {h}" width="480"'
        ' height="{h}">{rows}</svg>'
    ).format(h=height, rows=Markup("").join(rows), summary=summary)


def column_chart(points: list[tuple[str, float | None]], title: str, unit: str = "") -> Markup:
    """Vertical bars as inline SVG, one per point (None: no data, no bar), oldest at the left,
    followed by the same figures as a table (folded) so the chart reads without the picture."""
    values = [value for _, value in points if value is not None]
    top = max(values, default=0) or 1
    width, height = 480, 100
    step = width / max(1, len(points))
    bars = []
    for i, (label, value) in enumerate(points):
        if not value:
            continue
        tall = max(1.0, (height - 2) * value / top)
        bars.append(
            Markup(
                '<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" class="chart-bar">'
                "<title>{label} UTC: {value}{unit}</title></rect>"
            ).format(
                x=i * step + 0.5,
                y=height - tall,
                w=max(1.0, step - 1),
                h=tall,
                label=label,
                value=f"{value:g}",
                unit=unit,
            )
        )
    summary = (
        f"{title}: highest {max(values):g}{unit}, latest {points[-1][1] or 0:g}{unit}"
        if values
        else f"{title}: nothing yet"
    )
    first, last = (points[0][0], points[-1][0]) if points else ("", "")
    rows = Markup("").join(
        Markup("<tr><td>{}</td><td>{}</td></tr>").format(
            label, "—" if value is None else f"{value:g}{unit}"
        )
        for label, value in points
    )
    return Markup(
        '<figure class="column-chart"><figcaption>{title} <span class="muted">(max {top}{unit})'
        "</span></figcaption>"
        '<svg class="chart" role="img" aria-label="{summary}" viewBox="0 0 {w} {h}"'
        ' width="{w}" height="{h}" preserveAspectRatio="none">'
        '<line x1="0" y1="{h}" x2="{w}" y2="{h}" class="chart-axis"/>{bars}</svg>'
        '<div class="chart-range muted"><span>{first} UTC</span><span>{last} UTC</span></div>'
        "<details><summary>{summary} — as a table</summary>"
        "<table><thead><tr><th>From (UTC)</th><th>{title}</th></tr></thead>"
        "<tbody>{rows}</tbody></table></details></figure>"
    ).format(
        title=title,
        top=f"{max(values, default=0):g}",
        unit=unit,
        summary=summary,
        w=width,
        h=height,
        bars=Markup("").join(bars),
        first=first,
        last=last,
        rows=rows,
    )


TIMELINE_STATUSES = ("succeeded", "failed", "timed_out", "running", "cancelled")


def attempt_timeline(
    execution: Mapping[str, Any], attempts: list[Mapping[str, Any]], now: dt.datetime | None = None
) -> Markup:
    """An execution's attempts as inline SVG on one time axis, from its queued_at to its end (or
    now while it runs): a bar per attempt from its start to its finish (or now), coloured by
    status with the status as text, and the wait in the queue as a thin grey segment. The
    attempts table below says the same in words."""
    now = now or dt.datetime.now(dt.UTC)
    start = execution.get("queued_at")
    started = [a for a in attempts if a.get("started_at")]
    if start is None or not started:
        return Markup("")
    end = execution.get("finished_at") or now
    end = max([end, *(a.get("finished_at") or now for a in started)])
    span = max((end - start).total_seconds(), 0.001)
    left, width, row = 64, 560, 22

    def x(moment: dt.datetime) -> float:
        return left + width * max(0.0, (moment - start).total_seconds()) / span

    first = min(a["started_at"] for a in started)
    wait_s = max(0.0, (first - start).total_seconds())
    parts = [
        Markup(
            '<text x="0" y="12">queued</text><rect class="tl-wait" x="{x:.1f}" y="6" '
            'width="{w:.1f}" height="4"><title>waited {wait} in the queue</title></rect>'
        ).format(x=left, w=max(1.0, x(first) - left), wait=duration(round(wait_s * 1000)))
    ]
    for i, a in enumerate(started, start=1):
        y = i * row
        finish = a.get("finished_at") or now
        status = a.get("status") or "unknown"
        kind = status if status in TIMELINE_STATUSES else "other"
        bar_x, bar_w = x(a["started_at"]), max(2.0, x(finish) - x(a["started_at"]))
        took = duration(round((finish - a["started_at"]).total_seconds() * 1000))
        parts.append(
            Markup(
                '<g class="tl-attempt"><text x="0" y="{ty}">attempt {n}</text>'
                '<rect class="tl-bar tl-{kind}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="14">'
                "<title>attempt {n}: {label}, {took}</title></rect>"
                '<text x="{lx:.1f}" y="{ty}">{label}</text></g>'
            ).format(
                n=a.get("attempt", i),
                kind=kind,
                x=bar_x,
                y=y,
                w=bar_w,
                ty=y + 11,
                lx=bar_x + bar_w + 4,
                label=status.replace("_", " "),
                took=took,
            )
        )
    height = (len(started) + 1) * row + 16
    axis = height - 14
    utc = dt.UTC
    summary = (
        f"{len(started)} attempt(s) over {duration(round(span * 1000))}, waited "
        + duration(round(wait_s * 1000))
        + " in the queue"
    )
    return Markup(
        '<svg class="timeline" role="img" aria-label="{summary}" viewBox="0 0 {vw} {h}"'
        ' width="{vw}" height="{h}">{parts}'
        '<line class="tl-axis" x1="{l}" y1="{axis}" x2="{r}" y2="{axis}"/>'
        '<text x="{l}" y="{ly}">{t0} UTC</text>'
        '<text x="{r}" y="{ly}" text-anchor="end">{t1} UTC</text></svg>'
    ).format(
        summary=summary,
        vw=left + width + 96,
        h=height,
        parts=Markup("").join(parts),
        l=left,
        r=left + width,
        axis=axis,
        ly=height - 2,
        t0=start.astimezone(utc).strftime("%H:%M:%S"),
        t1=end.astimezone(utc).strftime("%H:%M:%S"),
    )


def definition_diff(old: tuple[str, Any], new: tuple[str, Any]) -> Markup:
    """A unified diff of two versions' definitions as indented JSON, one line per span: added
    lines marked + (class diff-add), removed ones - (diff-del), hunk headers @@ (diff-hunk)."""
    (old_name, old_doc), (new_name, new_doc) = old, new

    def lines(document: Any) -> list[str]:
        return json.dumps(document, indent=2, sort_keys=True, default=str).splitlines()

    diff = list(
        difflib.unified_diff(
            lines(old_doc), lines(new_doc), fromfile=old_name, tofile=new_name, lineterm=""
        )
    )
    if not diff:
        return Markup('<p class="empty">The two definitions are the same.</p>')
    marked = []
    for line in diff:
        if line.startswith(("+++", "---")):
            kind = "diff-file"
        elif line.startswith("@@"):
            kind = "diff-hunk"
        else:
            kind = {"+": "diff-add", "-": "diff-del"}.get(line[:1], "diff-same")
        marked.append(Markup('<span class="{}">{}</span>').format(kind, line))
    return Markup('<pre class="diff">{}</pre>').format(Markup("").join(marked))


def install(bp: Blueprint) -> None:
    bp.add_app_template_filter(time_tag, "time")
    bp.add_app_template_filter(status_badge, "status")
    bp.add_app_template_filter(pretty_json, "json")
    bp.add_app_template_filter(duration, "duration")
    bp.add_app_template_global(auth.csrf_token, "csrf_token")
    bp.add_app_template_global(auth.may, "may")
    bp.add_app_template_global(bar_chart, "bar_chart")
    bp.add_app_template_global(column_chart, "column_chart")
    bp.add_app_template_global(attempt_timeline, "attempt_timeline")
    bp.add_app_template_global(escape, "escape")
