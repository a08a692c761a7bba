"""Slack text formatting: Markdown written by an LLM → Slack mrkdwn, and long messages → chunks.

Pure functions, no I/O. Slack's mrkdwn is not Markdown: bold is `*x*`, italic `_x_`, strike `~x~`,
links are `<url|text>`, there are no headings or bullets, and `&`, `<`, `>` must be escaped in text.
`to_mrkdwn` converts the Markdown a model typically writes; `split_message` cuts a long reply into
pieces that fit in one Slack message each without breaking code blocks.

Inline code and fenced code blocks are passed through untouched, as the callers asked, so a `<` or
`&` inside them reaches Slack raw.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["split_message", "to_mrkdwn"]

# --- fenced code blocks (shared by both functions) ---------------------------------------------

_FENCE_OPEN = re.compile(r"^[ \t]*(?:(`{3,})[^`]*|(~{3,}).*)$")


@dataclass(frozen=True)
class _Fence:
    """One fenced code block, as offsets into the text it was found in."""

    start: int  # first character of the opening fence line
    end: int  # just past the closing fence line (the text's end if the block is never closed)
    opening: str  # the opening fence line, stripped ("```python")
    closing: str  # the closing fence line, stripped, or the marker that would close it
    body: str  # the lines between the fences, verbatim, without their surrounding newlines
    closed: bool


def _fenced_blocks(text: str) -> list[_Fence]:
    """Find the fenced code blocks (``` or ~~~) in `text`; an unclosed fence runs to the end."""
    blocks: list[_Fence] = []
    pos = 0
    start = body_start = 0
    marker = opening = ""
    for line in text.split("\n"):
        content = line.rstrip("\r")
        if not marker:
            match = _FENCE_OPEN.match(content)
            if match:
                marker = match.group(1) or match.group(2)
                opening = content.strip()
                start, body_start = pos, pos + len(line) + 1
        else:
            stripped = content.strip()
            if stripped and set(stripped) == {marker[0]} and len(stripped) >= len(marker):
                body = text[body_start : pos - 1] if pos > body_start else ""
                blocks.append(_Fence(start, pos + len(content), opening, stripped, body.rstrip("\r"), closed=True))
                marker = ""
        pos += len(line) + 1
    if marker:
        body = text[body_start:] if body_start < len(text) else ""
        blocks.append(_Fence(start, len(text), opening, marker, body, closed=False))
    return blocks


# --- to_mrkdwn -------------------------------------------------------------------------------------

# Private-use characters: placeholders for protected text, and markers for the emphasis we emit.
_STASH_OPEN, _STASH_CLOSE = "\ue000", "\ue001"
_BOLD, _ITALIC, _STRIKE = "\ue002", "\ue003", "\ue004"
_SENTINELS = str.maketrans("", "", _STASH_OPEN + _STASH_CLOSE + _BOLD + _ITALIC + _STRIKE)
_STASHED = re.compile(f"{_STASH_OPEN}(\\d+){_STASH_CLOSE}")

_HEADING = re.compile(r"^[ ]{0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_RULE = re.compile(r"^[ ]{0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_QUOTE = re.compile(r"^([ ]{0,3}(?:>[ ]?)+)(.*)$")
_BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+(.*)$")

_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_BACKSLASH = re.compile(r"\\([\\`*_{}\[\]()#+\-.!~|<>&])")
_LINK = re.compile(
    r"!?\[([^\[\]]*)\]"  # [label], or ![alt] for an image
    r"\(\s*<?((?:[^\s()<>]|\([^\s()<>]*\))+)>?"  # (url, allowing one level of balanced parentheses
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"  # optionally "title")
)
_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^\s<>]+)>")
_BARE_URL = re.compile(r"(?<![\w/])https?://[^\s<>]+")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

