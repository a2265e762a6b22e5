"""EDN text → Python values, with positions: where each part of a value, or a problem, is written.

This module owns reading EDN and nothing else: it knows no program that uses it (it imports
nothing of condo; import-linter enforces it) and does no I/O. edn_format (a PLY lexer and parser)
does the reading; this module adds what it lacks:

* errors with a place: `EdnError` carries the offset, 1-based line and column of the problem when
  it has one, and a message in EDN's words. edn_format and PLY throw many foreign exception types
  on junk; `read_document` maps every one of them to `EdnError`, once.
* positions of parts: `Document.locate(path)` finds where a key path (map keys by name, vector and
  list elements by index) is written, so a caller checking the value can say where to look.
* the rules edn_format leaves out: a map with the same key twice is an error (edn_format keeps
  the last silently), nesting is bounded by `max_depth` before parsing (conversion and hashing
  of the values recurse), and CR line ends and a leading BOM are read as blanks.

Values are edn_format's: `Keyword`, `Symbol`, `Char` (a str), `ImmutableDict`, `ImmutableList`
(vectors), tuples (lists), frozensets, `MetadataValue` (^meta; `unwrap` peels it), datetimes for
#inst, `uuid.UUID` for #uuid, `Decimal` for 1.5M, `Fraction` for 1/2.
"""

from __future__ import annotations

import decimal
import fractions
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, Final

import attrs
import edn_format
from edn_format import EDNDecodeError, Keyword, MetadataValue, Symbol, edn_lex

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "KNOWN_TAGS",
    "Document",
    "EdnError",
    "Keyword",
    "NotOneValue",
    "Path",
    "Position",
    "Symbol",
    "UnknownTag",
    "describe",
    "position_in",
    "read",
    "read_document",
    "show",
    "unwrap",
]

DEFAULT_MAX_DEPTH: Final = 64
"""Deepest nesting of collections `read_document` accepts unless told otherwise."""

KNOWN_TAGS: Final = ("inst", "uuid")
"""The tags edn_format reads; any other `#tag` is an `UnknownTag`."""

Path = Sequence[str | int]
"""Steps into a value: a str names a map key (keyword, symbol or string), an int an element."""


@attrs.frozen
class Position:
    """A place in the text: 0-based character offset, 1-based line and column."""

    offset: int
    line: int
    column: int


class EdnError(Exception):
    """The text is not EDN this reader accepts.

    Attributes:
        message: what is wrong, in EDN's words.
        position: where it can be seen, or None when it is the whole text.
    """

    def __init__(self, message: str, position: Position | None = None) -> None:
        self.message = message
        self.position = position
        where = f"{position.line}:{position.column}: " if position is not None else ""
        super().__init__(f"{where}{message}")

    @property
    def line(self) -> int | None:
        return None if self.position is None else self.position.line

    @property
    def column(self) -> int | None:
        return None if self.position is None else self.position.column


class UnknownTag(EdnError):
    """A `#tag` this reader has no reader for; `tag` is its name (without `#`)."""

    def __init__(self, tag: str, position: Position | None) -> None:
        self.tag = tag
        known = ", ".join(f"#{name}" for name in KNOWN_TAGS)
        super().__init__(f"unknown tag #{tag} (the tags read are {known})", position)


class NotOneValue(EdnError):
    """The text holds `count` top-level values where one was expected; `blank` when it holds
    nothing at all (no comment, no discarded form). The position is the second value's."""

    def __init__(self, count: int, blank: bool, position: Position | None) -> None:
        self.count = count
        self.blank = blank
        if blank:
            message = "no value: the text is empty"
        elif not count:
            message = "no value: the text holds only comments or discarded forms (#_)"
        else:
            message = f"the text holds {count} top-level values; expected exactly one"
        super().__init__(message, position)


def position_in(text: str, offset: int) -> Position:
    """The line and column of `offset` in `text` (clamped to the text)."""
    offset = min(max(offset, 0), len(text))
    line_start = text.rfind("\n", 0, offset) + 1
    return Position(offset, text.count("\n", 0, offset) + 1, offset - line_start + 1)


