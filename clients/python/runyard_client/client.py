"""The synchronous client: `Runyard(url, token)`."""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from runyard_client import _core, manifests
from runyard_client.config import resolve
from runyard_client.errors import ExecutionFailed, NotFound, WaitTimeout
from runyard_client.types import (
    TERMINAL,
    Agent,
    Chain,
    ChainExecution,
    Decision,
    Document,
    Event,
    EventAccepted,
    Execution,
    JournalEntry,
    LogLine,
    Schedule,
    ScheduleFire,
    SentEvent,
    StateEntry,
    StateKey,
    Wallet,
)

PAGE_SIZE = 100


class Runyard:
    """A Runyard server's API. `url` and `token` default to RUNYARD_URL / RUNYARD_TOKEN, then
    to the profile `runyard login` saved."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry: _core.RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        profile = resolve(url, token)
        self.url = profile.url
        self.retry = retry or _core.RetryPolicy()
        self._http = httpx.Client(
            **_core.http_options(profile.url, profile.token, timeout, transport)
        )
        self.agents = Agents(self)
        self.executions = Executions(self)
        self.chains = Chains(self)
        self.schedules = Schedules(self)
        self.state = State(self)
        self.documents = Documents(self)
        self.wallets = Wallets(self)
        self.decisions = Decisions(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Runyard:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        creates: bool = False,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> httpx.Response:
        """One request. `creates` (a POST that makes something): a fresh Idempotency-Key, and
        retries with that same key on connection errors, 503 and 429. `content`: a raw body
        (a document's bytes) of `content_type`, instead of `json`."""
        headers = {**(_core.idempotency_headers() if creates else {}), **(headers or {})}
        if content_type is not None:
            headers["Content-Type"] = content_type
        params = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method, path, json=json, params=params, headers=headers, content=content
                )
            except httpx.TransportError as exc:
                wait = _core.retry_wait(
                    self.retry, attempt, method=method, creates=creates, response=None
                )
                if wait is None:
                    raise _core.connection_error(exc, self.url) from exc
            else:
                wait = _core.retry_wait(
                    self.retry, attempt, method=method, creates=creates, response=response
                )
                if wait is None:
                    return response
            time.sleep(wait)
            attempt += 1

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return _core.decode(self.request(method, path, **kwargs))

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
        """Every item of a list, page after page (X-Pagination)."""
        page: int | None = 1
        while page is not None:
            response = self.request(
                "GET", path, params={**(params or {}), "page": page, "page_size": PAGE_SIZE}
            )
            yield from _core.decode(response)
            page = _core.next_page(response)

    def me(self) -> dict[str, Any]:
        return self.call("GET", "/me")

    def send_event(
        self, name: str, data: dict[str, Any] | None = None, *, id: str | None = None
    ) -> EventAccepted:
        """Send an event: it resumes the executions waiting on it and starts the event
        triggers on its name. With an `id`, the same event sent again within 24 hours is
        accepted once (`duplicate: true`), so a retry is safe."""
        body: dict[str, Any] = {"name": name, "data": data if data is not None else {}}
        if id is not None:
            body["id"] = id
        return self.call("POST", "/events", json=body, creates=True)

    def events(self, **filters: Any) -> Iterator[SentEvent]:
        """The organization's events, newest first (filters: name, since, until)."""
        return self.pages("/events", filters)

    def upload_document(
        self,
        file: str | Path | bytes,
        *,
        name: str | None = None,
        content_type: str | None = None,
    ) -> Document:
        """Upload a document (a path, or bytes with a `name`); hand it to executions by its id
        (`documents=[...]` of run and submit). See Documents.upload."""
        return self.documents.upload(file, name=name, content_type=content_type)

    def run(
        self,
        agent: str,
        input: dict[str, Any],
        *,
        version: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        documents: list[str] | None = None,
    ) -> Any:
        """Submit and, with `wait`, return the output once it succeeded; raise ExecutionFailed
        when it failed, timed out or was cancelled (WaitTimeout past `timeout` seconds).
        Without `wait`, return the queued execution. `documents`: ids of documents to hand it."""
        execution = self.executions.submit(agent, input, version=version, documents=documents)
        if not wait:
            return execution
        done = self.executions.wait(execution["id"], timeout=timeout)
        if done["status"] != "succeeded":
            raise ExecutionFailed(dict(done))
        return done["output"]


