"""Example `python` agents: small text tools a support team would recognise."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

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


def summarize(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """The first sentences of a ticket (up to `max_sentences` in ctx.config) and its keywords."""
    text = payload["text"].strip()
    sentences = [s for s in _SENTENCE.split(text) if s]
    limit = int(ctx.config.get("max_sentences", 2))
    words = [w.lower() for w in _WORD.findall(text)]
    keywords = [w for w, _ in Counter(w for w in words if w not in _STOPWORDS).most_common(5)]
    ctx.log.info("summarized", sentences=len(sentences), words=len(words))
    return {"summary": " ".join(sentences[:limit]), "keywords": keywords, "words": len(words)}


def word_count(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Counts words and the most frequent ones; prints a line per step, as agents often do."""
    words = [w.lower() for w in _WORD.findall(payload["text"])]
    print(f"counting {len(words)} words")
    top = Counter(words).most_common(int(payload.get("top", 3)))
    return {"words": len(words), "top": [{"word": w, "count": n} for w, n in top]}


def noop(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Does nothing: the benchmark's agent, and a way to see the platform's own overhead."""
    return {}