# --- reading --------------------------------------------------------------------------------------


def read(text: str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """The one value `text` holds (metadata peeled off the top). Raises EdnError only."""
    return unwrap(read_document(text, max_depth=max_depth, one=True).forms[0])


def read_document(text: str, *, max_depth: int = DEFAULT_MAX_DEPTH, one: bool = False) -> Document:
    """Every top-level form of `text`, with a way back to where their parts are written.

    With `one`, a text that does not hold exactly one form raises `NotOneValue` (before any
    problem inside the forms, such as a duplicate key: the count is the first thing wrong).
    Raises EdnError only, whatever the text.
    """
    document = Document(text, max_depth=max_depth)
    if one and len(document.forms) != 1:
        blank = not document.text.strip(_BLANKS)
        raise NotOneValue(len(document.forms), blank, document.form_position(1))
    document._check_duplicate_keys()
    return document


# --- the raw text ---------------------------------------------------------------------------------

# Everything the bracket scanner must see or skip, in the order the EDN lexer reads it: strings
# (possibly unterminated), comments, character literals (`\{` is not a bracket), brackets, CR.
_SCAN_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"?|;[^\n]*|\\.|[\[\](){}]|\r', re.DOTALL)
_PAIRS: Final = {"[": "]", "(": ")", "{": "}"}
_STRING_RE: Final = re.compile(r'"([^"\\]*(\\.[^"\\]*)*)"')  # edn_lex's t_STRING
_ILLEGAL_RE: Final = re.compile(r"Illegal character '(.)' with lexpos (\d+)", re.DOTALL)
_UNKNOWN_TAG_RE: Final = re.compile(r"handle tag ImmutableDict\((.*)\)$", re.DOTALL)
_START_TOKENS: Final = frozenset({"VECTOR_START", "LIST_START", "MAP_START", "SET_START"})
_END_TOKENS: Final = frozenset({"VECTOR_END", "LIST_END", "MAP_OR_SET_END"})
_PREFIX_TOKENS: Final = frozenset({"TAG", "MAP_NAMESPACE_TAG"})
_BLANKS: Final = " \t\n,"


@attrs.frozen
class _Token:
    type: str
    value: Any
    pos: int


@attrs.frozen
class _Scan:
    text: str  # CRs outside strings and a leading BOM blanked out: offsets unchanged
    unclosed: tuple[tuple[str, int], ...]  # (bracket, offset), outermost first


def _scan(text: str, max_depth: int) -> _Scan:
    """One pass over the raw text that the PLY parser cannot do for us.

    edn_format's lexer rejects CR (Windows line ends) and a BOM; it recurses nowhere, but deep
    nesting would recurse in the caller's conversion and hashing; and its errors carry no
    places. The scanner blanks CR/BOM, enforces `max_depth` before parsing, and keeps bracket
    positions for messages.
    """
    blank: list[int] = [0] if text.startswith("\ufeff") else []
    stack: list[tuple[str, int]] = []
    for match in _SCAN_RE.finditer(text):
        char = match.group()
        pos = match.start()
        if char in _PAIRS:
            stack.append((char, pos))
            if len(stack) > max_depth:
                raise EdnError(
                    f"collections are nested deeper than {max_depth} levels", position_in(text, pos)
                )
        elif char in ")]}":
            if stack:  # a mismatched closer is the parser's to report; depth is all we track
                stack.pop()
        elif char == "\r":
            blank.append(pos)
    if blank:
        chars = list(text)
        for pos in blank:
            chars[pos] = " "
        text = "".join(chars)
    return _Scan(text, tuple(stack))


def _lex(text: str) -> list[_Token]:
    """edn_format's own tokens (with offsets) of text that is known to lex."""
    lexer = edn_lex.lex(text)
    tokens = []
    while (token := lexer.token()) is not None:
        tokens.append(_Token(token.type, token.value, token.lexpos))
    return tokens


class Document:
    """A read EDN text: its top-level forms, and where their parts are written.

    `text` is the text as read (CR and a BOM blanked out), so its offsets are the original's.
    """

    def __init__(self, text: str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        """Read `text`; raises EdnError only. `read_document` adds the duplicate-key check."""
        scan = _scan(text, max_depth)
        self.text = scan.text
        try:
            forms = edn_format.loads_all(self.text)
        except Exception as exc:  # noqa: BLE001 - PLY and edn_format's actions raise anything on junk
            raise self._syntax_error(exc, scan) from None
        self.forms: list[Any] = list(forms)

    def position_at(self, offset: int) -> Position:
        return position_in(self.text, offset)

    def form_position(self, index: int) -> Position | None:
        """Where top-level form `index` starts (best effort: None when it cannot be found)."""
        try:
            spans = self._spans(0, len(self.tokens))
            return self.position_at(self.tokens[spans[index][0]].pos)
        except Exception:  # noqa: BLE001 - locating is best effort
            return None

    def locate(self, path: Path, form: int = 0) -> Position | None:
        """Best effort: where the deepest key (or element) of `path` in top-level form `form` is
        written; the form itself for an empty path; None when not even the form can be found.

        A str step matches a map key written as a keyword, a symbol or a string of that name
        (the last one, as in edn_format's maps); an int step an element of a vector or list. A
        set's elements have no order to step into.
        """
        try:
            spans = self._spans(0, len(self.tokens))
            if len(spans) <= form:
                return None
            core = self._core(spans[form][0])
            offset = self.tokens[core].pos
            for step in path:
                if self.tokens[core].type not in _START_TOKENS:
                    break
                children = self._spans(core + 1, self._matches[core])
                if isinstance(step, int):
                    if self.tokens[core].type == "SET_START" or step >= len(children):
                        break
                    core = self._core(children[step][0])
                    offset = self.tokens[core].pos
                    continue
                if self.tokens[core].type != "MAP_START":
                    break
                value_core = None
                for key_span, value_span in zip(children[::2], children[1::2], strict=False):
                    key = self.tokens[self._core(key_span[0])]
                    if _token_names(key, step):  # last match wins, as in edn_format's maps
                        offset = key.pos
                        value_core = self._core(value_span[0])
                if value_core is None:
                    break
                core = value_core
            return self.position_at(offset)
        except Exception:  # noqa: BLE001 - locating is best effort; a wrong guess must not mask the error
            return None

    # -- errors --

    def _check_duplicate_keys(self) -> None:
        """Reject `{:a 1 :a 2}`: edn_format keeps the last silently, which would hide one of
        the two. Only literal keys (keywords, strings, numbers, ...) compare."""
        try:
            duplicate = self._duplicate_key()
        except Exception:  # noqa: BLE001 - a best-effort check on parsed text must not crash
            return
        if duplicate is not None:
            raise EdnError(
                f"the map has the key {_token_text(duplicate)} twice",
                self.position_at(duplicate.pos),
            )

    def _duplicate_key(self) -> _Token | None:
        for index, token in enumerate(self.tokens):
            if token.type != "MAP_START" or index not in self._matches:
                continue
            if index and self.tokens[index - 1].type == "MAP_NAMESPACE_TAG":
                continue  # #:ns{...} rewrites its keys; rare enough to leave alone
            seen: set[tuple[str, str]] = set()
            for key_span in self._spans(index + 1, self._matches[index])[::2]:
                key = self.tokens[self._core(key_span[0])]
                if key.type in _START_TOKENS:
                    continue
                identity = (key.type, _token_text(key))
                if identity in seen:
                    return key
                seen.add(identity)
        return None

    def _syntax_error(self, exc: Exception, scan: _Scan) -> EdnError:
        """What went wrong, in words, where it can be seen."""
        if isinstance(exc, NotImplementedError) and (tag := _UNKNOWN_TAG_RE.search(str(exc))):
            name = tag.group(1)
            found = self._tag_token(lambda token: token.value == name)
            return UnknownTag(name, None if found is None else self.position_at(found.pos))
        message, offset = self._explain(exc, scan)
        return EdnError(message, None if offset is None else self.position_at(offset))

    def _explain(self, exc: Exception, scan: _Scan) -> tuple[str, int | None]:
        """What went wrong, in words, and the offset where it can be seen."""
        token = exc.args[0] if exc.args else None
        lexpos = getattr(token, "lexpos", None)
        if isinstance(exc, EDNDecodeError) and isinstance(lexpos, int):  # the parser's bad token
            return f"EDN syntax error: unexpected {str(getattr(token, 'value', ''))!r}", lexpos
        text = str(exc)
        if isinstance(exc, EDNDecodeError):
            if illegal := _ILLEGAL_RE.search(text):
                char, pos = illegal.group(1), int(illegal.group(2))
                if char == '"':
                    return "EDN syntax error: unterminated string (no closing '\"')", pos
                return f"EDN syntax error: illegal character {char!r}", pos
            if text == "EOF Reached":
                if scan.unclosed:
                    opener, pos = scan.unclosed[-1]
                    return (
                        f"EDN syntax error: unclosed {opener!r} (no matching {_PAIRS[opener]!r})",
                        pos,
                    )
                end = len(self.text.rstrip(_BLANKS))
                return (
                    "EDN syntax error: unexpected end of file (a tag, #_ or ^ without its value?)",
                    end - 1,
                )
            if text.startswith("Even number"):
                return (
                    "EDN syntax error: a map has an odd number of forms (a key without its value?)",
                    self._odd_map(),
                )
        bad_literal = self._bad_literal(exc)
        if bad_literal is not None:
            literal, pos = bad_literal
            return f"EDN syntax error: invalid literal {literal!r}: {_short(exc)}", pos
        bad_tag = self._tag_token(self._tagged_value_fails)
        if bad_tag is not None:
            return f"invalid #{bad_tag.value} value: {_short(exc)}", bad_tag.pos
        return f"EDN syntax error: {_short(exc)}", None

    def _bad_literal(self, failure: Exception) -> tuple[str, int] | None:
        """The token whose lexer action raised `failure` (1/0, a 5000-digit integer, ...).

        Lexing again must fail the same way; a different failure belongs to a later token
        that the parser never reached, so it says nothing about this one.
        """
        lexer = edn_lex.lex(self.text)
        try:
            while lexer.token() is not None:
                pass
        except Exception as exc:  # noqa: BLE001 - same foreign errors as the parse that just failed
            match = getattr(lexer, "lexmatch", None)
            if type(exc) is type(failure) and str(exc) == str(failure) and match is not None:
                return str(match.group())[:40], int(match.start())
        return None

    def _tag_token(self, accept: Callable[[_Token], bool]) -> _Token | None:
        """The first tag token that `accept`s, if the text lexes at all (best effort)."""
        try:
            return next((t for t in self.tokens if t.type == "TAG" and accept(t)), None)
        except Exception:  # noqa: BLE001 - the text may not even lex; then there is no answer
            return None

    def _tagged_value_fails(self, tag: _Token) -> bool:
        index = self.tokens.index(tag)
        if index + 1 >= len(self.tokens):
            return True
        following = self.tokens[index + 1]
        string = _STRING_RE.match(self.text, following.pos)
        if following.type != "STRING" or string is None:
            return True
        try:
            edn_format.loads_all(self.text[tag.pos : string.end()])
        except Exception:  # noqa: BLE001 - this is the probe: any failure marks the culprit
            return True
        return False

    def _odd_map(self) -> int | None:
        """The offset of the map the parser choked on: the first, in closing order (the order
        in which the parser reduces maps), that holds an odd number of forms."""
        try:
            maps = sorted(
                (end, start)
                for start, end in self._matches.items()
                if self.tokens[start].type == "MAP_START"
            )
            for end, start in maps:
                if len(self._spans(start + 1, end)) % 2:
                    return self.tokens[start].pos
        except Exception:  # noqa: BLE001 - locating is best effort; the text may not even lex
            return None
        return None

    # -- tokens --

    @functools.cached_property
    def tokens(self) -> list[_Token]:
        return _lex(self.text)

    @functools.cached_property
    def _matches(self) -> dict[int, int]:
        """Token index of each collection start → token index of its end."""
        matches: dict[int, int] = {}
        stack: list[int] = []
        for index, token in enumerate(self.tokens):
            if token.type in _START_TOKENS:
                stack.append(index)
            elif token.type in _END_TOKENS and stack:
                matches[stack.pop()] = index
        return matches

    def _form_end(self, index: int) -> int:
        """Token index just past the form that starts at `index` (iterative: no recursion)."""
        tokens, needed = self.tokens, 1
        while needed and index < len(tokens):
            kind = tokens[index].type
            if kind in ("DISCARD_TAG", "CARET"):  # `#_ x` and `^meta` each need one more form
                needed += 1
            elif kind in _START_TOKENS:
                index = self._matches.get(index, len(tokens) - 1)
                needed -= 1
            elif kind not in _PREFIX_TOKENS:
                needed -= 1
            index += 1
        return index

    def _spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(first, past-last) token indexes of the forms in [start, stop), discards skipped."""
        spans, index = [], start
        while index < stop:
            if self.tokens[index].type == "DISCARD_TAG":
                index = self._form_end(index + 1)
                continue
            end = self._form_end(index)
            spans.append((index, end))
            index = end
        return spans

    def _core(self, index: int) -> int:
        """The index of a form's own token, past tags and ^metadata."""
        while index < len(self.tokens) and self.tokens[index].type in (*_PREFIX_TOKENS, "CARET"):
            index = self._form_end(index + 1) if self.tokens[index].type == "CARET" else index + 1
        return index


def _token_text(token: _Token) -> str:
    value = token.value
    if isinstance(value, str):
        return json.dumps(value) if token.type == "STRING" else str(value)
    return str(value) if isinstance(value, (Keyword, Symbol)) else repr(value)


def _token_names(token: _Token, key: str) -> bool:
    if token.type in ("KEYWORD", "SYMBOL"):
        return bool(token.value.name == key)
    return token.type == "STRING" and token.value == key


# --- values ---------------------------------------------------------------------------------------


def unwrap(value: Any) -> Any:
    """`value` without its ^metadata."""
    while isinstance(value, MetadataValue):  # ^meta chains can be long: no recursion
        value = value.value
    return value


def show(value: Any) -> str:
    """A short EDN rendering of a value for messages."""
    try:
        text = _dumps(value)
    except Exception:  # noqa: BLE001 - dumps fails on some parsed values; repr is good enough
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dumps(value: Any) -> str:
    if isinstance(value, Set):
        # A set's iteration order follows the process's string hash seed: sorted, the same
        # file gets the same message from every run (`condo validate`, /v1/state's spec_error).
        return "#{" + " ".join(sorted(_dumps(item) for item in value)) + "}"
    return str(edn_format.dumps(value))


def describe(value: Any) -> str:
    """What kind of EDN value `value` is, and a short rendering: `a keyword :x`, `nil`."""
    value = unwrap(value)
    words = _kind_words(value)
    if words is None:
        return kind(value)
    return f"{words} {show(value)}"


def kind(value: Any) -> str:
    """What kind of EDN value `value` is, without the value (`a map`, `nil`): for the values
    that must never be shown (a spec's Env and labels)."""
    value = unwrap(value)
    if value is None:
        return "nil"
    return _kind_words(value) or type(value).__name__


def _kind_words(value: Any) -> str | None:
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (str, "a string"),
        ((int, float, decimal.Decimal, fractions.Fraction), "a number"),
        (Keyword, "a keyword"),
        (Symbol, "a symbol"),
        (Mapping, "a map"),
        (Set, "a set"),
        (tuple, "a list"),
        (Sequence, "a vector"),
    ]
    for type_, words in kinds:
        if isinstance(value, type_):
            return words
    return None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
