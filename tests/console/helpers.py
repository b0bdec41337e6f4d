"""Signing a Flask test client in to the console, as a browser would (the form and its CSRF)."""

from __future__ import annotations

import re

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def sign_in(client, token: str):
    page = client.get("/ui/login")
    assert page.status_code == 200
    return client.post(
        "/ui/login", data={"token": token, "csrf_token": csrf_of(page.get_data(as_text=True))}
    )


def page_csrf(client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.get_data(as_text=True)[:500]
    return csrf_of(page.get_data(as_text=True))