# The inner text of an emphasis may not contain its own delimiter (except inside a word, for the
# single ones), so each opener scans only to the next delimiter: linear, even on a line of 50,000 `**`.
_EMPHASIS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?<![\w*])\*\*\*(?![\s*])((?:[^*]|\*(?!\*\*))+?)(?<![\s*])\*\*\*(?![\w*])"), _BOLD + _ITALIC + r"\1" + _ITALIC + _BOLD),
    (re.compile(r"(?<![\w_])___(?![\s_])((?:[^_]|_(?!__))+?)(?<![\s_])___(?![\w_])"), _BOLD + _ITALIC + r"\1" + _ITALIC + _BOLD),
    (re.compile(r"(?<!\*)\*\*(?![\s*])((?:[^*]|\*(?!\*))+?)(?<![\s*])\*\*"), _BOLD + r"\1" + _BOLD),
    (re.compile(r"(?<![\w_])__(?![\s_])((?:[^_]|_(?!_))+?)(?<![\s_])__(?![\w_])"), _BOLD + r"\1" + _BOLD),
    (re.compile(r"(?<![\w*])\*(?![\s*])((?:[^*]|(?<=\w)\*(?=\w))+?)(?<![\s*])\*(?![\w*])"), _ITALIC + r"\1" + _ITALIC),
    (re.compile(r"(?<![\w_])_(?![\s_])((?:[^_]|(?<=\w)_(?=\w))+?)(?<![\s_])_(?![\w_])"), _ITALIC + r"\1" + _ITALIC),
    (re.compile(r"(?<!~)~~(?![\s~])((?:[^~]|~(?!~))+?)(?<![\s~])~~(?!~)"), _STRIKE + r"\1" + _STRIKE),
]


def to_mrkdwn(markdown: str) -> str:
    """Convert LLM-style Markdown to Slack mrkdwn.

    `**b**`/`__b__` → `*b*`, `*i*`/`_i_` → `_i_`, `~~s~~` → `~s~`, `[text](url)` → `<url|text>`,
    headings → a bold line, `-`/`*`/`+` bullets → `•` (indentation kept); numbered lists, blockquotes
    and bare URLs stay. `&`, `<`, `>` in ordinary text become `&amp;`, `&lt;`, `&gt;`. Inline code
    and fenced code blocks are left untouched, except that the fence's language tag is dropped.
    """
    text = markdown.replace("\r\n", "\n")
    out: list[str] = []
    pos = 0
    for block in _fenced_blocks(text):
        out.append(_convert_prose(text[pos : block.start]))
        out.append(f"```\n{block.body}\n```" if block.body else "```\n```")
        pos = block.end
    out.append(_convert_prose(text[pos:]))
    return "".join(out)


def _convert_prose(text: str) -> str:
    return "\n".join(_convert_line(line) for line in text.split("\n"))


def _convert_line(line: str) -> str:
    if not line.strip() or _RULE.match(line):
        return line
    heading = _HEADING.match(line)
    if heading:
        title = _inline(heading.group(1), bold=False)
        return f"*{title}*" if title else ""
    quote = _QUOTE.match(line)
    if quote:
        return quote.group(1) + _convert_line(quote.group(2))
    bullet = _BULLET.match(line)
    if bullet:
        return f"{bullet.group(1)}• {_inline(bullet.group(2))}"
    return _inline(line)


