"""Example `python` agents: small text tools a support team would recognise. Each declares
itself with `@runyard_client.agent`: `runyard up` (and `runyard agents sync --module
runyard_examples`) creates or updates them."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import runyard_client

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "from",
        "has",
        "have",
        "i",
        "in",
        "is",
        "it",
        "its",
        "my",
        "of",
        "on",
        "or",
        "our",
        "so",
        "that",
        "the",
        "their",
        "this",
        "to",
        "was",
        "we",
        "were",
        "with",
        "you",
        "your",
        "not",
        "can",
        "will",
        "just",
    ]
)


TEXT_INPUT = {
    "type": "object",
    "required": ["text"],
    "properties": {"text": {"type": "string", "minLength": 1}},
}


@runyard_client.agent(
    "summarize-ticket",
    description="First sentences and keywords of a support ticket",
    input_schema=TEXT_INPUT,
    output_schema={
        "type": "object",
        "required": ["summary", "keywords"],
        "properties": {
            "summary": {"type": "string"},
            "keywords": {"type": "array", "items": {"type": "string"}},
            "words": {"type": "integer"},
        },
    },
    timeout_seconds=30,
    capabilities=["nlp"],
    tags=["support", "example"],
    config={"max_sentences": 2},
)
def summarize(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """The first sentences of a ticket (up to `max_sentences` in ctx.config) and its keywords."""
    text = payload["text"].strip()
    sentences = [s for s in _SENTENCE.split(text) if s]
    limit = int(ctx.config.get("max_sentences", 2))
    words = [w.lower() for w in _WORD.findall(text)]
    keywords = [w for w, _ in Counter(w for w in words if w not in _STOPWORDS).most_common(5)]
    ctx.log.info("summarized", sentences=len(sentences), words=len(words))
    return {"summary": " ".join(sentences[:limit]), "keywords": keywords, "words": len(words)}


@runyard_client.agent(
    "word-count",
    description="Word count and most frequent words of a text",
    input_schema={
        **TEXT_INPUT,
        "properties": {
            **TEXT_INPUT["properties"],
            "top": {"type": "integer", "minimum": 1, "maximum": 50},
        },
    },
    output_schema={"type": "object", "required": ["words", "top"]},
    timeout_seconds=30,
    tags=["example"],
)
def word_count(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Counts words and the most frequent ones; prints a line per step, as agents often do."""
    words = [w.lower() for w in _WORD.findall(payload["text"])]
    print(f"counting {len(words)} words")
    top = Counter(words).most_common(int(payload.get("top", 3)))
    return {"words": len(words), "top": [{"word": w, "count": n} for w, n in top]}


def noop(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Does nothing: the benchmark's agent, and a way to see the platform's own overhead."""
    return {}
