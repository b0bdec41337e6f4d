"""Agents and their immutable versions."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import jsonschemas
from app.agents import capabilities, flow, wallet_policy
from app.agents.models import Agent, AgentVersion
from app.audit import services as audit
from app.config import Config, current_config
from app.db import page, utcnow
from app.errors import Conflict, NotFound, ValidationFailed
from app.orgs.services import Principal
from app.secrets import references
from app.secrets import services as secret_store
from app.versioning import FIRST_VERSION, add_version, next_version, refuse_changelog

DEFAULT_SCHEMA: dict[str, Any] = {"type": "object"}
DEFAULT_RETRY: dict[str, Any] = {
    "max_retries": 0,
    "backoff_seconds": 1,
    "backoff_max_seconds": 300,
    "jitter": True,
    "retry_on": ["runtime_error", "timeout", "lost"],
}
# A change to any of these makes a new immutable version; the rest of an agent changes in place.
VERSIONED_FIELDS = (
    "runtime",
    "input_schema",
    "output_schema",
    "timeout_seconds",
    "retry",
    "limits",
    "queue",
    "capabilities",
    "config",
    "concurrency",
    "rate_limit",
    "wallet_policy",
)


def _check_definition(document: dict[str, Any]) -> None:
    """Every check at once, so one answer lists every problem of a definition."""
    cfg = current_config()
    problems: list[ValidationFailed] = []
    try:
        jsonschemas.validate_definition(document, "agent")
        if flow_errors := flow.value_errors(document):
            raise ValidationFailed("invalid agent definition", errors=flow_errors)
    except ValidationFailed as exc:
        problems.append(flow.explained(exc, document))
    for field in ("input_schema", "output_schema"):
        if isinstance(document.get(field), dict):
            try:
                jsonschemas.check_user_schema(
                    document[field],
                    field,
                    max_bytes=cfg.schema_max_bytes,
                    max_depth=cfg.schema_max_depth,
                )
            except ValidationFailed as exc:
                problems.append(exc)
    try:
        capabilities.check_unique(document.get("capabilities"))
    except ValidationFailed as exc:
        problems.append(exc)
    try:
        wallet_policy.check(document)
    except ValidationFailed as exc:
        problems.append(exc)
    runtime = document.get("runtime")
    if isinstance(runtime, dict):
        problems.extend(_check_runtime(runtime, cfg))
    timeout = document.get("timeout_seconds")
    if isinstance(timeout, int) and timeout > cfg.max_timeout_seconds:
        # The broker's visibility timeout is set above this bound: a longer execution would
        # have its message handed to a second worker while the first still runs it.
        problems.append(
            ValidationFailed(
                f"timeout_seconds {timeout} is above this installation's longest timeout",
                errors={"/timeout_seconds": [f"at most {cfg.max_timeout_seconds}"]},
                hint="lower timeout_seconds, or raise RUNYARD_MAX_TIMEOUT_SECONDS on the API "
                "and every worker",
            )
        )
    if len(problems) == 1:
        raise problems[0]
    if problems:
        errors: dict[str, list[str]] = {}
        for problem in problems:
            for pointer, messages in problem.errors.items():
                errors.setdefault(pointer, []).extend(messages)
        raise ValidationFailed(
            f"the agent definition has {len(problems)} problems: "
            + "; ".join(problem.message for problem in problems),
            errors=errors,
            hint=next((problem.hint for problem in problems if problem.hint), None),
        )


def _check_runtime(runtime: dict[str, Any], cfg: Config) -> list[ValidationFailed]:
    entrypoint, source = runtime.get("entrypoint"), runtime.get("source")
    allowed = cfg.agent_modules
    if runtime.get("type") == "python" and isinstance(entrypoint, str):
        module = entrypoint.partition(":")[0]
        if not cfg.allows_module(module):
            return [
                ValidationFailed(
                    f"module {module!r} is not under an allowed prefix",
                    errors={
                        "/runtime/entrypoint": [f"module must lie under one of: {list(allowed)}"]
                    },
                    hint="add the module's package to RUNYARD_AGENT_MODULES on the API and workers",
                )
            ]
    if runtime.get("type") == "http":
        return _check_http_runtime(runtime)
    if runtime.get("type") == "script" and isinstance(source, str):
        try:
            compile(source, "<agent script>", "exec")
        except (SyntaxError, ValueError) as exc:
            where = f"line {exc.lineno}: " if getattr(exc, "lineno", None) else ""
            return [
                ValidationFailed(
                    "the script does not compile",
                    errors={"/runtime/source": [f"{where}{getattr(exc, 'msg', exc)}"]},
                )
            ]
    argv = runtime.get("argv")
    is_command = runtime.get("type") == "command" and isinstance(argv, list) and argv
    command = argv[0] if is_command else None
    if command is not None and command not in cfg.allowed_commands:
        return [
            ValidationFailed(
                f"command {command!r} is not allowed",
                errors={
                    "/runtime/argv/0": [
                        f"must be one of RUNYARD_ALLOWED_COMMANDS: {list(cfg.allowed_commands)}"
                    ]
                },
                hint="list the program, exactly as argv[0] names it, in "
                "RUNYARD_ALLOWED_COMMANDS on the API and the workers",
            )
        ]
    return []


# Framing and routing headers the http runtime sets itself.
HTTP_RUNTIME_OWNED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection"}
)
HTTP_RUNTIME_DEFAULT_TIMEOUT = 30


def _check_http_runtime(runtime: dict[str, Any]) -> list[ValidationFailed]:
    """What schemas/agent.json cannot say about an http runtime: a parseable host and port."""
    errors: dict[str, list[str]] = {}
    url = runtime.get("url")
    if isinstance(url, str):
        try:
            parts = urlsplit(url)
            port_ok = parts.port is None or parts.port > 0
        except ValueError as exc:
            errors["/runtime/url"] = [f"not a usable URL: {exc}"]
        else:
            if not parts.hostname or not port_ok:
                errors["/runtime/url"] = ["needs a host name or IP address, and a port in 1..65535"]
    headers = runtime.get("headers")
    if isinstance(headers, dict):
        for name in headers:
            if isinstance(name, str) and name.lower() in HTTP_RUNTIME_OWNED_HEADERS:
                errors[f"/runtime/headers/{name.replace('~', '~0')}"] = [
                    "set by the http runtime itself"
                ]
    if not errors:
        return []
    return [ValidationFailed("the http runtime cannot call this URL as given", errors=errors)]


def _check_http_timeout(runtime: Any, agent_timeout: Any) -> None:
    """An http call may not be allowed longer than the execution it belongs to."""
    if not isinstance(runtime, dict) or runtime.get("type") != "http":
        return
    timeout = runtime.get("timeout_seconds", HTTP_RUNTIME_DEFAULT_TIMEOUT)
    if "timeout_seconds" in runtime and timeout > agent_timeout:
        raise ValidationFailed(
            f"the http runtime's timeout_seconds ({timeout}) is above the agent's "
            f"timeout_seconds ({agent_timeout})",
            errors={"/runtime/timeout_seconds": [f"at most the agent's {agent_timeout}"]},
            hint="lower runtime.timeout_seconds or raise the agent's timeout_seconds",
        )


def resolve(session: Session, principal: Principal, ref: str) -> Agent:
    """An agent of the caller's organization by id or name; anything else is 404."""
    query = select(Agent).where(Agent.org_id == principal.org_id)
    try:
        query = query.where(Agent.id == uuid.UUID(ref))
    except ValueError:
        query = query.where(Agent.name == ref)
    agent = session.scalar(query)
    if agent is None:
        raise NotFound(f"no agent {ref!r}", hint="GET /api/v1/agents lists your agents")
    return agent


