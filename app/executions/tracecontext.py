"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the `traceparent` a submit carries.

A header that does not parse is ignored, as the recommendation asks of a receiver ("if the
vendor failed to parse traceparent, it MUST NOT attempt to parse tracestate"... and starts a new
trace): a tracing mistake in a client never costs it its submit.
"""

from __future__ import annotations

import re

# version 00: version-traceid-parentid-flags, lowercase hex. A later version may append fields
# after the flags ("-..."); its first four fields are read the same way.
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?"
)


def parse_traceparent(value: str | None) -> str | None:
    """The traceparent to keep with the execution (version 00 form), or None when there is
    none or it is malformed."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.group("version", "trace_id", "parent_id", "flags")
    if version == "ff" or (version == "00" and match.group("rest")):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return f"00-{trace_id}-{parent_id}-{flags}"
