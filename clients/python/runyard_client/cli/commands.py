"""The client commands of `runyard`: each takes the parsed arguments and a client, prints, and
returns the exit code (0 done, 1 an execution failed, timed out or was cancelled)."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from runyard_client import manifests
from runyard_client.cli import render
from runyard_client.client import Runyard
from runyard_client.config import write_profile
from runyard_client.discovery import discover
from runyard_client.errors import ConnectionFailed, RunyardError, Unavailable
from runyard_client.types import TERMINAL


class UsageError(RunyardError):
    """A command line that cannot be acted on (exit 2)."""


def parse_input(raw: str | None) -> dict[str, Any]:
    """`--input '{"a": 1}'`, or `--input @file.json` (`@-` reads standard input)."""
    if raw is None:
        return {}
    if raw.startswith("@"):
        source = raw[1:]
        try:
            raw = Path("/dev/stdin").read_text() if source == "-" else Path(source).read_text()
        except OSError as exc:
            raise UsageError(f"--input {raw}: {exc.strerror}") from exc
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"--input is not JSON: {exc}", hint='--input \'{"text": "hi"}\'') from exc
    if not isinstance(value, dict):
        raise UsageError("--input must be a JSON object")
    return value


def listing(args: argparse.Namespace, kind: str, rows: Any) -> int:
    if args.json:
        render.emit_json(list(rows))
    else:
        render.table(kind, rows)
    return 0


def one(args: argparse.Namespace, value: Any) -> int:
    if args.json:
        render.emit_json(value)
    else:
        render.document(value)
    return 0


def cmd_login(args: argparse.Namespace, _client: None) -> int:
    url = args.url.rstrip("/")
    with Runyard(url, args.token) as client:
        me = client.me()
    path = write_profile(url, args.token, args.profile)
    if args.json:
        render.emit_json(
            {"url": url, "org": me["org"], "role": me["token"]["role"], "path": str(path)}
        )
    else:
        print(f"logged in to {url} as {me['org']['name']} ({me['token']['role']}); saved to {path}")
    return 0


# -- agents ---------------------------------------------------------------------------------


def cmd_agents_ls(args: argparse.Namespace, client: Runyard) -> int:
    return listing(args, "agents", client.agents.list(q=args.q, tag=args.tag))


def cmd_agents_get(args: argparse.Namespace, client: Runyard) -> int:
    return one(args, client.agents.get(args.name))


def _report(args: argparse.Namespace, results: list[manifests.Change]) -> int:
    if args.json:
        render.emit_json([change.as_dict() for change in results])
        return 0
    render.table("changes", [change.as_dict() for change in results])
    if args.dry_run:
        for change in results:
            if change.changes:
                print(change.diff())
        print("dry run: nothing changed on the server")
    return 0


def cmd_agents_apply(args: argparse.Namespace, client: Runyard) -> int:
    found = manifests.load(args.file)
    results = [
        (client.chains if item.kind == "chain" else client.agents).apply(
            item.body, dry_run=args.dry_run
        )
        for item in sorted(found, key=lambda m: m.kind)  # agents first: chains name them
    ]
    if args.prune:
        keep = {item.name for item in found if item.kind == "agent"}
        for agent in list(client.agents.list()):
            if agent["name"] not in keep:
                if not args.dry_run:
                    client.agents.archive(agent["name"])
                results.append(manifests.Change("agent", agent["name"], "archived"))
    return _report(args, results)


def cmd_agents_sync(args: argparse.Namespace, client: Runyard) -> int:
    definitions = discover(*args.module)
    if not definitions:
        raise UsageError(
            f"no @runyard_client.agent functions in {', '.join(args.module)}",
            hint="decorate module-level functions with @runyard_client.agent(name=...)",
        )
    results = [client.agents.apply(d, dry_run=args.dry_run) for d in definitions]
    return _report(args, results)


# -- run, executions, logs ------------------------------------------------------------------


def _exit_code(execution: dict[str, Any]) -> int:
    return 0 if execution.get("status") == "succeeded" else 1


def _final(args: argparse.Namespace, execution: dict[str, Any]) -> int:
    if args.json:
        render.emit_json(execution)
        return _exit_code(execution)
    out = render.console()
    if execution["status"] == "succeeded":
        render.document(execution.get("output"))
    else:
        error = execution.get("error") or {}
        out.print(
            f"[bold red]{execution['status']}[/]: {error.get('type')}: {error.get('message')}"
        )
        if error.get("hint"):
            out.print(f"hint: {error['hint']}", style="dim")
    return _exit_code(execution)


def _events(client: Runyard, execution_id: str) -> Any:
    """The execution's events; a dropped stream is resumed after the last line seen."""
    last: int | None = None
    for attempt in range(5):
        try:
            for event in client.executions.stream(execution_id, last_event_id=last):
                if event["event"] == "log" and event.get("id"):
                    last = int(event["id"])
                yield event
                if event["event"] == "end":
                    return
        except (ConnectionFailed, Unavailable):
            # A restarting API, or one whose stream slots are all taken (503).
            time.sleep(min(2**attempt * 0.5, 5))
    yield {"event": "end", "data": client.executions.wait(execution_id), "id": None}


