"""Slack replies: Markdown passed through in markdown blocks, and long answers split into messages."""

from __future__ import annotations

import pytest

from konstruct.channels.slack.format import FALLBACK_LIMIT, MARKDOWN_LIMIT, markdown_messages
from konstruct.channels.text import split_message

# --- markdown_messages -------------------------------------------------------------------------------


def blocks_text(text: str, limit: int = MARKDOWN_LIMIT) -> list[str]:
    messages = markdown_messages(text, limit)
    for message in messages:
        assert [block["type"] for block in message["blocks"]] == ["markdown"]  # one block: the limit is per message
    return [message["blocks"][0]["text"] for message in messages]


def test_short_answer_is_one_markdown_block_with_the_same_text_as_fallback() -> None:
    assert markdown_messages("**Note:** use *this*") == [
        {"text": "**Note:** use *this*", "blocks": [{"type": "markdown", "text": "**Note:** use *this*"}]}
    ]


def test_the_fallback_cannot_notify_anyone() -> None:
    """The notification text is mrkdwn: a control sequence from the model is shown, never acted on."""
    [message] = markdown_messages("ping <!channel> and <!here>, <@U0123ABCD> & co")
    assert message["text"] == "ping &lt;!channel&gt; and &lt;!here&gt;, &lt;@U0123ABCD&gt; &amp; co"
    assert message["blocks"][0]["text"] == "ping <!channel> and <!here>, <@U0123ABCD> & co"


def test_empty_answer_gives_no_message() -> None:
    assert markdown_messages("") == []
    assert markdown_messages(" \n\n ") == []


def test_escaped_asterisks_stay_escaped() -> None:
    # The old mrkdwn conversion turned this into `*not italic*`, which Slack shows in bold.
    text = r"\*not italic\* and \_not\_ and 2\*3"
    assert blocks_text(text) == [text]


def test_markdown_reaches_slack_unchanged() -> None:
    text = (
        "# Plan\n\nWe **must**, _really_, ~~not~~:\n\n- read [the docs](https://example.com/a_(b)) & <https://d.io>\n"
        "- ask <@U0123ABCD> in <#C0123ABCD>, compare a < b\n\n1. done\n\n> quoted\n\n`**x** <y>`"
    )
    assert blocks_text(text) == [text]


def test_surrounding_whitespace_is_trimmed() -> None:
    assert blocks_text("  \n hello\n\n") == ["hello"]


def test_long_answer_becomes_several_messages_under_the_limit() -> None:
    paragraph = "A sentence of about forty characters ok. " * 50  # ~2,000 characters
    text = "\n\n".join(f"{n}. {paragraph.strip()}" for n in range(30))  # ~60,000 characters
    texts = blocks_text(text)
    assert len(texts) >= 5
    assert all(len(t) <= MARKDOWN_LIMIT for t in texts)
    assert all(t.split(". ", 1)[0].isdigit() for t in texts)  # cut between paragraphs
    assert "\n\n".join(texts) == text


def test_fallback_text_is_cut_for_notifications() -> None:
    text = "word " * 3000  # 15,000 characters: two messages
    messages = markdown_messages(text)
    assert len(messages) == 2
    for message in messages:
        assert len(message["text"]) <= FALLBACK_LIMIT
        assert message["blocks"][0]["text"].startswith(message["text"].removesuffix("…"))
    assert messages[0]["text"].endswith("word…")


def test_code_fence_stays_intact_across_messages() -> None:
    lines = [f"print({i})  # line {i}" for i in range(1500)]  # ~30,000 characters of code
    text = "Here is the script:\n\n```python\n" + "\n".join(lines) + "\n```\n\nRun it with `python x.py`."
    texts = blocks_text(text)
    assert len(texts) >= 3 and all(len(t) <= MARKDOWN_LIMIT for t in texts)
    assert texts[0].startswith("Here is the script:\n\n```python\n")
    for t in texts:
        assert t.count("```") % 2 == 0, "a message with an unclosed fence"
    for t in texts[1:]:
        assert t.startswith("```python\n")
    assert texts[-1].endswith("```\n\nRun it with `python x.py`.")
    assert [line for t in texts for line in t.split("\n") if line.startswith("print(")] == lines


def test_link_and_mention_are_not_cut() -> None:
    text = "see [the docs page](https://example.com/a) now"
    chunks = split_message(text, 40)  # the space inside the link would otherwise be the last one that fits
    assert chunks == ["see", "[the docs page](https://example.com/a)", "now"]
    assert split_message("ask <@U0123ABCD> or <https://x.io/a b>", 25) == ["ask <@U0123ABCD> or", "<https://x.io/a b>"]


