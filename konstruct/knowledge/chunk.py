"""A document's text split into chunks for retrieval: along headings first (each chunk lies under one heading, whose
path it keeps, e.g. "Refunds > Damaged items"), then along paragraphs, then sentences, with a little overlap between
neighbouring chunks of one section so that a sentence cut from its context is still found with it.

Sizes are in characters: ``TARGET`` (about 200 tokens) keeps a chunk inside all-MiniLM-L6-v2's 256-token window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from konstruct.knowledge.extract import PAGE_BREAK

TARGET = 900
OVERLAP = 150
MAX_HEADING = 300

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n")


@dataclass(frozen=True)
class Chunk:
    """One piece of a document: its heading path ('' for none) and its text."""

    heading: str
    content: str


def embedding_text(heading: str, content: str) -> str:
    """What is embedded for a chunk (and what a query is compared with): its heading path, then its text."""
    return f"{heading}\n{content}" if heading else content


def split(kind: str, text: str, *, target: int = TARGET, overlap: int = OVERLAP) -> list[Chunk]:
    """The chunks of a document of this kind (markdown and html by headings, pdf by page, text by paragraph)."""
    if kind in ("markdown", "html"):
        sections = markdown_sections(text)
    elif kind == "pdf":
        sections = [(f"page {n}", page) for n, page in enumerate(text.split(PAGE_BREAK), 1)]
    else:
        sections = [("", text)]
    return [Chunk(heading, piece) for heading, body in sections for piece in pack(paragraphs(body), target, overlap)]


def markdown_sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) for each part of a Markdown text under a heading (headings in code fences are not)."""
    sections: list[tuple[str, str]] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []
    fenced = False

    def close() -> None:
        content = "\n".join(body).strip()
        if content:
            sections.append((" > ".join(title for _, title in path)[:MAX_HEADING], content))
        body.clear()

    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _ATX.match(line)
        if heading is None:
            body.append(line)
            continue
        close()
        level = len(heading.group(1))
        path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, _plain(heading.group(2)))]
    close()
    return sections


def _plain(title: str) -> str:
    """A heading without Markdown emphasis, code marks or link targets."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return re.sub(r"[*_`]+", "", title).strip()


def paragraphs(body: str) -> list[str]:
    """The blank-line separated paragraphs of a text, each stripped, none empty."""
    return [p.strip() for p in re.split(r"\n[ \t]*\n", body) if p.strip()]


def pack(blocks: list[str], target: int, overlap: int) -> list[str]:
    """Blocks joined into chunks of about ``target`` characters; a chunk after the first starts with the end of the one before."""
    pieces = [piece for block in blocks for piece in (_split_long(block, target) if len(block) > target else [block])]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        if current and size + len(piece) > target:
            chunks.append("\n\n".join(current))
            tail = _tail(current[-1], overlap)
            current, size = ([tail], len(tail) + 2) if tail else ([], 0)
        current.append(piece)
        size += len(piece) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _split_long(block: str, target: int) -> list[str]:
    """A paragraph longer than ``target`` cut at sentence ends (or line ends), a sentence longer than that at words."""
    sentences = [s for s in _SENTENCE_END.split(block) if s.strip()]
    words = [w for s in sentences for w in (_by_words(s, target) if len(s) > target else [s.strip()])]
    pieces: list[str] = []
    for sentence in words:
        if pieces and len(pieces[-1]) + 1 + len(sentence) <= target:
            pieces[-1] += " " + sentence
        else:
            pieces.append(sentence)
    return pieces


def _by_words(sentence: str, target: int) -> list[str]:
    pieces: list[str] = []
    for word in sentence.split():
        while len(word) > target:  # no spaces at all (a hash, a URL): cut it
            pieces.append(word[:target])
            word = word[target:]
        if pieces and len(pieces[-1]) + 1 + len(word) <= target:
            pieces[-1] += " " + word
        else:
            pieces.append(word)
    return pieces


def _tail(text: str, overlap: int) -> str:
    """The last sentences of ``text`` within ``overlap`` characters (or its last words), to begin the next chunk with."""
    if overlap <= 0:
        return ""
    if len(text) <= overlap:
        return text
    tail = ""
    for sentence in reversed([s for s in _SENTENCE_END.split(text) if s.strip()]):
        if len(tail) + len(sentence) + 1 > overlap:
            break
        tail = f"{sentence} {tail}".strip()
    if tail:
        return tail
    cut = text[-overlap:]
    return "…" + cut[cut.find(" ") + 1 :] if " " in cut else "…" + cut