class Agents:
    def __init__(self, client: Runyard) -> None:
        self._c = client

    def create(self, definition: dict[str, Any]) -> Agent:
        return self._c.call("POST", "/agents", json=definition, creates=True)

    def get(self, ref: str) -> Agent:
        return self._c.call("GET", f"/agents/{ref}")

    def list(self, **filters: Any) -> Iterator[Agent]:
        return self._c.pages("/agents", filters)

    def update(self, ref: str, changes: dict[str, Any]) -> Agent:
        return self._c.call("PATCH", f"/agents/{ref}", json=changes)

    def archive(self, ref: str) -> None:
        self._c.call("DELETE", f"/agents/{ref}")

    def versions(self, ref: str) -> Iterator[dict[str, Any]]:
        return self._c.pages(f"/agents/{ref}/versions")

    def apply(self, definition: dict[str, Any], *, dry_run: bool = False) -> manifests.Change:
        """Make the server's agent match `definition`: create it, or PATCH only the fields that
        differ from its current definition (so an unchanged agent gets no new version)."""
        return _apply(self, "agent", definition, dry_run)


def _apply(resource: Any, kind: str, definition: dict[str, Any], dry_run: bool) -> manifests.Change:
    name = definition["name"]
    try:
        current = resource.get(name)
    except NotFound:
        created = None if dry_run else resource.create(definition)
        return manifests.Change(kind, name, "created", version=_version(created))
    changed = manifests.changes(definition, dict(current))
    if not changed:
        return manifests.Change(kind, name, "unchanged", version=current.get("current_version"))
    updated = None if dry_run else resource.update(name, {key: definition[key] for key in changed})
    return manifests.Change(kind, name, "updated", changed, _version(updated))


def _version(obj: Any) -> str | None:
    return obj.get("current_version") if obj else None


