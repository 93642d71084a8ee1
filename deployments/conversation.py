"""What the router reads from a chat request's messages: the latest user turn, the text it routes on, and
references to the assistant turns the request carries back. Pure functions over OpenAI-style message
dicts (`{"role", "content"}`, content a string, a list of parts, or None); no Ray, no I/O.

Why the latest turn [ours]: the embedder (MiniLM) truncates at 256 tokens, so embedding all user turns
joined, oldest first, lets a long chat's history crowd out what is being asked now: routing would ignore
the latest turn and every follow-up would look like a retrial of the one before. The routing text is
therefore the latest user turn FIRST, then up to `context_turns - 1` earlier user turns, newest first:
truncation drops the oldest context, never the latest turn.

References (`text_ref`) are sha256 keys of normalised text (Unicode NFC, whitespace runs collapsed,
stripped), so the answer a decision returned and the same answer sent back by a client as an assistant turn
give the same key even if the client re-wrapped its whitespace. They are what the buffer compares to tell a
regenerate (same latest turn, previous answer absent) from a continuation (previous answer present).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_HISTORY_REFS = 8
"""At most this many assistant turns (the latest) are referenced per request: the previous answer is the
last one in any ordinary continuation, so a bound costs nothing and keeps events small."""

TURN_SEPARATOR = "\n"


@dataclass(frozen=True)
class Conversation:
    turn: str
    """The latest user turn's text (the last user message with text: an image-only turn has nothing to embed)."""
    routing_text: str
    """What the router embeds: `turn`, then up to `context_turns - 1` earlier user turns, newest first."""
    history_refs: tuple[str, ...]
    """`text_ref` of the assistant turns the request carries, oldest first, the last `MAX_HISTORY_REFS`."""

    @property
    def turn_ref(self) -> str:
        return text_ref(self.turn)


def content_text(content: Any) -> str:
    """A message's text: the string itself, or its `{"type": "text", "text": ...}` parts joined by newlines
    (images, audio and other parts carry no text); "" for None or anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"] for p in content if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def normalise(text: str) -> str:
    """Unicode NFC, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_ref(text: str) -> str:
    """The reference key of a text: sha256 (hex, first 32 digits = 128 bits) of its normalised form."""
    return hashlib.sha256(normalise(text).encode("utf-8", errors="surrogatepass")).hexdigest()[:32]


def _role_texts(messages: Sequence[Mapping[str, Any]], role: str) -> list[str]:
    texts = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a mapping with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") == role:
            text = content_text(m.get("content"))
            if text.strip():
                texts.append(text)
    return texts


def user_turns(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The text of every user message that has any, oldest first."""
    return _role_texts(messages, "user")


def latest_user_turn(messages: Sequence[Mapping[str, Any]]) -> str:
    turns = user_turns(messages)
    if not turns:
        raise ValueError("messages must include a user message with text content")
    return turns[-1]


def routing_text(messages: Sequence[Mapping[str, Any]], context_turns: int = 1) -> str:
    """The latest user turn, then up to `context_turns - 1` earlier user turns, newest first, one per line."""
    if isinstance(context_turns, bool) or not isinstance(context_turns, int) or context_turns < 1:
        raise ValueError(f"context_turns must be an integer >= 1, got {context_turns!r}")
    turns = user_turns(messages)
    if not turns:
        raise ValueError("messages must include a user message with text content")
    return TURN_SEPARATOR.join(reversed(turns[-context_turns:]))


def assistant_refs(messages: Sequence[Mapping[str, Any]], limit: int = MAX_HISTORY_REFS) -> tuple[str, ...]:
    """`text_ref` of the last `limit` assistant turns with text, oldest first."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    texts = _role_texts(messages, "assistant")
    return tuple(text_ref(t) for t in texts[-limit:]) if limit else ()


def parse(messages: Sequence[Mapping[str, Any]], context_turns: int = 1, max_history: int = MAX_HISTORY_REFS) -> Conversation:
    """Everything the ingress needs from a request's messages, in one pass of validation."""
    return Conversation(
        turn=latest_user_turn(messages),
        routing_text=routing_text(messages, context_turns),
        history_refs=assistant_refs(messages, max_history),
    )