def follow(args: argparse.Namespace, client: Runyard, execution: dict[str, Any]) -> dict:
    """Live logs and a progress bar until the execution ends; the finished execution."""
    if args.json:
        for event in _events(client, execution["id"]):
            if event["event"] == "end":
                return event["data"]
            render.emit_json(event)
        return client.executions.wait(execution["id"])
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    label = f"{execution.get('agent_name', '')} {execution['id'][:8]}"
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=render.console(), transient=True) as bar:
        task = bar.add_task(f"{label} queued", total=1.0)
        for event in _events(client, execution["id"]):
            data = event["data"]
            if event["event"] == "log":
                render.log_line(bar.console, data)
            elif event["event"] == "status":
                progress = data.get("progress") or {}
                words = [label, data.get("status", "")]
                if progress.get("message"):
                    words.append(progress["message"])
                bar.update(task, description=" ".join(words), completed=progress.get("fraction"))
            elif event["event"] == "end":
                bar.update(task, completed=1.0)
                return data
    return client.executions.wait(execution["id"])


def cmd_run(args: argparse.Namespace, client: Runyard) -> int:
    execution = client.executions.submit(args.agent, parse_input(args.input), version=args.version)
    if args.follow:
        return _final(args, follow(args, client, execution))
    return _final(args, client.executions.wait(execution["id"], timeout=args.timeout))


def cmd_executions_ls(args: argparse.Namespace, client: Runyard) -> int:
    rows = client.executions.list(agent=args.agent, status=args.status, since=args.since)
    return listing(args, "executions", itertools.islice(rows, args.limit))


def cmd_executions_get(args: argparse.Namespace, client: Runyard) -> int:
    execution = client.executions.get(args.id)
    one(args, execution)
    return 0 if execution["status"] not in TERMINAL else _exit_code(execution)


def cmd_executions_cancel(args: argparse.Namespace, client: Runyard) -> int:
    return one(args, client.executions.cancel(args.id))


def cmd_executions_rerun(args: argparse.Namespace, client: Runyard) -> int:
    new = client.executions.rerun(
        args.id, input=parse_input(args.input) if args.input else None, version=args.version
    )
    if args.follow:
        return _final(args, follow(args, client, new))
    return one(args, new)


def cmd_logs(args: argparse.Namespace, client: Runyard) -> int:
    if args.follow:
        out = None if args.json else render.console()
        for event in _events(client, args.id):
            if event["event"] != "log":
                continue
            if out is None:
                render.emit_json(event["data"])
            else:
                render.log_line(out, event["data"])
        return 0
    lines = client.executions.logs(args.id, limit=10000)
    if args.json:
        render.emit_json(lines)
    else:
        out = render.console()
        for line in lines:
            render.log_line(out, line)
    return 0


# -- chains and schedules -------------------------------------------------------------------


def cmd_chains_ls(args: argparse.Namespace, client: Runyard) -> int:
    return listing(args, "chains", client.chains.list())


def cmd_chains_run(args: argparse.Namespace, client: Runyard) -> int:
    execution = client.chains.run(args.chain, parse_input(args.input))
    if args.no_wait:
        return one(args, execution)
    deadline = time.monotonic() + args.timeout
    while execution["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
        execution = client.chains.get_execution(execution["id"])
    one(args, execution)
    return _exit_code(execution)


def cmd_schedules_ls(args: argparse.Namespace, client: Runyard) -> int:
    return listing(args, "schedules", client.schedules.list())


def cmd_schedules_action(args: argparse.Namespace, client: Runyard) -> int:
    return one(args, getattr(client.schedules, args.action)(args.ref))


def cmd_schedules_history(args: argparse.Namespace, client: Runyard) -> int:
    return listing(args, "history", client.schedules.history(args.ref))
