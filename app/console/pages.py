"""The console's pages for agents, chains, schedules, workers and notifications."""

from __future__ import annotations

from typing import Any

from flask import redirect, render_template, request, url_for

from app import runs
from app.agents import lifecycle
from app.agents import services as agents
from app.chains import reruns as chain_reruns
from app.chains import services as chains
from app.chains.definitions import plan_for
from app.chains.plans import plans
from app.config import current_config
from app.console import auth, forms, views
from app.console.routes import bp
from app.errors import NotFound, Unavailable, ValidationFailed
from app.executions import services as executions
from app.fleet import services as fleet
from app.http import request_session
from app.notifications import services as notifications
from app.schedules import services as schedules
from app.stats import services as stats
from app.triggers import services as triggers

TRIGGERS_SHOWN = 50

# Recent executions on an agent's page, versions listed there, deliveries per subscription.
RECENT = 10
# Workers listed on the overview (the Workers page pages through the rest); versions offered
# by the agent page's diff form.
FLEET_SHOWN = 100
DIFF_VERSIONS = 100


@bp.get("/agents")
def agent_list():
    pager = views.Pager.from_args(request.args)
    session = request_session()
    items, pager.total = agents.list_agents(
        session,
        auth.principal(),
        q=request.args.get("q") or None,
        tag=None,
        capability=None,
        include_archived=False,
        offset=pager.offset,
        limit=pager.size,
    )
    described = [agents.describe(session, agent, auth.principal().role) for agent in items]
    summaries = stats.agent_summaries(session, auth.principal(), [agent.id for agent in items])
    for agent in described:
        agent["summary"] = summaries[agent["id"]]
    return render_template("agents.html", items=described, pager=pager, args=request.args)


def _agent_context(name: str) -> dict[str, Any]:
    session, principal = request_session(), auth.principal()
    agent = agents.describe(session, agents.resolve(session, principal, name), principal.role)
    window = request.args.get("window", "24h")
    if window not in stats.WINDOWS:
        window = "24h"
    versions, _ = agents.list_versions(session, principal, name, offset=0, limit=DIFF_VERSIONS)
    recent, _ = executions.list_executions(
        session,
        principal,
        agent=str(agent["id"]),
        status=None,
        since=None,
        until=None,
        offset=0,
        limit=RECENT,
    )
    return {
        "agent": agent,
        "versions": versions,
        "recent": recent,
        "stats": stats.agent_stats(session, principal, str(agent["id"]), window),
        "windows": list(stats.WINDOWS),
        "fields": forms.fields_of(agent["input_schema"]),
        "values": {},
        "errors": {},
        **_diff_context(session, principal, name, [v.version for v in versions]),
    }


def _diff_context(session, principal, name: str, offered: list[str]) -> dict[str, Any]:
    """The diff form's choices (by default the version before the newest, and the newest) and,
    once the form asked for them, the diff of the two versions' definitions and its breaking
    changes (as the API's diff names them)."""
    old = request.args.get("from") or (offered[1] if len(offered) > 1 else offered[0])
    new = request.args.get("to") or offered[0]
    diff, breaking = None, []
    if "from" in request.args and "to" in request.args:
        old_row, new_row = (agents.get_version(session, principal, name, v) for v in (old, new))
        diff = views.definition_diff(
            (f"{name} {old}", _definition(old_row, principal.role)),
            (f"{name} {new}", _definition(new_row, principal.role)),
        )
        breaking = lifecycle.diff(session, principal, name, new, old)["breaking"]
    return {"diff_from": old, "diff_to": new, "diff": diff, "breaking": breaking}


def _definition(version, role: str) -> dict[str, Any]:
    """What the diff compares: the versioned fields, masked for `role` as the API masks them."""
    shown = agents.present_version(version, role)
    return {field: shown[field] for field in agents.VERSIONED_FIELDS}


@bp.get("/agents/<name>")
def agent_page(name: str):
    return render_template("agent.html", **_agent_context(name))


@bp.post("/agents/<name>/run")
def agent_run(name: str):
    context = _agent_context(name)
    payload, problems = forms.read(context["fields"], request.form)
    if not problems:
        # The page's reads end before the submit inserts (autocommit, on a connection of its
        # own), as in reruns: the insert must never ride inside the read's transaction.
        request_session().commit()
        try:
            new = executions.submit(auth.principal(), str(context["agent"]["id"]), payload)
        except ValidationFailed as exc:
            problems = forms.errors_by_field(exc.errors)
        else:
            return redirect(url_for("console.execution_page", execution_id=new["id"]), 303)
    context.update(values=request.form, errors=problems)
    return render_template("agent.html", **context), 422


@bp.get("/chains")
def chain_list():
    pager = views.Pager.from_args(request.args)
    session = request_session()
    items, pager.total = chains.list_chains(
        session, auth.principal(), include_archived=False, offset=pager.offset, limit=pager.size
    )
    described = [chains.describe(session, chain) for chain in items]
    return render_template("chains.html", items=described, pager=pager, args=request.args)