def current_version(session: Session, agent: Agent) -> AgentVersion:
    version = session.get(AgentVersion, agent.current_version_id)
    assert version is not None, "every agent has a current version"
    return version


def _check_visibility(principal: Principal, agent: Agent | None, data: dict[str, Any]) -> None:
    """Making an agent public opens it to every organization: an admin's decision. (Making
    it private again is any writer's: it takes the agent out of the catalog.)"""
    if data.get("visibility") == "public" and (agent is None or agent.visibility != "public"):
        principal.require("agents:publish")


def create(session: Session, principal: Principal, data: dict[str, Any]) -> Agent:
    principal.require("agents:write")
    _check_visibility(principal, None, data)
    _check_definition(data)
    if data.get("wallet_policy") is not None:
        wallet_policy.require_admin(principal)
    secret_store.check_references(session, principal.org_id, data.get("config"), data["runtime"])
    _check_http_timeout(data["runtime"], data.get("timeout_seconds", 300))
    agent = Agent(
        org_id=principal.org_id,
        name=data["name"],
        description=data.get("description"),
        tags=data.get("tags", []),
        visibility=data.get("visibility", "private"),
    )
    session.add(agent)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(
            f"an agent named {data['name']!r} exists already",
            hint="choose another name, or PATCH the existing agent to change it (an archived "
            "agent keeps its name: it cannot change or be made live again)",
        ) from exc
    definition = {
        "runtime": data["runtime"],
        "input_schema": data.get("input_schema", DEFAULT_SCHEMA),
        "output_schema": data.get("output_schema", DEFAULT_SCHEMA),
        "timeout_seconds": data.get("timeout_seconds", 300),
        "retry": {**DEFAULT_RETRY, **data.get("retry", {})},
        "limits": data.get("limits", {}),
        "queue": data.get("queue", "default"),
        "capabilities": data.get("capabilities", []),
        "config": data.get("config", {}),
        **{field: flow.normalized(field, data.get(field)) for field in flow.FIELDS},
        "wallet_policy": data.get("wallet_policy"),
    }
    _add_version(session, principal, agent, definition, data.get("version", FIRST_VERSION))
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change("agent.create", "agent", agent.id, agent.name),
    )
    return agent


