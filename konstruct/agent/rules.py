"""Escalation rules written by operators, such as `billing AND count > 2`: parsed into an AST (never eval'd) and matched.

Grammar (AND, OR, NOT case-insensitive; `count` is reserved, quote it to match the word):

    expr       := or
    or         := and ("OR" and)*
    and        := not ("AND" not)*
    not        := "NOT" not | atom
    atom       := "(" expr ")" | comparison | keyword
    comparison := "count" (> | >= | < | <= | = | == | !=) INT
    keyword    := WORD | "quoted phrase"

Keywords match case-insensitively and as whole words; a phrase's words may be separated by any whitespace.
`count` is the person's number of turns in the conversation.
"""

from __future__ import annotations

import operator
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

MAX_LENGTH = 1000
MAX_DEPTH = 50

_COMPARE: dict[str, Callable[[int, int], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "=": operator.eq,
    "==": operator.eq,
    "!=": operator.ne,
}
_NEGATED = {">": "<=", ">=": "<", "<": ">=", "<=": ">", "=": "!=", "==": "!=", "!=": "="}
_OPERATORS = " ".join(_COMPARE)
_QUOTES = '"“”'
_APOSTROPHES = "'’"
_OPERATOR_CHARS = "<>=!"
_DELIMITERS = "()" + _QUOTES + _OPERATOR_CHARS
_CHAR_HINTS = {"&": " (use AND)", "|": " (use OR)"}
_DIGITS = re.compile(r"[0-9]+")


class RuleError(ValueError):
    """A rule that does not parse; `position` is the 0-based character offset of the problem in `text`."""

    def __init__(self, message: str, position: int, text: str = "") -> None:
        super().__init__(message, position, text)
        self.message = message
        self.position = position
        self.text = text

    def __str__(self) -> str:
        where = f"{self.message} at position {self.position}"
        return f"{where}: {_excerpt(self.text, self.position)}" if self.text.strip() else where


@dataclass(frozen=True, slots=True)
class Keyword:
    """A word or phrase that must occur in the message as whole words, in any case."""

    text: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        words = _fold(self.text).split()
        if not words:
            raise ValueError("a keyword needs at least one word")
        body = r"\s+".join(re.escape(word) for word in words)
        object.__setattr__(self, "pattern", re.compile(rf"(?<!\w){body}(?!\w)"))


@dataclass(frozen=True, slots=True)
class Count:
    """`count <op> value`, compared against the person's number of turns."""

    op: str
    value: int

    def __post_init__(self) -> None:
        if self.op not in _COMPARE:
            raise ValueError(f"unknown operator {self.op!r}")


@dataclass(frozen=True, slots=True)
class Not:
    """True when its operand is false."""

    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    """True when every operand is."""

    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """True when any operand is."""

    operands: tuple[Node, ...]


Node: TypeAlias = Keyword | Count | Not | And | Or


@dataclass(frozen=True)
class Explanation:
    """Whether a rule fired, and the terms that decided it."""

    fired: bool
    reasons: list[str]


@dataclass(frozen=True)
class Rule:
    """A parsed rule: its text as written and the root of its AST."""

    text: str
    node: Node

    def matches(self, message: str, count: int) -> bool:
        return _evaluate(self.node, _fold(message), count)

    def explain(self, message: str, count: int) -> Explanation:
        return _explanation(self.node, _fold(message), count)


def parse(text: str) -> Rule:
    """Parse a rule; raises RuleError naming what is wrong and where."""
    if len(text) > MAX_LENGTH:
        raise RuleError(f"rule is too long ({len(text)} characters, at most {MAX_LENGTH})", MAX_LENGTH, text)
    return Rule(text, _Parser(text).parse())


def first_match(rules: Sequence[Rule], message: str, count: int) -> tuple[Rule, Explanation] | None:
    """The first rule that fires for this message, with why; None when none does."""
    folded = _fold(message)
    for rule in rules:
        if _evaluate(rule.node, folded, count):
            return rule, _explanation(rule.node, folded, count)
    return None


def _fold(text: str) -> str:
    """Caseless, normalised form of a message or keyword, so `Straße` meets `STRASSE` and `don’t` meets `don't`."""
    return unicodedata.normalize("NFKC", text.casefold()).replace("’", "'")


def _evaluate(node: Node, text: str, count: int) -> bool:
    if isinstance(node, Keyword):
        return node.pattern.search(text) is not None
    if isinstance(node, Count):
        return _COMPARE[node.op](count, node.value)
    if isinstance(node, Not):
        return not _evaluate(node.operand, text, count)
    if isinstance(node, And):
        return all(_evaluate(operand, text, count) for operand in node.operands)
    return any(_evaluate(operand, text, count) for operand in node.operands)


def _explanation(node: Node, text: str, count: int) -> Explanation:
    fired, reasons = _explain(node, text, count)
    return Explanation(fired, list(dict.fromkeys(reasons)))


def _explain(node: Node, text: str, count: int) -> tuple[bool, list[str]]:
    """The value of node, with the facts that decided it: all operands when each mattered, else the first decisive one."""
    if isinstance(node, Keyword):
        found = node.pattern.search(text) is not None
        return found, [f'"{node.text}" {"found" if found else "not found"}']
    if isinstance(node, Count):
        held = _COMPARE[node.op](count, node.value)
        return held, [f"count {count} {node.op if held else _NEGATED[node.op]} {node.value}"]
    if isinstance(node, Not):
        value, reasons = _explain(node.operand, text, count)
        return not value, reasons
    decisive = isinstance(node, Or)
    collected: list[str] = []
    for operand in node.operands:
        value, reasons = _explain(operand, text, count)
        if value == decisive:
            return value, reasons
        collected += reasons
    return not decisive, collected


def _excerpt(text: str, position: int, width: int = 60) -> str:
    line = "".join(" " if char.isspace() else char for char in text)
    if len(line) <= width:
        return line
    start = max(0, min(position - width // 2, len(line) - width))
    end = start + width
    return ("…" if start else "") + line[start:end] + ("…" if end < len(line) else "")


_Kind = Literal["(", ")", "and", "or", "not", "count", "op", "word", "phrase", "end"]
_RESERVED: dict[str, _Kind] = {"and": "and", "or": "or", "not": "not", "count": "count"}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str
    position: int
    value: str = ""


def _tokens(text: str) -> Iterator[_Token]:
    """Tokens one by one, so a lexical error is only raised once the parser gets that far."""
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "()":
            yield _Token("(" if char == "(" else ")", char, i)
            i += 1
        elif char in _QUOTES:
            end = next((j for j in range(i + 1, len(text)) if text[j] in _QUOTES), -1)
            if end < 0:
                raise RuleError("unterminated quote", i, text)
            phrase = text[i + 1 : end].strip()
            if not phrase:
                raise RuleError("empty phrase", i, text)
            yield _Token("phrase", text[i : end + 1], i, phrase)
            i = end + 1
        else:
            end = i + 1
            if char in _OPERATOR_CHARS:
                while end < len(text) and text[end] in _OPERATOR_CHARS:
                    end += 1
                yield _Token("op", text[i:end], i)
            else:
                while end < len(text) and not (text[end].isspace() or text[end] in _DELIMITERS):
                    end += 1
                word = text[i:end]
                yield _Token(_RESERVED.get(word.casefold(), "word"), word, i)
            i = end
    yield _Token("end", "", len(text))


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char in _APOSTROPHES or char == "-" or unicodedata.category(char).startswith("M")


class _Parser:
    """Recursive descent with one token of lookahead; depth is bounded so deep input is a RuleError, not a RecursionError."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.previous: _Token | None = None
        self.token = next(self.tokens)
        self.depth = 0
        self.parens = 0

    def parse(self) -> Node:
        if self.token.kind == "end":
            raise self.error("empty rule", 0)
        node = self.parse_or()
        if self.token.kind != "end":
            raise self.unexpected_after_term("end of rule")
        return node

    def parse_or(self) -> Node:
        operands = [self.parse_and()]
        while self.token.kind == "or":
            self.advance()
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def parse_and(self) -> Node:
        operands = [self.parse_not()]
        while self.token.kind == "and":
            self.advance()
            operands.append(self.parse_not())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def parse_not(self) -> Node:
        if self.token.kind != "not":
            return self.parse_atom()
        self.enter()
        self.advance()
        node = Not(self.parse_not())
        self.depth -= 1
        return node

    def parse_atom(self) -> Node:
        token = self.token
        if token.kind == "(":
            self.enter()
            self.parens += 1
            self.advance()
            node = self.parse_or()
            if self.token.kind == "end":
                raise self.error("unclosed '('", token.position)
            if self.token.kind != ")":
                raise self.unexpected_after_term("')'")
            self.advance()
            self.parens -= 1
            self.depth -= 1
            return node
        if token.kind == "count":
            return self.parse_comparison()
        if token.kind == "phrase":
            self.advance()
            return Keyword(token.value)
        if token.kind == "word":
            self.check_word(token)
            self.advance()
            return Keyword(token.text)
        if token.kind == ")" and not self.parens:
            raise self.error("unmatched ')'")
        if token.kind == ")" and self.previous is not None and self.previous.kind == "(":
            raise self.error("empty parentheses", self.previous.position)
        previous = self.previous
        after = f" after {previous.kind.upper()}" if previous is not None and previous.kind in ("and", "or", "not") else ""
        raise self.error(f"expected a keyword or '('{after}, found {self.found()}{self.hint()}")

    def parse_comparison(self) -> Count:
        self.advance()
        op = self.token
        if op.kind != "op":
            quote = "" if op.kind == "word" and _DIGITS.fullmatch(op.text) else ' (to match the word, quote it: "count")'
            raise self.error(f"expected a comparison operator ({_OPERATORS}) after count, found {self.found()}{quote}")
        if op.text not in _COMPARE:
            raise self.error(f"unknown operator {op.text!r} (use one of {_OPERATORS})")
        self.advance()
        if self.token.kind != "word" or not _DIGITS.fullmatch(self.token.text):
            raise self.error(f"expected a whole number after {op.text!r}, found {self.found()}")
        value = int(self.token.text)
        self.advance()
        return Count(op.text, value)

    def check_word(self, token: _Token) -> None:
        for offset, char in enumerate(token.text):
            if not _is_word_char(char):
                raise self.error(f"unexpected character {char!r}{_CHAR_HINTS.get(char, '')}", token.position + offset)
        if token.text.startswith("-"):
            raise self.error("a keyword cannot start with '-' (use NOT to exclude a word)", token.position)
        if not any(char.isalnum() for char in token.text):
            raise self.error(f"a keyword needs a letter or digit, found {token.text!r}", token.position)

    def unexpected_after_term(self, closer: str) -> RuleError:
        if self.token.kind == ")" and not self.parens:
            return self.error("unmatched ')'")
        if self.token.kind == "not":
            return self.error("expected AND or OR before NOT")
        if self.token.kind == "word":
            self.check_word(self.token)
        return self.error(f"expected AND, OR or {closer}, found {self.found()}{self.hint()}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested too deeply (more than {MAX_DEPTH} levels)")

    def advance(self) -> None:
        self.previous, self.token = self.token, next(self.tokens)

    def found(self) -> str:
        return "end of rule" if self.token.kind == "end" else repr(self.token.text)

    def hint(self) -> str:
        if self.token.kind != "op":
            return ""
        if self.token.text in _COMPARE:
            return " (only count can be compared)"
        return " (use NOT)" if self.token.text.startswith("!") else ""

    def error(self, message: str, position: int | None = None) -> RuleError:
        return RuleError(message, self.token.position if position is None else position, self.text)