@bp.get("/chains/<name>")
def chain_page(name: str):
    session, principal = request_session(), auth.principal()
    chain = chains.describe(session, chains.resolve(session, principal, name))
    pager = views.Pager.from_args(request.args)
    runs_, pager.total = chains.list_executions(
        session,
        principal,
        chain=str(chain["id"]),
        status=None,
        offset=pager.offset,
        limit=pager.size,
    )
    plan = plan_for(chain["steps"], chain["on_failure"])
    columns = [(n, [plan.steps[i] for i in stage]) for n, stage in enumerate(plan.stages)]
    return render_template(
        "chain.html", chain=chain, columns=columns, runs=runs_, pager=pager, args={"name": name}
    )


@bp.get("/chain-executions/<execution_id>")
def chain_execution_page(execution_id: str):
    session = request_session()
    row = chains.get_execution(session, auth.principal(), execution_id)
    ce = chains.present(session, row)
    # The plan names each step's agent, also for a step no execution ran yet.
    plan = plans.get(session.connection(), row.chain_version_id)
    stages: dict[int, list[dict]] = {}
    for step, planned in zip(ce["steps"], plan.steps, strict=True):
        stages.setdefault(step["stage"], []).append({**step, "planned": planned})
    live = ce["status"] in ("queued", "running", "compensating")
    return render_template("chain_execution.html", ce=ce, stages=sorted(stages.items()), live=live)


@bp.post("/chain-executions/<execution_id>/rerun")
def chain_execution_rerun(execution_id: str):
    new = chain_reruns.rerun(request_session(), auth.principal(), execution_id)
    return redirect(url_for("console.chain_execution_page", execution_id=new.id), 303)


@bp.get("/schedules")
def schedule_list():
    session, principal = request_session(), auth.principal()
    pager = views.Pager.from_args(request.args)
    items, pager.total = schedules.list_schedules(
        session, principal, offset=pager.offset, limit=pager.size
    )
    # The webhook triggers fire things too: the newest TRIGGERS_SHOWN beside the schedules.
    hooks, hooks_total = triggers.list_triggers(session, principal, offset=0, limit=TRIGGERS_SHOWN)
    return render_template(
        "schedules.html",
        items=[schedules.present(s) for s in items],
        hooks=[triggers.present(t) for t in hooks],
        hooks_total=hooks_total,
        pager=pager,
        args={},
    )


@bp.get("/schedules/<name>")
def schedule_page(name: str):
    session, principal = request_session(), auth.principal()
    schedule = schedules.present(schedules.get(session, principal, name))
    pager = views.Pager.from_args(request.args)
    fires, pager.total = schedules.history(
        session, principal, name, offset=pager.offset, limit=pager.size
    )
    return render_template(
        "schedule.html", s=schedule, fires=fires, pager=pager, args={"name": name}
    )


@bp.post("/schedules/<name>/<action>")
def schedule_action(name: str, action: str):
    session, principal = request_session(), auth.principal()
    if action == "pause":
        schedules.pause(session, principal, name)
        session.commit()
    elif action == "resume":
        schedules.resume(session, principal, name)
        session.commit()
    elif action == "trigger":
        _, launched = schedules.trigger_now(session, principal, name)
        session.commit()
        runs.publish_after_commit(launched)
    else:
        raise NotFound(f"no schedule action {action!r}", hint="pause, resume or trigger")
    return redirect(url_for("console.schedule_page", name=name), 303)


def _flower() -> str:
    cfg = current_config()
    return cfg.flower_url or f"http://127.0.0.1:{cfg.flower_port}"


@bp.get("/workers")
def worker_list():
    pager = views.Pager.from_args(request.args)
    items, pager.total = fleet.list_workers(auth.principal(), offset=pager.offset, limit=pager.size)
    return render_template("workers.html", items=items, pager=pager, args={}, flower=_flower())


@bp.get("/overview/workers")
def overview_workers():
    """The overview's workers section, loaded by htmx after the page: asking the workers can
    wait up to a second on the broker, which the rest of the overview must not."""
    error = None
    try:
        items, total = fleet.list_workers(auth.principal(), offset=0, limit=FLEET_SHOWN)
    except Unavailable as exc:
        items, total, error = [], 0, exc.message
    slots = sum(w.concurrency or 0 for w in items)
    busy = sum(w.active_executions for w in items)
    return render_template(
        "overview_workers.html",
        items=items,
        total=total,
        slots=slots,
        busy=busy,
        error=error,
        flower=_flower(),
    )


@bp.get("/notifications")
def notification_list():
    session, principal = request_session(), auth.principal()
    if not auth.may("notifications"):
        return render_template("notifications.html", items=[], allowed=False)
    items, _ = notifications.list_notifications(session, principal, offset=0, limit=50)
    shown = []
    for n in items:
        deliveries, total = notifications.deliveries(
            session, principal, str(n.id), offset=0, limit=RECENT
        )
        shown.append({**notifications.present(n), "deliveries": deliveries, "total": total})
    return render_template("notifications.html", items=shown, allowed=True)