def _add_version(
    session: Session,
    principal: Principal,
    agent: Agent,
    definition: dict[str, Any],
    version: str,
    changelog: str | None = None,
) -> AgentVersion:
    agent.capabilities = capabilities.names(definition["capabilities"])
    return add_version(
        session,
        AgentVersion.agent_id,
        agent,
        definition,
        version,
        changelog,
        audit.created_by(principal),
    )


def audited_state(session: Session, agent: Agent) -> dict[str, Any]:
    """What an agent's update and rollback events compare (as an admin, who reads the trail,
    sees the agent: $secret references stay references, never values)."""
    return audit.snapshot(describe(session, agent, "admin"))


def update(
    session: Session,
    principal: Principal,
    ref: str,
    data: dict[str, Any],
    *,
    changelog: str | None = None,
) -> Agent:
    """Apply a PATCH; a versioned change makes a new version, carrying `changelog`."""
    principal.require("agents:write")
    agent = resolve(session, principal, ref)
    if agent.archived_at is not None:
        raise Conflict(f"agent {agent.name!r} is archived", hint="archived agents cannot change")
    _check_visibility(principal, agent, data)
    _check_definition(data)
    secret_store.check_references(
        session, principal.org_id, data.get("config"), data.get("runtime")
    )
    before = audited_state(session, agent)
    for field in ("description", "visibility"):
        if field in data:
            setattr(agent, field, data[field])
            agent.updated_at = utcnow()
    if "tags" in data:
        agent.tags = data["tags"]
        agent.updated_at = utcnow()
    current = current_version(session, agent)
    definition = {field: getattr(current, field) for field in VERSIONED_FIELDS}
    changed = {field: _stored(field, data[field]) for field in VERSIONED_FIELDS if field in data}
    changed = {field: value for field, value in changed.items() if definition[field] != value}
    if "wallet_policy" in changed:
        wallet_policy.require_admin(principal)
    merged = {**definition, **changed}
    _check_http_timeout(merged["runtime"], merged["timeout_seconds"])
    if not changed:
        refuse_changelog(changelog, "a versioned field (runtime, schemas, limits, ...)")
        if "version" in data and data["version"] != current.version:
            raise ValidationFailed(
                "nothing versioned changed, so there is no new version to number",
                errors={
                    "/version": [
                        "only given with a change to the runtime, schemas, limits, retry, "
                        "queue, capabilities, config, wallet_policy, concurrency or rate_limit"
                    ]
                },
            )
        session.flush()
    else:
        version = next_version(session, AgentVersion.agent_id, agent, data.get("version"))
        _add_version(session, principal, agent, {**definition, **changed}, version, changelog)
    after = audited_state(session, agent)
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(
            "agent.update", "agent", agent.id, agent.name, audit.changes_between(before, after)
        ),
    )
    return agent


def _stored(field: str, value: Any) -> Any:
    """A versioned field as versions store it, so that an unchanged value compares equal."""
    if field == "retry":
        return {**DEFAULT_RETRY, **value}
    if field in flow.FIELDS:
        return flow.normalized(field, value)
    return value


