"""Slack formatting: Markdown → mrkdwn conversion and message splitting (pure functions, no database)."""

from __future__ import annotations

import pytest

from konstruct.channels.slack.format import split_message, to_mrkdwn

# --- to_mrkdwn: emphasis -------------------------------------------------------------------------


def test_double_asterisk_and_double_underscore_become_slack_bold() -> None:
    assert to_mrkdwn("**bold** and __also bold__") == "*bold* and *also bold*"


def test_single_asterisk_and_single_underscore_become_slack_italic() -> None:
    assert to_mrkdwn("*italic* and _italic_") == "_italic_ and _italic_"


def test_emitted_bold_is_not_read_again_as_italic() -> None:
    assert to_mrkdwn("**a** b **c**") == "*a* b *c*"


def test_strikethrough() -> None:
    assert to_mrkdwn("~~gone~~ stays") == "~gone~ stays"


def test_nested_bold_and_italic_in_one_line() -> None:
    assert to_mrkdwn("**bold _italic_ text** and *italic **bold** text*") == "*bold _italic_ text* and _italic *bold* text_"
    assert to_mrkdwn("**Note:** use *this* and ***both***") == "*Note:* use _this_ and *_both_*"


def test_underscores_and_asterisks_inside_words_are_not_emphasis() -> None:
    assert to_mrkdwn("snake_case_name and 2*3*4") == "snake_case_name and 2*3*4"
    assert to_mrkdwn("_use snake_case here_") == "_use snake_case here_"


def test_unmatched_markers_stay_literal() -> None:
    assert to_mrkdwn("** not bold ** and a * star") == "** not bold ** and a * star"


def test_backslash_escaped_markers_stay_literal() -> None:
    assert to_mrkdwn(r"\*not italic\* and \_not\_") == "*not italic* and _not_"


# --- to_mrkdwn: links ----------------------------------------------------------------------------


def test_markdown_link_becomes_slack_link() -> None:
    assert to_mrkdwn("Read [the docs](https://example.com/docs) now") == "Read <https://example.com/docs|the docs> now"


def test_link_url_and_text_are_not_escaped_but_surrounding_text_is() -> None:
    assert to_mrkdwn("[A & B](https://x.io/?a=1&b=2) & more") == "<https://x.io/?a=1&b=2|A & B> &amp; more"


def test_link_with_parentheses_in_url_and_title() -> None:
    assert to_mrkdwn('[Foo](https://en.wikipedia.org/wiki/Foo_(bar) "Foo page")') == "<https://en.wikipedia.org/wiki/Foo_(bar)|Foo>"


def test_link_inside_bold_and_image() -> None:
    assert to_mrkdwn("**[link](https://x.com)**") == "*<https://x.com|link>*"
    assert to_mrkdwn("![diagram](https://x.com/d.png)") == "<https://x.com/d.png|diagram>"


def test_relative_link_keeps_only_its_text() -> None:
    assert to_mrkdwn("see [below](#setup) & [there](/docs)") == "see below &amp; there"


def test_autolink_becomes_slack_link() -> None:
    assert to_mrkdwn("<https://example.com>") == "<https://example.com>"


def test_bare_urls_stay_and_their_underscores_are_not_italic() -> None:
    text = "See https://example.com/a_b_c_d, or (https://x.com/q?a=1&b=2)."
    assert to_mrkdwn(text) == text


# --- to_mrkdwn: line structure -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("# Title", "*Title*"),
        ("## Second level", "*Second level*"),
        ("###### Deepest ##", "*Deepest*"),
        ("### Already **bold** part", "*Already bold part*"),
        ("## A & B", "*A &amp; B*"),
        ("#hashtag stays", "#hashtag stays"),
    ],
)
def test_headings_become_bold_lines(markdown: str, expected: str) -> None:
    assert to_mrkdwn(markdown) == expected


