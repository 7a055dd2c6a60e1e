"""Traefik router rules (`traefik.http.routers.<name>.rule`) → a small syntax tree.

This module owns the rule *syntax* and nothing else: a tokenizer and a
recursive-descent parser written from Traefik's documented v2/v3 rule grammar,
pure functions, no mitmproxy, no regular expressions.  What a rule means for
routing (which hosts and paths a container serves, which rules are refused) is
decided by `labels.py`, which walks the tree this module returns.

Grammar (whitespace is allowed between any two tokens):

    rule    := or EOF
    or      := and ( "||" and )*
    and     := unary ( "&&" unary )*
    unary   := "!" unary | primary
    primary := "(" or ")" | matcher
    matcher := NAME "(" STRING ( "," STRING )* ")"
    NAME    := ASCII letter or "_", then ASCII letters, digits, "_"
    STRING  := "`" any characters but "`" "`"
             | '"' characters, where \\" and \\\\ stand for " and \\ '"'

Every matcher needs at least one quoted argument (all of Traefik's do).  Any
matcher name is accepted (Host, PathPrefix, HostRegexp, Header, …): the syntax
check is complete even for matchers wakeproxy does not act on yet.

Cost: each character is looked at a constant number of times (quoted strings
are skipped with `str.find`), so tokenizing and parsing are linear in the rule's
length; nesting of parentheses and `!` is capped at `MAX_DEPTH`, which also caps
the recursion.  Errors are `RuleError`s carrying a character position and a
short reason; they never quote the rule back beyond a short token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAX_DEPTH = 32  # nested "(" and "!"; real rules use two or three
_SHOWN = 32  # at most this many characters of a token appear in an error message

_IDENT_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_IDENT_REST = _IDENT_START | frozenset("0123456789")
_SPACE = frozenset(" \t\r\n\f\v")


class RuleError(ValueError):
    """A rule that is not valid Traefik syntax; `pos` is the 0-based character offset."""

    def __init__(self, reason: str, pos: int) -> None:
        super().__init__(f"{reason} at character {pos + 1}")
        self.reason = reason
        self.pos = pos


# --- syntax tree -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Matcher:
    """`Name(args…)`: one Traefik matcher with its (unquoted) arguments."""

    name: str
    args: tuple[str, ...]
    pos: int  # where the name starts


@dataclass(frozen=True)
class Not:
    operand: Expr
    pos: int  # where the "!" is


@dataclass(frozen=True)
class And:
    operands: tuple[Expr, ...]  # two or more


@dataclass(frozen=True)
class Or:
    operands: tuple[Expr, ...]  # two or more


Expr = Matcher | Not | And | Or


# --- tokens ----------------------------------------------------------------------------------

_NAME, _STRING, _LPAREN, _RPAREN, _COMMA, _AND, _OR, _NOT, _END = (
    "name", "string", "(", ")", ",", "&&", "||", "!", "end of rule",
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str  # the name, or a string's unquoted value; "" for punctuation
    pos: int


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")


def _double_quoted(rule: str, start: int) -> tuple[str, int]:
    """The value of the '"'-string opening at `start`, and the offset after its closing quote."""
    parts: list[str] = []
    i = start + 1
    n = len(rule)
    quote = rule.find('"', i)
    while True:
        if i > quote != -1:  # that quote was escaped: look for the next one (each search starts later)
            quote = rule.find('"', i)
        backslash = rule.find("\\", i, quote if quote != -1 else n)
        if backslash == -1:
            if quote == -1:
                raise RuleError('unterminated "-quoted string', start)
            parts.append(rule[i:quote])
            return "".join(parts), quote + 1
        parts.append(rule[i:backslash])
        if backslash + 1 >= n:
            raise RuleError('unterminated "-quoted string', start)
        nxt = rule[backslash + 1]
        parts.append(nxt if nxt in '"\\' else "\\" + nxt)
        i = backslash + 2


def tokenize(rule: str) -> Iterator[_Token]:
    """The rule's tokens, ending with an end-of-rule token; RuleError on a stray character.

    A generator, so that the parser reports the first error in rule order: in `Host(a.test)`
    the missing quote, before the `.` the tokenizer would stop at."""
    i = 0
    n = len(rule)
    while i < n:
        c = rule[i]
        if c in _SPACE:
            i += 1
        elif c in _IDENT_START:
            j = i + 1
            while j < n and rule[j] in _IDENT_REST:
                j += 1
            yield _Token(_NAME, rule[i:j], i)
            i = j
        elif c == "`":
            end = rule.find("`", i + 1)
            if end == -1:
                raise RuleError("unterminated `-quoted string", i)
            yield _Token(_STRING, rule[i + 1:end], i)
            i = end + 1
        elif c == '"':
            value, j = _double_quoted(rule, i)
            yield _Token(_STRING, value, i)
            i = j
        elif c in "(),!":
            yield _Token(c, "", i)
            i += 1
        elif c in "&|" and rule.startswith(c * 2, i):
            yield _Token(c * 2, "", i)
            i += 2
        else:
            raise RuleError(f"unexpected character {_shown(c)}", i)
    yield _Token(_END, "", n)


# --- parser ----------------------------------------------------------------------------------


class _Parser:
    """One pass over the tokens with one token of lookahead."""

    def __init__(self, tokens: Iterator[_Token]) -> None:
        self.tokens = tokens
        self.next: _Token | None = None  # read only when asked for, so errors come in rule order
        self.depth = 0

    def peek(self) -> _Token:
        if self.next is None:
            self.next = next(self.tokens)
        return self.next

    def take(self) -> _Token:
        tok = self.peek()
        if tok.kind != _END:
            self.next = None
        return tok

    def fail(self, expected: str, tok: _Token) -> RuleError:
        if tok.kind == _NAME:
            found = f"name {_shown(tok.text)}"
        elif tok.kind == _STRING:
            found = "a quoted string"
        elif tok.kind == _END:
            found = tok.kind
        else:
            found = f"'{tok.kind}'"
        return RuleError(f"expected {expected}, found {found}", tok.pos)

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RuleError(f"nested more than {MAX_DEPTH} levels deep", pos)

    def rule(self) -> Expr:
        if self.peek().kind == _END:
            raise RuleError("empty rule", 0)
        expr = self.or_()
        tok = self.peek()
        if tok.kind == _RPAREN:
            raise RuleError("unbalanced ')'", tok.pos)
        if tok.kind != _END:
            raise self.fail("'&&', '||' or the end of the rule", tok)
        return expr

    def or_(self) -> Expr:
        operands = [self.and_()]
        while self.peek().kind == _OR:
            self.take()
            operands.append(self.and_())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_(self) -> Expr:
        operands = [self.unary()]
        while self.peek().kind == _AND:
            self.take()
            operands.append(self.unary())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def unary(self) -> Expr:
        tok = self.peek()
        if tok.kind != _NOT:
            return self.primary()
        self.take()
        self.enter(tok.pos)
        operand = self.unary()
        self.depth -= 1
        return Not(operand, tok.pos)

    def primary(self) -> Expr:
        tok = self.take()
        if tok.kind == _LPAREN:
            self.enter(tok.pos)
            expr = self.or_()
            close = self.take()
            if close.kind != _RPAREN:
                if close.kind == _END:
                    raise RuleError("unbalanced '(': no matching ')'", tok.pos)
                raise self.fail("')', '&&' or '||'", close)
            self.depth -= 1
            return expr
        if tok.kind != _NAME:
            raise self.fail("a matcher such as Host(`…`), '(' or '!'", tok)
        return self.matcher(tok)

    def matcher(self, name: _Token) -> Matcher:
        opening = self.take()
        if opening.kind != _LPAREN:
            raise self.fail(f"'(' after {_shown(name.text)}", opening)
        args: list[str] = []
        while True:
            arg = self.take()
            if arg.kind != _STRING:
                raise self.fail(f"a quoted argument (`…` or \"…\") in {name.text[:_SHOWN]}(…)", arg)
            args.append(arg.text)
            sep = self.take()
            if sep.kind == _RPAREN:
                return Matcher(name.text, tuple(args), name.pos)
            if sep.kind != _COMMA:
                if sep.kind == _END:
                    raise RuleError(f"unbalanced '(': {name.text[:_SHOWN]}( has no matching ')'", opening.pos)
                raise self.fail(f"',' or ')' in {name.text[:_SHOWN]}(…)", sep)


def parse_rule(rule: str) -> Expr:
    """A Traefik rule → its syntax tree; RuleError (with a position) when it is not valid syntax."""
    return _Parser(tokenize(rule)).rule()


def host_arguments(rule: str) -> list[str]:
    """The arguments of the rule's `Host(…)` matchers, read token by token as far as the rule
    tokenizes, so also from a rule that is not valid (``Host(`a.test`` has lost its `)`);
    a Host right after a `!` is left out.  For naming the hosts of a rule that cannot be
    routed, never for routing.  Linear, like `tokenize`."""
    found: list[str] = []
    prev: _Token | None = None
    state = ""  # "" | "host" (after Host) | "args" (inside Host's parentheses)
    try:
        for tok in tokenize(rule):
            if state == "args" and tok.kind == _STRING:
                found.append(tok.text)
            elif state == "args" and tok.kind == _COMMA:
                pass
            elif state == "host" and tok.kind == _LPAREN:
                state = "args"
            else:
                state = "host" if tok.kind == _NAME and tok.text in ("Host", "host") and \
                    (prev is None or prev.kind != _NOT) else ""
            prev = tok
    except RuleError:
        pass
    return found
