"""The `runyard` command: the client commands (here, needing only the client package) and any
commands that installed packages add through the `runyard.commands` entry point group (the
server adds its admin commands: db, orgs, tokens, api, up)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from runyard_client.errors import ConnectionFailed, RunyardError, ServerError

PLUGIN_GROUP = "runyard.commands"


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    return parent


def _client_command(parser: argparse.ArgumentParser, func: Callable) -> None:
    parser.set_defaults(func=func, needs_client=True)


def _add_agents(commands, common) -> None:
    from runyard_client.cli import commands as c

    agents = commands.add_parser("agents", help="agents: list, read, apply manifests, sync")
    sub = agents.add_subparsers(dest="agents_command", required=True)
    ls = sub.add_parser("ls", parents=[common], help="list agents")
    ls.add_argument("--q", help="words of the name or description")
    ls.add_argument("--tag")
    _client_command(ls, c.cmd_agents_ls)
    get = sub.add_parser("get", parents=[common], help="one agent's definition")
    get.add_argument("name")
    _client_command(get, c.cmd_agents_get)
    apply = sub.add_parser(
        "apply", parents=[common], help="make the server match YAML/JSON manifests"
    )
    apply.add_argument("-f", "--file", required=True, metavar="PATH", help="a file or a folder")
    apply.add_argument("--dry-run", action="store_true", help="print what would change")
    apply.add_argument(
        "--prune", action="store_true", help="archive agents that are not in the manifests"
    )
    _client_command(apply, c.cmd_agents_apply)
    sync = sub.add_parser(
        "sync", parents=[common], help="create or update the @runyard_client.agent functions"
    )
    sync.add_argument("--module", required=True, action="append", metavar="PKG")
    sync.add_argument("--dry-run", action="store_true", help="print what would change")
    _client_command(sync, c.cmd_agents_sync)


def _add_runs(commands, common) -> None:
    from runyard_client.cli import commands as c

    run = commands.add_parser("run", parents=[common], help="run an agent and print its output")
    run.add_argument("agent")
    run.add_argument("--input", metavar="JSON|@FILE", help="the input object (default {})")
    run.add_argument("--version", help="a version of the agent (default: its current one)")
    run.add_argument("--follow", "-f", action="store_true", help="live logs and a progress bar")
    run.add_argument("--timeout", type=float, help="seconds to wait without --follow")
    _client_command(run, c.cmd_run)

    executions = commands.add_parser("executions", help="executions: list, read, cancel, rerun")
    sub = executions.add_subparsers(dest="executions_command", required=True)
    ls = sub.add_parser("ls", parents=[common], help="newest first")
    ls.add_argument("--agent")
    ls.add_argument("--status")
    ls.add_argument("--since", help="ISO 8601 time")
    ls.add_argument("--limit", type=int, default=20, help="rows at most (default 20)")
    _client_command(ls, c.cmd_executions_ls)
    for name, func, text in (
        ("get", c.cmd_executions_get, "one execution"),
        ("cancel", c.cmd_executions_cancel, "cancel a queued or running execution"),
    ):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("id")
        _client_command(command, func)
    rerun = sub.add_parser("rerun", parents=[common], help="run a finished execution again")
    rerun.add_argument("id")
    rerun.add_argument("--input", metavar="JSON|@FILE", help="another input")
    rerun.add_argument("--version", help="same (default), current or x.y.z")
    rerun.add_argument("--follow", "-f", action="store_true", help="follow the new execution")
    _client_command(rerun, c.cmd_executions_rerun)

    logs = commands.add_parser("logs", parents=[common], help="an execution's log lines")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true", help="until the execution ends")
    _client_command(logs, c.cmd_logs)


def _add_chains_schedules(commands, common) -> None:
    from runyard_client.cli import commands as c

    chains = commands.add_parser("chains", help="chains: list, run")
    sub = chains.add_subparsers(dest="chains_command", required=True)
    _client_command(sub.add_parser("ls", parents=[common], help="list chains"), c.cmd_chains_ls)
    run = sub.add_parser("run", parents=[common], help="run a chain and wait for it")
    run.add_argument("chain")
    run.add_argument("--input", metavar="JSON|@FILE")
    run.add_argument("--no-wait", action="store_true", help="print the queued chain execution")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    _client_command(run, c.cmd_chains_run)

    schedules = commands.add_parser("schedules", help="schedules: list, pause, resume, trigger")
    sub = schedules.add_subparsers(dest="schedules_command", required=True)
    ls = sub.add_parser("ls", parents=[common], help="list schedules")
    _client_command(ls, c.cmd_schedules_ls)
    for action, text in (
        ("pause", "stop firing"),
        ("resume", "fire again"),
        ("trigger", "fire now"),
    ):
        command = sub.add_parser(action, parents=[common], help=text)
        command.add_argument("ref", help="name or id")
        command.set_defaults(action=action)
        _client_command(command, c.cmd_schedules_action)
    history = sub.add_parser("history", parents=[common], help="past fires")
    history.add_argument("ref", help="name or id")
    _client_command(history, c.cmd_schedules_history)


def build_parser() -> argparse.ArgumentParser:
    from runyard_client.cli import commands as c

    parser = argparse.ArgumentParser(prog="runyard", description="Run versioned, typed agents.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()
    login = commands.add_parser("login", parents=[common], help="save a server's URL and token")
    login.add_argument("--url", required=True)
    login.add_argument("--token", required=True)
    login.add_argument("--profile", default="default")
    login.set_defaults(func=c.cmd_login, needs_client=False)
    _add_agents(commands, common)
    _add_runs(commands, common)
    _add_chains_schedules(commands, common)
    for plugin in _plugins():
        for name, text in plugin.commands().items():
            commands.add_parser(name, help=text, add_help=False)
    return parser


def _plugins() -> list:
    """Modules that add commands (the server's app.cli): each has `commands()`, their names and
    help, and `main(argv)`, which runs one."""
    return [plugin.load() for plugin in entry_points(group=PLUGIN_GROUP)]


def main(argv: list[str] | None = None) -> int:
    from runyard_client.cli.commands import UsageError
    from runyard_client.cli.render import error

    argv = sys.argv[1:] if argv is None else argv
    for plugin in _plugins() if argv else ():
        if argv[0] in plugin.commands():
            return plugin.main(argv)
    args = build_parser().parse_args(argv)
    try:
        if not args.needs_client:
            return args.func(args, None)
        from runyard_client.client import Runyard

        with Runyard() as client:
            return args.func(args, client)
    except UsageError as exc:
        error(exc)
        return 2
    except (ConnectionFailed, ServerError) as exc:
        error(exc)
        return 1
    except RunyardError as exc:
        # The server refused the request as given (4xx): the command line needs changing.
        error(exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
