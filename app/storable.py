"""Text (and numbers) PostgreSQL cannot store, found before it gets there (where it would be a
500).

Numbers: Python's JSON parser takes NaN, Infinity and overflowing exponents (1e999), which
JSON itself has not and jsonb refuses. Text, two kinds: U+0000, which neither `text` nor
`jsonb` holds, and lone surrogates (U+D800..U+DFFF not paired), which have no UTF-8 form, so
psycopg cannot send them and `jsonb` refuses their `\\uXXXX` escapes (RE2 cannot take them
either). JSON lets a client write both as escapes, and Python's parser hands them over as they
are. Refused where text comes in: API requests (app/http.py), webhook deliveries
(app/triggers/services.py); an agent's output in the worker (workers/runner.py).
"""

from __future__ import annotations

import math
import re
from typing import Any

from app.errors import ValidationFailed, json_pointer

UNSTORABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")
# In JSON text: the escape of U+0000 or of any surrogate, unless its backslash is itself escaped
# (`\\u0000` is six characters). Valid pairs match too: only a body with a match is walked.
UNSTORABLE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u(?:0000|[dD][89abcdefABCDEF][0-9a-fA-F]{2})")
# In JSON text: what Python parses as a number that is not finite (NaN, Infinity, an exponent
# of three digits or more). Inside a string it only makes the body walked.
NONFINITE_NUMBER = re.compile(rb"NaN|Infinity|[0-9][eE][+-]?[0-9]{3,}")
NONFINITE = "NaN or an infinite number, which JSON and PostgreSQL cannot store"
HINT = (
    "remove U+0000 (\\u0000, %00) and unpaired surrogates (a \\uD800-\\uDBFF escape not "
    "followed by a \\uDC00-\\uDFFF one, or the latter alone) from the request, and send "
    "numbers as finite JSON numbers (no NaN, no Infinity, no overflowing exponent)"
)


def problem(text: str) -> str | None:
    """What makes `text` unstorable, or None."""
    found = UNSTORABLE_CHARACTER.search(text)
    if found is None:
        return None
    character = found.group()
    if character == "\x00":
        return "contains U+0000 (NUL)"
    return f"contains an unpaired surrogate (U+{ord(character):04X}) at character {found.start()}"


def escaped(text: str) -> str:
    """`text` with each unstorable character written out (`\\x00`, `\\ud800`): for what is
    shown rather than refused, as an agent's log lines."""
    return UNSTORABLE_CHARACTER.sub(
        lambda found: "\\x00" if found.group() == "\x00" else f"\\u{ord(found.group()):04x}",
        text,
    )


def document_problems(document: Any) -> dict[str, list[str]]:
    """Each key and string of a parsed JSON document that cannot be stored, by JSON pointer
    (a key's pointer names the key itself). Walked with a stack: depth costs no recursion."""
    problems: dict[str, list[str]] = {}
    stack: list[tuple[Any, tuple]] = [(document, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            found = problem(node)
            if found:
                problems[json_pointer(path) or "/"] = [found]
        elif isinstance(node, float) and not math.isfinite(node):
            problems[json_pointer(path) or "/"] = [NONFINITE]
        elif isinstance(node, dict):
            for key, child in node.items():
                # A python agent's output may have other keys (JSON writes them as text).
                found = problem(key) if isinstance(key, str) else None
                if found:
                    problems[json_pointer((*path, key))] = [f"the key {found}"]
                stack.append((child, (*path, key)))
        elif isinstance(node, list):
            stack.extend((child, (*path, index)) for index, child in enumerate(node))
    return problems


def may_hold_unstorable(raw: bytes) -> bool:
    """Whether a JSON body needs walking: only an escape can carry such text into valid JSON
    (a raw U+0000 is invalid JSON, a raw surrogate invalid UTF-8, both refused as 400), and
    only such a token a number that is not finite."""
    if b"\\u" in raw and UNSTORABLE_ESCAPE.search(raw) is not None:
        return True
    return NONFINITE_NUMBER.search(raw) is not None


def refuse(problems: dict[str, list[str]]) -> None:
    if problems:
        raise ValidationFailed(
            "the request holds what cannot be stored: U+0000, an unpaired surrogate, NaN or an "
            "infinite number",
            errors=dict(sorted(problems.items())),
            hint=HINT,
        )