def _inline(text: str, *, bold: bool = True) -> str:
    """Convert one line's inline Markdown. With bold=False (a heading's text) inner bold is dropped."""
    stash: list[str] = []

    def keep(value: str) -> str:
        stash.append(value)
        return f"{_STASH_OPEN}{len(stash) - 1}{_STASH_CLOSE}"

    def link(match: re.Match[str]) -> str:
        label, url = match.group(1).strip(), match.group(2)
        if not _SCHEME.match(url):  # a relative link or an anchor: Slack cannot follow it, keep the words
            return label
        label = _emphasis(label).replace("<", "&lt;").replace(">", "&gt;")  # only what would break the link
        url = url.replace("|", "%7C")
        return keep(f"<{url}|{label}>" if label and label != url else f"<{url}>")

    def bare_url(match: re.Match[str]) -> str:
        url = match.group(0)
        end, unbalanced = len(url), url.count(")") - url.count("(")
        while end and (url[end - 1] in ".,;:!?'\"*_~" or (url[end - 1] == ")" and unbalanced > 0)):  # trailing punctuation
            unbalanced -= url[end - 1] == ")"
            end -= 1
        return keep(url[:end]) + url[end:]

    text = text.translate(_SENTINELS)
    text = _CODE_SPAN.sub(lambda m: keep(m.group(0)), text)
    text = _BACKSLASH.sub(lambda m: keep(_escape(m.group(1))), text)
    text = _LINK.sub(link, text)
    text = _AUTOLINK.sub(lambda m: keep(f"<{m.group(1)}>"), text)
    text = _BARE_URL.sub(bare_url, text)
    text = _emphasis(_escape(text))

    def restore(match: re.Match[str]) -> str:
        return _STASHED.sub(restore, stash[int(match.group(1))])

    text = _STASHED.sub(restore, text)
    return text.replace(_BOLD, "*" if bold else "").replace(_ITALIC, "_").replace(_STRIKE, "~")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _emphasis(text: str) -> str:
    """Turn Markdown emphasis into marker characters, so an emitted `*` is never read again as italic."""
    for pattern, replacement in _EMPHASIS:
        text = pattern.sub(replacement, text)
    return text


# --- split_message ---------------------------------------------------------------------------------

_SEPARATORS: list[tuple[tuple[str, ...], int]] = [
    (("\n\n",), 0),
    (("\n",), 0),
    ((". ", "! ", "? "), 1),  # keep the punctuation with the sentence it ends
    ((" ",), 0),
]
# Short things a cut should not land inside: inline code, Slack <links>, and &amp; entities.
_ATOMS = re.compile(r"`[^`\n]+`|<[^<>\n]+>|&(?:amp|lt|gt);")


def split_message(text: str, limit: int = 3900) -> list[str]:
    """Split `text` into chunks of at most `limit` characters, each stripped and non-empty.

    Cuts at the last paragraph break that fits, else a line break, else a sentence end, else a
    space, else anywhere. A fenced code block that fits in one chunk is never cut; a longer one is
    cut between lines (lines themselves only if they are too long) and each piece is closed and
    reopened with its fence so it renders on its own. Empty text gives [].
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    text = text.strip()
    if not text:
        return []
    if len(text) <= limit:
        return [text]

    chunks: list[str] = []
    pos = 0
    after_code = False
    for block in _fenced_blocks(text):
        room = _code_room(block, limit)
        if block.end - block.start <= limit or room < 1:
            continue  # fits, and is kept whole by _split_prose; or the limit cannot even hold the fences
        before = text[pos : block.start]
        pieces = _split_prose(before, limit)
        _extend(chunks, pieces, _gap(before, leading=True), merge=after_code, limit=limit)  # may consume pieces[0]
        head = ""
        if pieces and len(chunks[-1]) + 1 <= room // 2:
            head = chunks.pop()  # a short lead-in ("Here is the script:") travels with the code
        chunks.extend(_split_code(block, room, head, _gap(before, leading=False)))
        pos, after_code = block.end, True
    rest = text[pos:]
    _extend(chunks, _split_prose(rest, limit), _gap(rest, leading=True), merge=after_code, limit=limit)
    return chunks


def _gap(text: str, *, leading: bool) -> str:
    """The separator to use when joining across a code block: a blank line if the text had one there."""
    edge = text[: len(text) - len(text.lstrip())] if leading else text[len(text.rstrip()) :]
    return "\n\n" if edge.count("\n") >= 2 else "\n"


def _extend(chunks: list[str], pieces: list[str], sep: str, *, merge: bool, limit: int = 0) -> None:
    """Append `pieces`, first joining the first onto the last chunk (a code piece) if asked and it fits."""
    if merge and limit and pieces and chunks and len(chunks[-1]) + len(sep) + len(pieces[0]) <= limit:
        chunks[-1] += sep + pieces.pop(0)
    chunks.extend(pieces)


def _code_room(block: _Fence, limit: int) -> int:
    """How many characters of code fit in one chunk between the block's reopened fences."""
    return limit - len(block.opening) - len(block.closing) - 2