def test_bullets_become_dots_and_keep_indentation() -> None:
    markdown = "- one\n* two\n+ three\n  - nested **b**\n    * deeper"
    assert to_mrkdwn(markdown) == "• one\n• two\n• three\n  • nested *b*\n    • deeper"


def test_bullet_star_is_not_confused_with_italic() -> None:
    assert to_mrkdwn("* *item*") == "• _item_"
    assert to_mrkdwn("*item* text") == "_item_ text"


def test_numbered_lists_stay() -> None:
    assert to_mrkdwn("1. first\n2. **second**\n10. tenth") == "1. first\n2. *second*\n10. tenth"


def test_blockquote_marker_is_kept_unescaped() -> None:
    assert to_mrkdwn("> quoted **b** > c") == "> quoted *b* &gt; c"
    assert to_mrkdwn("> - item\n> # Head") == "> • item\n> *Head*"


def test_horizontal_rule_is_not_a_bullet() -> None:
    assert to_mrkdwn("---\n* * *") == "---\n* * *"


def test_multiline_document() -> None:
    markdown = "# Plan\n\nWe **must**:\n\n- read [docs](https://d.io)\n- compare a < b\n\n1. done\n"
    assert to_mrkdwn(markdown) == "*Plan*\n\nWe *must*:\n\n• read <https://d.io|docs>\n• compare a &lt; b\n\n1. done\n"


# --- to_mrkdwn: escaping and code ----------------------------------------------------------------


def test_special_characters_are_escaped() -> None:
    assert to_mrkdwn("a < b & c > d") == "a &lt; b &amp; c &gt; d"


def test_slack_control_sequences_from_the_model_are_escaped() -> None:
    assert to_mrkdwn("<!channel> hi") == "&lt;!channel&gt; hi"


def test_inline_code_is_untouched() -> None:
    assert to_mrkdwn("run `**x** <y> & _z_` then **go**") == "run `**x** <y> & _z_` then *go*"
    assert to_mrkdwn("``a ` b`` <") == "``a ` b`` &lt;"


def test_fenced_block_is_untouched_and_loses_its_language_tag() -> None:
    code = "if a < b and c > d:\n    print('**hi** & _x_ [l](https://x)')\n# not a heading\n- not a bullet"
    markdown = f"Before **b**\n```python\n{code}\n```\nAfter _i_"
    assert to_mrkdwn(markdown) == f"Before *b*\n```\n{code}\n```\nAfter _i_"


def test_tilde_fence_and_unclosed_fence() -> None:
    assert to_mrkdwn("~~~\n**x**\n~~~") == "```\n**x**\n```"
    assert to_mrkdwn("```sh\necho <a> **b**") == "```\necho <a> **b**\n```"


def test_windows_line_endings() -> None:
    assert to_mrkdwn("# T\r\n- **a**\r\n") == "*T*\n• *a*\n"


# --- split_message -------------------------------------------------------------------------------


def assert_fits(chunks: list[str], limit: int) -> None:
    assert chunks, "expected at least one chunk"
    for chunk in chunks:
        assert chunk, "empty chunk"
        assert chunk == chunk.strip()
        assert len(chunk) <= limit, f"chunk of {len(chunk)} > {limit}"


def test_empty_and_short_text() -> None:
    assert split_message("") == []
    assert split_message(" \n\n ") == []
    assert split_message("hello") == ["hello"]
    assert split_message("  hello  \n") == ["hello"]
    exact = "x" * 3900
    assert split_message(exact) == [exact]


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
    text = "".join(chr(ord("a") + i % 26) for i in range(10_000))
    chunks = split_message(text)
    assert [len(c) for c in chunks] == [3900, 3900, 2200]
    assert "".join(chunks) == text
    assert_fits(chunks, 3900)


def test_does_not_cut_inside_a_slack_link() -> None:
    text = "see <https://example.com/a|the docs page> now"
    chunks = split_message(text, 40)  # the space inside the link would otherwise be the last one that fits
    assert chunks == ["see", "<https://example.com/a|the docs page>", "now"]
    assert_fits(chunks, 40)


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
