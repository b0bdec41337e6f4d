"""The asynchronous client: `AsyncRunyard(url, token)`, the same calls as `Runyard`, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from runyard_client import _core, manifests
from runyard_client.config import resolve
from runyard_client.errors import ExecutionFailed, NotFound, WaitTimeout
from runyard_client.types import TERMINAL, Agent, Event, Execution, LogLine

PAGE_SIZE = 100


class AsyncRunyard:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry: _core.RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        profile = resolve(url, token)
        self.url = profile.url
        self.retry = retry or _core.RetryPolicy()
        self._http = httpx.AsyncClient(
            **_core.http_options(profile.url, profile.token, timeout, transport)
        )
        self.agents = AsyncAgents(self)
        self.executions = AsyncExecutions(self)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRunyard:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        creates: bool = False,
    ) -> httpx.Response:
        """As `Runyard.request`: a POST that creates carries a fresh Idempotency-Key and is
        retried with it on connection errors, 503 and 429 (Retry-After)."""
        headers = _core.idempotency_headers() if creates else {}
        params = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    method, path, json=json, params=params, headers=headers
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
            await asyncio.sleep(wait)
            attempt += 1

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return _core.decode(await self.request(method, path, **kwargs))

    async def pages(self, path: str, params: dict[str, Any] | None = None) -> AsyncIterator[Any]:
        page: int | None = 1
        while page is not None:
            response = await self.request(
                "GET", path, params={**(params or {}), "page": page, "page_size": PAGE_SIZE}
            )
            for item in _core.decode(response):
                yield item
            page = _core.next_page(response)

    async def me(self) -> dict[str, Any]:
        return await self.call("GET", "/me")

    async def run(
        self,
        agent: str,
        input: dict[str, Any],
        *,
        version: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Any:
        execution = await self.executions.submit(agent, input, version=version)
        if not wait:
            return execution
        done = await self.executions.wait(execution["id"], timeout=timeout)
        if done["status"] != "succeeded":
            raise ExecutionFailed(dict(done))
        return done["output"]


class AsyncAgents:
    def __init__(self, client: AsyncRunyard) -> None:
        self._c = client

    async def create(self, definition: dict[str, Any]) -> Agent:
        return await self._c.call("POST", "/agents", json=definition, creates=True)

    async def get(self, ref: str) -> Agent:
        return await self._c.call("GET", f"/agents/{ref}")

    def list(self, **filters: Any) -> AsyncIterator[Agent]:
        return self._c.pages("/agents", filters)

    async def update(self, ref: str, changes: dict[str, Any]) -> Agent:
        return await self._c.call("PATCH", f"/agents/{ref}", json=changes)

    async def archive(self, ref: str) -> None:
        await self._c.call("DELETE", f"/agents/{ref}")

    async def apply(self, definition: dict[str, Any], *, dry_run: bool = False) -> manifests.Change:
        name = definition["name"]
        try:
            current = await self.get(name)
        except NotFound:
            created = None if dry_run else await self.create(definition)
            version = created.get("current_version") if created else None
            return manifests.Change("agent", name, "created", version=version)
        changed = manifests.changes(definition, dict(current))
        if not changed:
            return manifests.Change("agent", name, "unchanged", version=current["current_version"])
        if dry_run:
            return manifests.Change("agent", name, "updated", changed)
        updated = await self.update(name, {key: definition[key] for key in changed})
        return manifests.Change("agent", name, "updated", changed, updated["current_version"])


class AsyncExecutions:
    def __init__(self, client: AsyncRunyard) -> None:
        self._c = client

    async def submit(
        self,
        agent: str,
        input: dict[str, Any],
        *,
        version: str | None = None,
        priority: int | None = None,
    ) -> Execution:
        body: dict[str, Any] = {"input": input}
        if version is not None:
            body["version"] = version
        if priority is not None:
            body["priority"] = priority
        return await self._c.call("POST", f"/agents/{agent}/executions", json=body, creates=True)

    async def submit_by_capability(
        self,
        capability: str,
        input: dict[str, Any],
        *,
        provider: str | None = None,
        chain: str | None = None,
        priority: int | None = None,
    ) -> Execution:
        """As Runyard's: the least loaded agent with the capability runs `input`."""
        body = {"capability": capability, "input": input, "provider": provider, "chain": chain}
        body["priority"] = priority
        body = {key: value for key, value in body.items() if value is not None}
        return await self._c.call("POST", "/executions", json=body, creates=True)

    async def submit_batch(
        self, agent: str, inputs: list[dict[str, Any]], *, version: str | None = None
    ) -> list[str]:
        body: dict[str, Any] = {"items": [{"input": item} for item in inputs]}
        if version is not None:
            body["version"] = version
        path = f"/agents/{agent}/executions/batch"
        return (await self._c.call("POST", path, json=body, creates=True))["ids"]

    async def get(self, execution_id: str) -> Execution:
        return await self._c.call("GET", f"/executions/{execution_id}")

    def list(self, **filters: Any) -> AsyncIterator[Execution]:
        return self._c.pages("/executions", filters)

    async def cancel(self, execution_id: str) -> Execution:
        return await self._c.call("POST", f"/executions/{execution_id}/cancel")

    async def rerun(
        self,
        execution_id: str,
        *,
        input: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> Execution:
        body = {k: v for k, v in {"input": input, "version": version}.items() if v is not None}
        path = f"/executions/{execution_id}/rerun"
        return await self._c.call("POST", path, json=body, creates=True)

    async def logs(self, execution_id: str, **filters: Any) -> list[LogLine]:
        return await self._c.call("GET", f"/executions/{execution_id}/logs", params=filters)

    async def stream(
        self, execution_id: str, *, last_event_id: int | None = None
    ) -> AsyncIterator[Event]:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        timeout = httpx.Timeout(self._c._http.timeout.connect, read=None)
        path = f"/executions/{execution_id}/events"
        try:
            async with self._c._http.stream(
                "GET", path, headers=headers, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _core.raise_for(response)
                parser = _core.SSEParser()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                        if event["event"] == "end":
                            return
        except httpx.TransportError as exc:
            raise _core.connection_error(exc, self._c.url) from exc

    async def wait(self, execution_id: str, *, timeout: float | None = None) -> Execution:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            execution = await self.get(execution_id)
            if execution["status"] in TERMINAL:
                return execution
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(dict(execution), timeout or 0)
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 1.0)
