"""Safe arithmetic: a small tokenizer and recursive-descent parser that evaluates as it parses (no eval, no ast).

Grammar (Python's precedence; ``**`` is right-associative and binds tighter than a unary minus on its left)::

    expr  := term (("+" | "-") term)*
    term  := unary (("*" | "/" | "//" | "%") unary)*
    unary := ("-" | "+") unary | power
    power := atom ("**" unary)?
    atom  := NUMBER | NAME | NAME "(" expr ("," expr)* ")" | "(" expr ")"
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from konstruct.agent.tools.registry import ToolError

MAX_LENGTH = 500
MAX_DEPTH = 50
MAX_INT = 10**300  # integers stay exact up to here; beyond, the result is "too large"
MAX_POWER_BITS = 1_000  # an integer power whose result would need more bits is refused before computing it

Number = int | float

_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<op>\*\*|//|[-+*/%(),])",
    re.ASCII,
)

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}


@dataclass(frozen=True)
class _Token:
    kind: str  # number, name, op, end
    text: str
    pos: int  # 1-based character position


def _tokenize(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(expression):
        match = _TOKEN.match(expression, pos)
        if match is None:
            char = expression[pos]
            hint = " (use ** for powers)" if char == "^" else ""
            raise ToolError(f"syntax error at position {pos + 1}: unexpected character {char!r}{hint}")
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token(kind, match.group(), pos + 1))
        pos = match.end()
    tokens.append(_Token("end", "", len(expression) + 1))
    return tokens


def _checked(value: Number) -> Number:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ToolError("the result is too large")
    if isinstance(value, float) and math.isinf(value):
        raise ToolError("the result is too large")
    if isinstance(value, float) and math.isnan(value):
        raise ToolError("the result is not a number")
    return value


def _power(base: Number, exponent: Number) -> Number:
    exact = isinstance(base, int) and isinstance(exponent, int)
    if exact and exponent > 0 and abs(base) > 1 and exponent * math.log2(abs(base)) > MAX_POWER_BITS:
        raise ToolError("the result is too large")
    return base**exponent


def _divide(op: str, left: Number, right: Number) -> Number:
    if right == 0:
        raise ToolError("division by zero")
    if op == "/":
        return left / right
    return left // right if op == "//" else left % right


def _round(value: Number, digits: Number = 0) -> Number:
    if not isinstance(digits, int) or abs(digits) > 15:
        raise ToolError("round: the number of digits must be a whole number from -15 to 15")
    return round(value) if digits == 0 and isinstance(value, float) else round(value, digits)


def _log(value: Number, base: Number | None = None) -> float:
    if value <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise ToolError("log: math domain error")
    return math.log(value) if base is None else math.log(value, base)


def _sqrt(value: Number) -> float:
    if value < 0:
        raise ToolError("sqrt: math domain error (negative number)")
    return math.sqrt(value)


# name: (function, minimum arguments, maximum arguments or None for any)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int | None]] = {
    "sqrt": (_sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (lambda *args: min(args), 1, None),
    "max": (lambda *args: max(args), 1, None),
    "log": (_log, 1, 2),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
}


class _Parser:
    def __init__(self, expression: str) -> None:
        self.tokens = _tokenize(expression)
        self.index = 0
        self.depth = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, text: str) -> None:
        if self.token.text != text or self.token.kind != "op":
            self.fail(f"expected {text!r}")
        self.index += 1

    def fail(self, message: str) -> NoReturn:
        token = self.token
        found = "the end of the expression" if token.kind == "end" else repr(token.text)
        raise ToolError(f"syntax error at position {token.pos}: {message}, found {found}")

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ToolError(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)")

    def parse(self) -> Number:
        value = self.expr()
        if self.token.kind != "end":
            self.fail("expected an operator")
        return value

    def expr(self) -> Number:
        value = self.term()
        while self.token.kind == "op" and self.token.text in ("+", "-"):
            op = self.take().text
            right = self.term()
            value = _checked(value + right if op == "+" else value - right)
        return value

    def term(self) -> Number:
        value = self.unary()
        while self.token.kind == "op" and self.token.text in ("*", "/", "//", "%"):
            op = self.take().text
            right = self.unary()
            value = _checked(value * right if op == "*" else _divide(op, value, right))
        return value

    def unary(self) -> Number:
        if self.token.kind == "op" and self.token.text in ("-", "+"):
            op = self.take().text
            self.nest()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Number:
        base = self.atom()
        if self.token.kind == "op" and self.token.text == "**":
            self.take()
            self.nest()
            exponent = self.unary()
            self.depth -= 1
            return _checked(_power(base, exponent))
        return base

    def atom(self) -> Number:
        token = self.token
        if token.kind == "number":
            self.index += 1
            text = token.text
            return _checked(int(text) if text.isdigit() else float(text))
        if token.kind == "name":
            self.index += 1
            name = token.text.lower()
            if name in _CONSTANTS:
                return _CONSTANTS[name]
            if name not in _FUNCTIONS:
                raise ToolError(f"unknown name {token.text!r} at position {token.pos}")
            return self.call(name, token)
        if token.kind == "op" and token.text == "(":
            self.index += 1
            self.nest()
            value = self.expr()
            self.depth -= 1
            self.expect(")")
            return value
        self.fail("expected a number, a name or '('")

    def call(self, name: str, token: _Token) -> Number:
        function, least, most = _FUNCTIONS[name]
        self.expect("(")
        self.nest()
        args = [self.expr()]
        while self.token.kind == "op" and self.token.text == ",":
            self.take()
            args.append(self.expr())
        self.depth -= 1
        self.expect(")")
        if len(args) < least or (most is not None and len(args) > most):
            count = str(least) if least == most else f"{least} to {most}" if most is not None else f"at least {least}"
            raise ToolError(f"{name} takes {count} argument{'' if count == '1' else 's'}, got {len(args)} (position {token.pos})")
        try:
            return _checked(function(*args))
        except (ValueError, OverflowError) as exc:
            raise ToolError(f"{name}: {exc}") from None


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression; any problem is a ``ToolError`` with a message for the model."""
    if len(expression) > MAX_LENGTH:
        raise ToolError(f"the expression is {len(expression)} characters; the limit is {MAX_LENGTH}")
    if not expression.strip():
        raise ToolError("the expression is empty")
    try:
        return _checked(_Parser(expression).parse())
    except OverflowError:
        raise ToolError("the result is too large") from None
    except ZeroDivisionError:
        raise ToolError("division by zero") from None


def format_number(value: Number) -> str:
    """An int as is; a float with up to 15 significant digits (0.1 + 0.2 shows as 0.3)."""
    if isinstance(value, int):
        return str(value)
    text = f"{value:.15g}"
    return text if any(c in text for c in ".en") else text + ".0"