def archive(session: Session, principal: Principal, ref: str) -> None:
    principal.require("agents:write")
    agent = resolve(session, principal, ref)
    if agent.archived_at is None:
        agent.archived_at = utcnow()
        agent.updated_at = agent.archived_at
        session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change("agent.archive", "agent", agent.id, agent.name),
    )


def list_agents(
    session: Session,
    principal: Principal,
    *,
    q: str | None,
    tag: str | None,
    capability: str | None,
    include_archived: bool,
    offset: int,
    limit: int,
) -> tuple[list[Agent], int]:
    query = searched(select(Agent).where(Agent.org_id == principal.org_id), q)
    if not include_archived:
        query = query.where(Agent.archived_at.is_(None))
    if tag:
        query = query.where(Agent.tags.contains([tag]))
    if capability:
        query = query.where(Agent.capabilities.contains([capability]))
    items, total = page(
        session, query, Agent.created_at.desc(), Agent.id, offset=offset, limit=limit
    )
    # Load the page's current versions in one query; describe() then finds them in the session.
    version_ids = [agent.current_version_id for agent in items]
    session.scalars(select(AgentVersion).where(AgentVersion.id.in_(version_ids))).all()
    return items, total


def searched(query: Any, q: str | None) -> Any:
    """Agents whose name and description hold every word of `q`, each as a word's prefix."""
    words = [w for w in "".join(c if c.isalnum() else " " for c in q or "").split() if w]
    if not words:
        return query
    tsquery = " & ".join(f"{w.lower()}:*" for w in words)
    return query.where(Agent.search.op("@@")(func.to_tsquery("simple", tsquery)))


def list_versions(
    session: Session, principal: Principal, ref: str, *, offset: int, limit: int
) -> tuple[list[AgentVersion], int]:
    agent = resolve(session, principal, ref)
    query = select(AgentVersion).where(AgentVersion.agent_id == agent.id)
    return page(
        session,
        query,
        AgentVersion.major.desc(),
        AgentVersion.minor.desc(),
        AgentVersion.patch.desc(),
        offset=offset,
        limit=limit,
    )


def get_version(session: Session, principal: Principal, ref: str, version: str) -> AgentVersion:
    agent = resolve(session, principal, ref)
    row = session.scalar(
        select(AgentVersion).where(
            AgentVersion.agent_id == agent.id, AgentVersion.version == version
        )
    )
    if row is None:
        raise NotFound(
            f"agent {agent.name!r} has no version {version!r}",
            hint=f"GET /api/v1/agents/{agent.name}/versions lists them",
        )
    return row


def describe(session: Session, agent: Agent, role: str) -> dict[str, Any]:
    """The agent as the API shows it to `role`: its fields and its current version's definition
    (literal config and header values masked for operator and viewer)."""
    version = current_version(session, agent)
    return references.masked_for(
        role,
        {
            "id": agent.id,
            "name": agent.name,
            "description": agent.description,
            "tags": agent.tags,
            **{field: getattr(version, field) for field in VERSIONED_FIELDS},
            "current_version": agent.current_version,
            "created_at": agent.created_at,
            "updated_at": agent.updated_at,
            "archived_at": agent.archived_at,
            "visibility": agent.visibility,
            "catalog_runs": agent.catalog_runs,
        },
    )


def present_version(version: AgentVersion, role: str) -> dict[str, Any]:
    """A version as the API shows it to `role` (masked as `describe` does)."""
    return references.masked_for(
        role,
        {
            "id": version.id,
            "agent_id": version.agent_id,
            "version": version.version,
            **{field: getattr(version, field) for field in VERSIONED_FIELDS},
            "changelog": version.changelog,
            "created_at": version.created_at,
            "created_by": version.created_by,
        },
    )


def ensure(session: Session, principal: Principal, definition: dict[str, Any]) -> Agent:
    """Create the agent, or bring an existing one to this definition (a new version if needed)."""
    existing = session.scalar(
        select(Agent).where(Agent.org_id == principal.org_id, Agent.name == definition["name"])
    )
    if existing is None:
        return create(session, principal, definition)
    changes = {key: value for key, value in definition.items() if key != "name"}
    return update(session, principal, str(existing.id), changes)
