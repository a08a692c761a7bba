"""From a document's bytes to its text: Markdown and plain text decoded, HTML reduced to Markdown-like text (headings
kept as ``#`` lines, scripts, styles and navigation dropped), PDF read with pypdf page by page.

A document that cannot be read raises ``ExtractError`` with a message meant for the person who added it.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePosixPath

from konstruct.errors import ValidationError

KINDS = ("markdown", "text", "html", "pdf")
SUFFIXES = {
    ".md": "markdown", ".markdown": "markdown", ".mdx": "markdown",
    ".txt": "text", ".text": "text", ".rst": "text",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".pdf": "pdf",
}  # fmt: skip
CONTENT_TYPES = {
    "text/markdown": "markdown", "text/x-markdown": "markdown", "text/plain": "text",
    "text/html": "html", "application/xhtml+xml": "html", "application/pdf": "pdf",
}  # fmt: skip
PAGE_BREAK = "\f"  # between the pages of a PDF's text; the chunker names chunks after their page


class ExtractError(ValidationError):
    """A document whose text cannot be read (damaged, encrypted, binary, empty)."""


@dataclass(frozen=True)
class Document:
    """A document's text and, where it has one, its title (an HTML <title>, a PDF's metadata title)."""

    text: str
    title: str | None = None


def kind_for(name: str, content_type: str | None = None) -> str | None:
    """The kind of a document from its content type (for URLs) or its file name; None for one we do not read."""
    if content_type:
        found = CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if found and not (found == "text" and kind_for(name) == "markdown"):  # a .md served as text/plain
            return found
    return SUFFIXES.get(PurePosixPath(name.split("?")[0].split("#")[0]).suffix.lower())


def extract(kind: str, data: bytes, charset: str | None = None) -> Document:
    """The text of a document of this kind; ExtractError when there is none to read."""
    if kind == "pdf":
        document = _pdf(data)
    elif kind == "html":
        document = html_to_markdown(_decode(data, charset))
    elif kind in ("markdown", "text"):
        document = Document(_decode(data, charset))
    else:
        raise ExtractError(f"{kind!r} is not a kind of document Konstruct reads ({', '.join(KINDS)})")
    text = _tidy(document.text)
    if not text.replace(PAGE_BREAK, "").strip():
        raise ExtractError("no text found in it" + (" (a scanned PDF has only images: run OCR on it first)" if kind == "pdf" else ""))
    return Document(text, document.title)


def _decode(data: bytes, charset: str | None) -> str:
    if b"\x00" in data[:8192]:
        raise ExtractError("it is binary, not text")
    for encoding in (charset, "utf-8-sig"):
        if encoding:
            try:
                return data.decode(encoding)
            except (LookupError, UnicodeDecodeError):
                continue
    try:
        return data.decode("cp1252")  # older Windows text; every byte but five decodes
    except UnicodeDecodeError:
        raise ExtractError("it is neither UTF-8 nor Windows-1252 text") from None


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    lines = [re.sub(r"[ \t\v]+$", "", line) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _pdf(data: bytes) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about sloppy files are not the reader's business
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractError("the PDF is encrypted with a password")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except ExtractError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        raise ExtractError(f"not a readable PDF ({type(exc).__name__}: {exc})") from None
    return Document(PAGE_BREAK.join(pages), str(title).strip() or None if title else None)


_SKIP = {"script", "style", "noscript", "template", "svg", "iframe", "object", "canvas", "nav"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_BLOCK = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "footer", "form", "header"}
_BLOCK |= {"hr", "li", "main", "ol", "p", "pre", "section", "table", "tr", "ul"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "wbr", "source", "area", "base", "col", "embed", "param", "track"}


class _MarkdownExtractor(HTMLParser):
    """HTML to text with headings as Markdown ``#`` lines, so the chunker splits an HTML page as it splits Markdown."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping: list[str] = []
        self.in_title = False
        self.in_heading = False
        self.title: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        if tag in _SKIP and tag not in _VOID:
            self.skipping.append(tag)
        elif tag in _HEADINGS:
            self.in_heading = True
            self.parts.append("\n\n" + "#" * _HEADINGS[tag] + " ")
        elif tag in _BLOCK:
            self.parts.append("\n- " if tag == "li" else "\n\n" if tag == "p" else "\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if self.skipping and tag == self.skipping[-1]:
            self.skipping.pop()
        elif tag in _HEADINGS or tag == "p":
            self.in_heading = False
            self.parts.append("\n\n")
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.skipping:
            self.parts.append(data.replace("\n", " ") if self.in_heading else data)


def html_to_markdown(html: str) -> Document:
    """An HTML page's readable text, its headings as ``#`` lines, and its <title>."""
    parser = _MarkdownExtractor()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v\u00a0]+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    text = "\n".join(line for line in lines if line != "-")
    title = re.sub(r"\s+", " ", "".join(parser.title)).strip()
    return Document(text, title or None)