def _split_code(block: _Fence, room: int, head: str, sep: str) -> list[str]:
    """Cut an oversized code block between lines into fenced pieces of at most `room` code characters."""
    lines: list[str] = []
    for line in block.body.split("\n"):
        while len(line) > room:
            lines.append(line[:room])
            line = line[room:]
        lines.append(line)

    def fenced(body: list[str]) -> str:
        return f"{block.opening}\n" + "\n".join(body) + f"\n{block.closing}"

    chunks: list[str] = []
    current: list[str] = []
    size = 0
    available = room - len(head) - len(sep) if head else room
    if head and len(lines[0]) > available:
        chunks.append(head)
        head, available = "", room
    for line in lines:
        if current and size + 1 + len(line) > available:
            chunks.append(f"{head}{sep}{fenced(current)}" if head else fenced(current))
            head, available, current, size = "", room, [], 0
        size += len(line) + (1 if current else 0)
        current.append(line)
    if current:
        chunks.append(f"{head}{sep}{fenced(current)}" if head else fenced(current))
    return chunks


def _split_prose(text: str, limit: int) -> list[str]:
    """Cut text (which may hold code blocks that fit in a chunk) at the best break before each limit."""
    text = text.strip()
    starts, ends = _atomic_ranges(text, limit)

    def inside(cut: int) -> int | None:
        """The start of the protected range that `cut` would split, if any."""
        i = bisect.bisect_left(starts, cut) - 1
        return starts[i] if i >= 0 and starts[i] < cut < ends[i] else None

    chunks: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        if n - pos <= limit:
            chunks.append(text[pos:].strip())
            break
        cut = _choose_cut(text, pos, limit, inside)
        chunk = text[pos:cut].strip()
        if chunk:
            chunks.append(chunk)
        pos = cut
        while pos < n and text[pos].isspace():
            pos += 1
    return [chunk for chunk in chunks if chunk]


def _atomic_ranges(text: str, limit: int) -> tuple[list[int], list[int]]:
    """Sorted, non-overlapping (starts, ends) of code blocks and inline atoms no longer than `limit`."""
    blocks = [(b.start, b.end) for b in _fenced_blocks(text)]
    ranges = [(s, e) for s, e in blocks if e - s <= limit]
    block_starts = [s for s, _ in blocks]
    for match in _ATOMS.finditer(text):
        i = bisect.bisect_right(block_starts, match.start()) - 1
        if i >= 0 and match.start() < blocks[i][1]:
            continue  # inside a code block: the block decides
        if match.end() - match.start() <= limit:
            ranges.append(match.span())
    ranges.sort()
    return [s for s, _ in ranges], [e for _, e in ranges]


def _choose_cut(text: str, pos: int, limit: int, inside: Callable[[int], int | None]) -> int:
    """Where the chunk starting at `pos` should end: the best separator within `limit`, else a hard cut."""
    for separators, keep in _SEPARATORS:
        best = -1
        for sep in separators:
            high = pos + limit - keep + len(sep)  # so the chunk text[pos:i + keep] is at most `limit` long
            while True:
                i = text.rfind(sep, pos, high)
                if i <= pos or i <= best:
                    break
                if inside(i + keep) is None and text[pos : i + keep].strip():
                    best = i
                    break
                high = i + len(sep) - 1
        if best > pos:
            return best + keep
    cut = pos + limit
    while (start := inside(cut)) is not None and start > pos:
        cut = start
    return cut