def test_escape_is_not_cut_from_what_it_escapes() -> None:
    text = "x" * 9 + r"\*y"  # a hard cut at 10 would leave the backslash alone at the end
    assert split_message(text, 10) == ["x" * 9, r"\*y"]


# --- split_message -------------------------------------------------------------------------------


def assert_fits(chunks: list[str], limit: int) -> None:
    assert chunks, "expected at least one chunk"
    for chunk in chunks:
        assert chunk, "empty chunk"
        assert chunk == chunk.strip()
        assert len(chunk) <= limit, f"chunk of {len(chunk)} > {limit}"


def test_empty_and_short_text() -> None:
    assert split_message("", MARKDOWN_LIMIT) == []
    assert split_message(" \n\n ", MARKDOWN_LIMIT) == []
    assert split_message("hello", MARKDOWN_LIMIT) == ["hello"]
    assert split_message("  hello  \n", MARKDOWN_LIMIT) == ["hello"]
    exact = "x" * MARKDOWN_LIMIT
    assert split_message(exact, MARKDOWN_LIMIT) == [exact]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        split_message("text", 0)


def test_splits_at_paragraph_breaks() -> None:
    a, b, c = "A" * 50, "B" * 50, "C" * 50
    chunks = split_message(f"{a}\n\n{b}\n\n{c}", 120)
    assert chunks == [f"{a}\n\n{b}", c]
    assert_fits(chunks, 120)


def test_paragraph_break_preferred_over_later_line_break() -> None:
    text = "para one\n\nline two\nline three\nline four"
    chunks = split_message(text, 30)
    assert chunks == ["para one", "line two\nline three\nline four"]
    assert_fits(chunks, 30)


def test_splits_at_line_breaks_when_no_paragraph_fits() -> None:
    text = "first line here\nsecond line here\nthird"
    chunks = split_message(text, 35)
    assert chunks == ["first line here\nsecond line here", "third"]
    assert_fits(chunks, 35)


def test_splits_at_sentence_ends_then_spaces() -> None:
    chunks = split_message("First sentence. Second sentence. Third", 20)
    assert chunks == ["First sentence.", "Second sentence.", "Third"]
    assert_fits(chunks, 20)
    chunks = split_message("alpha beta gamma delta", 11)
    assert chunks == ["alpha beta", "gamma delta"]
    assert_fits(chunks, 11)


def test_hard_cut_without_any_spaces() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(30_000))
    chunks = split_message(text, MARKDOWN_LIMIT)
    assert [len(c) for c in chunks] == [12_000, 12_000, 6_000]
    assert "".join(chunks) == text
    assert_fits(chunks, MARKDOWN_LIMIT)


def test_code_block_that_fits_is_never_split() -> None:
    text = "intro paragraph\n\n```\nline1\n\nline2\n```\n\nafter"
    chunks = split_message(text, 30)
    assert chunks == ["intro paragraph", "```\nline1\n\nline2\n```\n\nafter"]
    assert_fits(chunks, 30)


def test_long_code_block_is_split_with_fences_reopened() -> None:
    lines = [f"x_{i} = {i} * 2" for i in range(200)]
    text = "Here is the script:\n\n```python\n" + "\n".join(lines) + "\n```\n\nThat's it."
    chunks = split_message(text, 300)
    assert_fits(chunks, 300)
    assert len(chunks) > 5
    assert chunks[0].startswith("Here is the script:\n\n```python\nx_0 = 0 * 2\n")
    for chunk in chunks[1:]:
        assert chunk.startswith("```python\n")
    for chunk in chunks[:-1]:
        assert chunk.endswith("\n```")
    assert chunks[-1].endswith("x_199 = 199 * 2\n```\n\nThat's it.")
    code = [line for chunk in chunks for line in chunk.split("\n") if line.startswith("x_")]
    assert code == lines


def test_long_code_line_is_hard_cut_inside_its_fences() -> None:
    text = "```\n" + "y" * 250 + "\n```"
    chunks = split_message(text, 100)
    assert_fits(chunks, 100)
    assert all(c.startswith("```\n") and c.endswith("\n```") for c in chunks)
    assert "".join(c[4:-4] for c in chunks) == "y" * 250


def test_mixed_prose_and_code_all_chunks_fit() -> None:
    paragraph = "This is a sentence. " * 30
    code = "```\n" + "\n".join(f"print({i})" for i in range(100)) + "\n```"
    text = f"{paragraph}\n\n{code}\n\n{paragraph}\n\n" + "z" * 700
    chunks = split_message(text, 500)
    assert_fits(chunks, 500)
    assert all(c.count("```") % 2 == 0 for c in chunks)
    assert "".join("".join(chunks).split()).replace("`", "") == "".join(text.split()).replace("`", "")
