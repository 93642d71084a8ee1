"""deployments/conversation.py: the latest user turn, the routing text (context_turns), multimodal content,
and the references to assistant turns a request carries."""

from __future__ import annotations

import pytest

from deployments import conversation
from deployments.conversation import MAX_HISTORY_REFS, assistant_refs, latest_user_turn, parse, routing_text, text_ref


def user(content) -> dict:
    return {"role": "user", "content": content}


def assistant(content) -> dict:
    return {"role": "assistant", "content": content}


CHAT = [
    {"role": "system", "content": "You are terse."},
    user("first question"),
    assistant("first answer"),
    user("second question"),
    assistant("second answer"),
    user("third question"),
]


def test_latest_user_turn_is_the_last_user_message():
    assert latest_user_turn(CHAT) == "third question"
    assert latest_user_turn([*CHAT, assistant("an answer the client appended")]) == "third question"
    assert latest_user_turn([user("only")]) == "only"


def test_routing_text_is_the_latest_turn_first_then_earlier_turns_newest_first():
    assert routing_text(CHAT) == "third question"  # context_turns = 1: the latest turn only
    assert routing_text(CHAT, 2) == "third question\nsecond question"
    assert routing_text(CHAT, 3) == "third question\nsecond question\nfirst question"
    assert routing_text(CHAT, 10) == routing_text(CHAT, 3)  # no more turns than there are
    # the embedder truncates the end: a long history never pushes the latest turn out
    long_chat = [user("old context " * 500), assistant("ok"), user("what now?")]
    assert routing_text(long_chat, 2).startswith("what now?\n")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_context_turns_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="context_turns"):
        routing_text(CHAT, bad)


def test_multimodal_content_lists_give_their_text_parts():
    msg = user(
        [
            {"type": "text", "text": "What is in"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}, "text": "not a text part"},
            {"type": "text", "text": "this picture?"},
            "not a part",
            {"type": "text", "text": None},
        ]
    )
    assert conversation.content_text(msg["content"]) == "What is in\nthis picture?"
    assert latest_user_turn([user("earlier"), msg]) == "What is in\nthis picture?"
    # an image-only latest turn has no text to embed: the last user turn with text is the one routed on
    image_only = user([{"type": "image_url", "image_url": {"url": "x"}}])
    assert latest_user_turn([user("describe it"), image_only]) == "describe it"
    assert latest_user_turn([user("describe it"), user("   "), {"role": "user"}]) == "describe it"


def test_requests_without_user_text_are_refused():
    for messages in ([assistant("hi")], [user("  \n ")], [user([{"type": "image_url", "image_url": {"url": "x"}}])], []):
        with pytest.raises(ValueError, match="user message with text"):
            parse(messages)
    with pytest.raises(TypeError, match=r"messages\[1\]"):
        parse([user("hi"), "hello"])


def test_text_ref_is_a_key_of_the_normalised_text():
    a = text_ref("Paris is the capital.")
    assert a == text_ref("  Paris is\nthe   capital. ")  # a client re-wrapping whitespace sends the same answer back
    assert a == text_ref("Paris is the capital.")  # NFC: the same text whichever way accents are encoded
    assert text_ref("Café") == text_ref("Cafe\u0301")
    assert a != text_ref("Paris is the capital!") and a != text_ref("paris is the capital.")
    assert len(a) == 32 and int(a, 16) >= 0


def test_assistant_refs_reference_the_turns_carried_back_oldest_first():
    assert assistant_refs(CHAT) == (text_ref("first answer"), text_ref("second answer"))
    assert assistant_refs([user("q")]) == ()
    parts = assistant([{"type": "text", "text": "a multimodal answer"}])
    assert assistant_refs([user("q"), parts, user("r")]) == (text_ref("a multimodal answer"),)


def test_assistant_refs_are_bounded_to_the_latest():
    chat = []
    for i in range(MAX_HISTORY_REFS + 5):
        chat += [user(f"q{i}"), assistant(f"a{i}")]
    refs = assistant_refs(chat)
    assert len(refs) == MAX_HISTORY_REFS
    assert refs[-1] == text_ref(f"a{MAX_HISTORY_REFS + 4}") and refs[0] == text_ref("a5")
    assert assistant_refs(chat, 2) == (text_ref(f"a{MAX_HISTORY_REFS + 3}"), text_ref(f"a{MAX_HISTORY_REFS + 4}"))
    assert assistant_refs(chat, 0) == ()
    with pytest.raises(ValueError):
        assistant_refs(chat, -1)


def test_parse_gathers_what_the_router_needs():
    conv = parse(CHAT, context_turns=2)
    assert conv.turn == "third question"
    assert conv.routing_text == "third question\nsecond question"
    assert conv.turn_ref == text_ref("third question")
    assert conv.history_refs == (text_ref("first answer"), text_ref("second answer"))
    # CHAT was answered "third answer": a regenerate re-sends CHAT (same turn, that answer absent), a
    # continuation carries the answer back
    regen, cont = parse(list(CHAT)), parse([*CHAT, assistant("third answer"), user("fourth question")])
    assert regen.turn_ref == conv.turn_ref and text_ref("third answer") not in regen.history_refs
    assert cont.turn_ref != conv.turn_ref and cont.history_refs[-1] == text_ref("third answer")