class Executions:
    def __init__(self, client: Runyard) -> None:
        self._c = client

    def submit(
        self,
        agent: str,
        input: dict[str, Any],
        *,
        version: str | None = None,
        priority: int | None = None,
        documents: list[str] | None = None,
    ) -> Execution:
        body: dict[str, Any] = {"input": input}
        if version is not None:
            body["version"] = version
        if priority is not None:
            body["priority"] = priority
        if documents:
            body["documents"] = list(documents)
        return self._c.call("POST", f"/agents/{agent}/executions", json=body, creates=True)

    def submit_by_capability(
        self,
        capability: str,
        input: dict[str, Any],
        *,
        provider: str | None = None,
        chain: str | None = None,
        priority: int | None = None,
    ) -> Execution:
        """Run `input` on the least loaded of the organization's agents that have the
        capability (and the provider and chain) and accept the input; `assigned_by` says who
        was considered."""
        body = {"capability": capability, "input": input, "provider": provider, "chain": chain}
        body["priority"] = priority
        body = {key: value for key, value in body.items() if value is not None}
        return self._c.call("POST", "/executions", json=body, creates=True)

    def submit_batch(
        self, agent: str, inputs: list[dict[str, Any]], *, version: str | None = None
    ) -> list[str]:
        """Submit many inputs at once (all or nothing); the new execution ids in order."""
        body: dict[str, Any] = {"items": [{"input": item} for item in inputs]}
        if version is not None:
            body["version"] = version
        path = f"/agents/{agent}/executions/batch"
        return self._c.call("POST", path, json=body, creates=True)["ids"]

    def get(self, execution_id: str) -> Execution:
        return self._c.call("GET", f"/executions/{execution_id}")

    def list(self, **filters: Any) -> Iterator[Execution]:
        return self._c.pages("/executions", filters)

    def cancel(self, execution_id: str) -> Execution:
        return self._c.call("POST", f"/executions/{execution_id}/cancel")

    def rerun(
        self,
        execution_id: str,
        *,
        input: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> Execution:
        body = {k: v for k, v in {"input": input, "version": version}.items() if v is not None}
        return self._c.call("POST", f"/executions/{execution_id}/rerun", json=body, creates=True)

    def logs(self, execution_id: str, **filters: Any) -> list[LogLine]:
        return self._c.call("GET", f"/executions/{execution_id}/logs", params=filters)

    def journal(self, execution_id: str) -> list[JournalEntry]:
        """A durable execution's recorded calls, in order."""
        return self._c.call("GET", f"/executions/{execution_id}/journal")

    def stream(self, execution_id: str, *, last_event_id: int | None = None) -> Iterator[Event]:
        """Live events (`log`, `status`, then `end`) from the execution's event stream."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        # The server sends a keepalive comment every 15 s: no read timeout on a live stream.
        timeout = httpx.Timeout(self._c._http.timeout.connect, read=None)
        path = f"/executions/{execution_id}/events"
        try:
            with self._c._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    _core.raise_for(response)
                parser = _core.SSEParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                        if event["event"] == "end":
                            return
        except httpx.TransportError as exc:
            # Dropped or refused: resume with last_event_id set to the last log line's seq.
            raise _core.connection_error(exc, self._c.url) from exc

    def wait(self, execution_id: str, *, timeout: float | None = None) -> Execution:
        """Poll until the execution ends (WaitTimeout past `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            execution = self.get(execution_id)
            if execution["status"] in TERMINAL:
                return execution
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(dict(execution), timeout or 0)
            time.sleep(pause)
            pause = min(pause * 1.5, 1.0)


class Chains:
    def __init__(self, client: Runyard) -> None:
        self._c = client

    def create(self, definition: dict[str, Any]) -> Chain:
        return self._c.call("POST", "/chains", json=definition, creates=True)

    def get(self, ref: str) -> Chain:
        return self._c.call("GET", f"/chains/{ref}")

    def list(self, **filters: Any) -> Iterator[Chain]:
        return self._c.pages("/chains", filters)

    def update(self, ref: str, changes: dict[str, Any]) -> Chain:
        return self._c.call("PATCH", f"/chains/{ref}", json=changes)

    def run(self, chain: str, input: dict[str, Any]) -> ChainExecution:
        path = f"/chains/{chain}/executions"
        return self._c.call("POST", path, json={"input": input}, creates=True)

    def get_execution(self, execution_id: str) -> ChainExecution:
        return self._c.call("GET", f"/chain-executions/{execution_id}")

    def apply(self, definition: dict[str, Any], *, dry_run: bool = False) -> manifests.Change:
        return _apply(self, "chain", definition, dry_run)


class Schedules:
    def __init__(self, client: Runyard) -> None:
        self._c = client

    def list(self, **filters: Any) -> Iterator[Schedule]:
        return self._c.pages("/schedules", filters)

    def get(self, ref: str) -> Schedule:
        return self._c.call("GET", f"/schedules/{ref}")

    def pause(self, ref: str) -> Schedule:
        return self._c.call("POST", f"/schedules/{ref}/pause")

    def resume(self, ref: str) -> Schedule:
        return self._c.call("POST", f"/schedules/{ref}/resume")

    def trigger(self, ref: str) -> dict[str, Any]:
        return self._c.call("POST", f"/schedules/{ref}/trigger", creates=True)

    def history(self, ref: str) -> Iterator[ScheduleFire]:
        return self._c.pages(f"/schedules/{ref}/history")


class State:
    """An agent's state: JSON values by key, each with a version that grows by one per write
    (what the agent's runs read and write as `ctx.state`)."""

    def __init__(self, client: Runyard) -> None:
        self._c = client

    def keys(self, agent: str) -> Iterator[StateKey]:
        return self._c.pages(f"/agents/{agent}/state")

    def get(self, agent: str, key: str) -> StateEntry:
        """`{"key", "value", "version", "updated_at"}`; NotFound when the key is not set."""
        return self._c.call("GET", _state_path(agent, key))

    def put(
        self, agent: str, key: str, value: Any, *, expected_version: int | None = None
    ) -> StateEntry:
        """Set the value; with `expected_version`, only if the entry is at that version (0: the
        key is not set yet), else PreconditionFailed and nothing changes."""
        return self._c.call(
            "PUT",
            _state_path(agent, key),
            json={"value": value},
            headers=_if_match(expected_version),
        )

    def delete(self, agent: str, key: str, *, expected_version: int | None = None) -> None:
        """NotFound when the key is not set; PreconditionFailed as for `put`."""
        self._c.call("DELETE", _state_path(agent, key), headers=_if_match(expected_version))


def _state_path(agent: str, key: str) -> str:
    # "." and ".." would be taken for path steps (httpx removes them): sent percent-encoded.
    segment = key.replace(".", "%2E") if key in (".", "..") else key
    return f"/agents/{agent}/state/{segment}"


def _if_match(expected_version: int | None) -> dict[str, str]:
    return {} if expected_version is None else {"If-Match": f'"{expected_version}"'}


class Documents:
    """Files handed to agents as context: upload once, list their ids in a submit's
    `documents`."""

    def __init__(self, client: Runyard) -> None:
        self._c = client

    def upload(
        self,
        file: str | Path | bytes,
        *,
        name: str | None = None,
        content_type: str | None = None,
    ) -> Document:
        """Upload a file: a path (its name and media type guessed from it unless given), or
        bytes (`name` required)."""
        if isinstance(file, bytes):
            if not name:
                raise ValueError("name= is required when uploading bytes")
            data = file
        else:
            path = Path(file)
            data = path.read_bytes()
            name = name or path.name
            content_type = content_type or mimetypes.guess_type(path.name)[0]
        return self._c.call(
            "POST",
            "/documents",
            params={"name": name},
            content=data,
            content_type=content_type or "application/octet-stream",
            creates=True,
        )

    def get(self, document_id: str) -> Document:
        return self._c.call("GET", f"/documents/{document_id}")

    def list(self, **filters: Any) -> Iterator[Document]:
        """Newest first; `q`: a part of the name."""
        return self._c.pages("/documents", filters)

    def content(self, document_id: str) -> bytes:
        response = self._c.request("GET", f"/documents/{document_id}/content")
        _core.raise_for(response)
        return response.content

    def delete(self, document_id: str) -> None:
        """409 (Conflict) while an execution that has not finished uses it."""
        self._c.call("DELETE", f"/documents/{document_id}")


class Wallets:
    """Agents' wallets: one per agent, made by the wallet service (admin)."""

    def __init__(self, client: Runyard) -> None:
        self._c = client

    def create(self, agent: str, *, label: str | None = None) -> Wallet:
        body = {} if label is None else {"label": label}
        return self._c.call("POST", f"/agents/{agent}/wallet", json=body, creates=True)

    def get(self, agent: str) -> Wallet:
        return self._c.call("GET", f"/agents/{agent}/wallet")


class Decisions:
    """The transfers agents asked for; approve or reject those awaiting approval (admin)."""

    def __init__(self, client: Runyard) -> None:
        self._c = client

    def list(self, **filters: Any) -> Iterator[Decision]:
        """Newest first; filters `agent`, `execution_id`, `status`."""
        return self._c.pages("/decisions", filters)

    def get(self, decision_id: str) -> Decision:
        return self._c.call("GET", f"/decisions/{decision_id}")

    def approve(self, decision_id: str) -> Decision:
        return self._c.call("POST", f"/decisions/{decision_id}/approve")

    def reject(self, decision_id: str) -> Decision:
        return self._c.call("POST", f"/decisions/{decision_id}/reject")
