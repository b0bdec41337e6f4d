import re
import uuid

from flask import request
from flask.views import MethodView
from sqlalchemy import Connection

from app.audit import services as audit
from app.errors import NotFound, PreconditionFailed, StateConflict
from app.http import Blueprint, current_principal, request_session
from app.state import services
from app.state.schemas import KEY_DESCRIPTION, StateEntrySchema, StateKeySchema, StatePutSchema

blp = Blueprint(
    "state",
    __name__,
    url_prefix="/api/v1/agents",
    description="State: JSON values an agent keeps per organization (ctx.state), versioned "
    "for compare-and-set",
)
KEY_PARAMETER = {
    "in": "path",
    "name": "key",
    "required": True,
    "schema": {"type": "string", "pattern": services.KEY_PATTERN, "minLength": 1, "maxLength": 200},
    "description": KEY_DESCRIPTION,
}
IF_MATCH_PARAMETER = {
    "in": "header",
    "name": "If-Match",
    "required": False,
    "schema": {"type": "string"},
    "description": 'The entry\'s ETag, its version quoted ("3"): the change is made only if '
    'the entry is still at that version, else 412. "0": only if the key is not set. `*`: only '
    "if it is set.",
}
ETAG_HEADER = {
    "ETag": {
        "description": 'the entry\'s version, quoted ("3"): send it back as If-Match',
        "schema": {"type": "string"},
    }
}
ENTITY_TAG = re.compile(r'"([0-9]{1,18})"')
IF_MATCH_HINT = (
    'GET the entry again and send its ETag as it came, quoted: If-Match: "3"; "0" when the key '
    "must not be set yet"
)
MISSING_HINT = services.KEYS_HINT + "; PUT the key to set it"


def _etag(version: int) -> dict[str, str]:
    return {"ETag": f'"{version}"'}


def _expected_version(conn: Connection, org_id: uuid.UUID, agent_id: uuid.UUID, key: str):
    """The version `If-Match` asks for (None without the header); 412 for a header that can
    match no version of the entry."""
    header = request.headers.get("If-Match")
    if header is None:
        return None
    header = header.strip()
    if header == "*":
        current = services.version_of(conn, org_id, agent_id, services.check_key(key))
        if current == 0:
            raise PreconditionFailed(
                f"If-Match: * but the key {key[:80]!r} is not set",
                errors={"If-Match": ["the key is not set"]},
                hint=MISSING_HINT,
            )
        return current
    found = ENTITY_TAG.fullmatch(header)
    if found is None:
        raise PreconditionFailed(
            f"If-Match {header[:40]!r} names no version of the entry",
            errors={"If-Match": ['a version, quoted ("3"), or *']},
            hint=IF_MATCH_HINT,
        )
    return int(found.group(1))


def _conflict(conflict: StateConflict) -> PreconditionFailed:
    return PreconditionFailed(
        f"If-Match: the key {conflict.key!r} is at version {conflict.current_version}, not "
        f"{conflict.expected_version}: nothing changed",
        errors={"If-Match": [conflict.errors["version"][0]]},
        hint=IF_MATCH_HINT,
    )


@blp.route("/<ref>/state")
class AgentStateKeys(MethodView):
    @blp.doc(operationId="listAgentStateKeys")
    @blp.response(200, StateKeySchema(many=True))
    @blp.alt_response(404, description="no such agent in your organization")
    @blp.paginate()
    def get(self, ref, pagination_parameters):
        """List the keys of an agent's state, with their versions, by key

        Every role may read state. The values are read one key at a time.
        """
        session, principal = request_session(), current_principal()
        agent = services.resolve_agent(session, principal, ref, write=False)
        items, total = services.keys(
            session,
            principal.org_id,
            agent.id,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/<ref>/state/<key>")
class AgentStateEntry(MethodView):
    @blp.doc(operationId="getAgentState", parameters=[KEY_PARAMETER])
    @blp.response(200, StateEntrySchema(), headers=ETAG_HEADER)
    @blp.alt_response(404, description="no such agent in your organization, or no such key")
    @blp.alt_response(422, description="a key that does not match the pattern")
    def get(self, ref, key):
        """Read one key of an agent's state: its value and version (the ETag)

        Every role may read state.
        """
        session, principal = request_session(), current_principal()
        agent = services.resolve_agent(session, principal, ref, write=False)
        found = services.entry(session, principal.org_id, agent.id, key)
        if found is None:
            raise NotFound(f"the agent {agent.name!r} has no state {key!r}", hint=MISSING_HINT)
        return found, _etag(found["version"])

    @blp.doc(operationId="putAgentState", parameters=[KEY_PARAMETER, IF_MATCH_PARAMETER])
    @blp.arguments(StatePutSchema())
    @blp.response(200, StateEntrySchema(), headers=ETAG_HEADER)
    @blp.alt_response(
        403, description="the role may not write state (admin, developer, operator may)"
    )
    @blp.alt_response(404, description="no such agent in your organization")
    @blp.alt_response(412, description="If-Match names another version than the entry's")
    @blp.alt_response(
        422, description="a key that does not match the pattern, or a value over 256 kB"
    )
    def put(self, data, ref, key):
        """Set one key of an agent's state; its version grows by one

        With `If-Match: "<version>"` only when the entry is at that version (`"0"`: not set
        yet), else 412 and nothing changes. Writing state takes a role that may submit
        executions (admin, developer, operator).
        """
        session, principal = request_session(), current_principal()
        agent = services.resolve_agent(session, principal, ref, write=True)
        conn = session.connection()
        expected = _expected_version(conn, principal.org_id, agent.id, key)
        try:
            written = services.put(
                conn,
                principal.org_id,
                agent.id,
                key,
                data["value"],
                expected_version=expected,
                actor=audit.Actor.of(principal),
            )
        except StateConflict as conflict:
            raise _conflict(conflict) from None
        session.commit()
        return written, _etag(written["version"])

    @blp.doc(operationId="deleteAgentState", parameters=[KEY_PARAMETER, IF_MATCH_PARAMETER])
    @blp.response(204)
    @blp.alt_response(
        403, description="the role may not write state (admin, developer, operator may)"
    )
    @blp.alt_response(404, description="no such agent in your organization, or no such key")
    @blp.alt_response(412, description="If-Match names another version than the entry's")
    @blp.alt_response(422, description="a key that does not match the pattern")
    def delete(self, ref, key):
        """Delete one key of an agent's state

        With `If-Match: "<version>"` only when the entry is at that version, else 412. Writing
        state takes a role that may submit executions (admin, developer, operator).
        """
        session, principal = request_session(), current_principal()
        agent = services.resolve_agent(session, principal, ref, write=True)
        conn = session.connection()
        expected = _expected_version(conn, principal.org_id, agent.id, key)
        try:
            deleted = services.delete(
                conn,
                principal.org_id,
                agent.id,
                key,
                expected_version=expected,
                actor=audit.Actor.of(principal),
            )
        except StateConflict as conflict:
            raise _conflict(conflict) from None
        if not deleted:
            raise NotFound(f"the agent {agent.name!r} has no state {key!r}", hint=MISSING_HINT)
        session.commit()
