"""condo.edn: values, the places of their parts, and errors with a line and column.

The reader knows nothing of condo, so these tests speak plain EDN; what a spec makes of it is
tests/test_spec.py's.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import uuid
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condo import edn
from condo.edn import EdnError, Keyword, NotOneValue, Position, Symbol, UnknownTag

NESTED = """\
; a comment
{:outer {:inner "x"
         "quoted" 1}
 :list [10
        #_ 11
        ^:meta {:deep true}]
 sym 2}
"""


def test_nested_maps_read_as_values() -> None:
    assert edn.read(NESTED) == {
        Keyword("outer"): {Keyword("inner"): "x", "quoted": 1},
        Keyword("list"): [10, {Keyword("deep"): True}],
        Symbol("sym"): 2,
    }


@pytest.mark.parametrize(
    ("path", "token", "line", "column"),
    [
        pytest.param((), "{:outer", 2, 1, id="the form itself"),
        pytest.param(("outer",), ":outer", 2, 2, id="keyword key"),
        pytest.param(("outer", "inner"), ":inner", 2, 10, id="nested key"),
        pytest.param(("outer", "quoted"), '"quoted"', 3, 10, id="string key"),
        pytest.param(("list", 0), "10", 4, 9, id="vector element"),
        # #_ 11 is not an element, and ^:meta is not the value: [1] is the map after both.
        pytest.param(("list", 1, "deep"), ":deep", 6, 17, id="past discard and metadata"),
        pytest.param(("sym",), "sym", 7, 2, id="symbol key"),
        pytest.param(("outer", "missing"), ":outer", 2, 2, id="deepest found"),
        pytest.param(("list", 7), ":list", 4, 2, id="index out of range"),
    ],
)
def test_locate_finds_the_deepest_part_of_a_path(
    path: tuple[str | int, ...], token: str, line: int, column: int
) -> None:
    found = edn.read_document(NESTED).locate(path)
    assert found is not None
    assert (found.line, found.column) == (line, column)
    assert NESTED[found.offset :].startswith(token)


def test_locate_takes_the_last_of_repeated_keys_only_across_spellings() -> None:
    # A keyword and a string of the same name are different EDN keys, so both may appear;
    # the value edn_format keeps is the last, and so is the place.
    document = edn.read_document('{:a 1\n "a" 2}')
    assert document.forms == [{Keyword("a"): 1, "a": 2}]
    assert document.locate(("a",)) == Position(7, 2, 2)


def test_sets_have_no_order_to_step_into() -> None:
    document = edn.read_document("{:s\n #{1 2}}")
    assert document.forms == [{Keyword("s"): frozenset({1, 2})}]
    assert document.locate(("s", 0)) == Position(1, 1, 2)  # stays at the set's key


def test_strings_with_escapes() -> None:
    text = r'["a\"b" "back\\slash" "tab\tnew\nline" "\u00e9t\u00e9"]'
    assert edn.read(text) == ['a"b', "back\\slash", "tab\tnew\nline", "été"]


def test_tagged_values_and_other_scalars() -> None:
    text = '[#inst "2020-01-02T03:04:05Z" #uuid "f81d4fae-7dec-11d0-a765-00a0c91e6bf6" 1/2 nil \\c]'
    assert edn.read(text) == [
        datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        uuid.UUID("f81d4fae-7dec-11d0-a765-00a0c91e6bf6"),
        Fraction(1, 2),
        None,
        "c",
    ]


def test_windows_line_ends_and_a_bom_keep_positions() -> None:
    text = '\ufeff{:a 1\r\n :b "x\r\ny"}\r\n'
    document = edn.read_document(text)
    # CR outside strings is a blank; inside a string it is the string's.
    assert document.forms == [{Keyword("a"): 1, Keyword("b"): "x\r\ny"}]
    assert document.locate(("b",)) == Position(9, 2, 2)


def test_read_document_keeps_every_top_level_form() -> None:
    document = edn.read_document("1\n#_ 2\n[3]\n")
    assert document.forms == [1, [3]]
    assert document.form_position(1) == Position(7, 3, 1)
    assert document.form_position(2) is None


@pytest.mark.parametrize(
    ("text", "count", "blank", "line"),
    [
        pytest.param(" ,\n\t", 0, True, None, id="blank"),
        pytest.param("; a comment\n#_ [1]", 0, False, None, id="comments and discards"),
        pytest.param("{:a 1}\n\n[2] 3", 3, False, 3, id="three values"),
        # The count is what is wrong first, before a doubled key inside one of the values.
        pytest.param("{:a 1 :a 2}\n{}", 2, False, 2, id="count before duplicate key"),
    ],
)
def test_one_value_is_expected(text: str, count: int, blank: bool, line: int | None) -> None:
    with pytest.raises(NotOneValue) as caught:
        edn.read_document(text, one=True)
    assert (caught.value.count, caught.value.blank, caught.value.line) == (count, blank, line)


def test_without_one_any_count_reads_and_a_doubled_key_is_the_error() -> None:
    assert edn.read_document("").forms == []
    with pytest.raises(EdnError, match="the map has the key :a twice") as caught:
        edn.read_document("{:a 1 :a 2}\n{}")
    assert caught.value.position == Position(6, 1, 7)


# (id, text, message substring, (line, column) or None)
ERRORS: list[tuple[str, str, str, tuple[int, int] | None]] = [
    ("unclosed", '{:a [1 2\n "x"', "unclosed '['", (1, 5)),
    ("stray closer", "{:a [1 2}", "unexpected '}'", (1, 9)),
    ("odd map", "[{:a 1}\n {:b}]", "odd number of forms", (2, 2)),
    ("unterminated string", '{:a\n  "abc}', "unterminated string", (2, 3)),
    ("illegal character", "[1\n 2 `x]", "illegal character '`'", (2, 4)),
    ("duplicate key", "{:a 1\n :b 2\n :a 3}", "the map has the key :a twice", (3, 2)),
    ("duplicate string key", '{"k" 1 "k" 2}', 'the map has the key "k" twice', (1, 8)),
    ("bad inst", '[1\n #inst "nope"]', "invalid #inst value", (2, 2)),
    ("tag without value", "[1 2]\n#inst", "unexpected end of file", (2, 5)),
    ("two forms", "{:a 1}\n\n[2]", "2 top-level values; expected exactly one", (3, 1)),
    ("nothing", "; nothing\n#_ [1]", "only comments or discarded forms", None),
    ("empty", "", "the text is empty", None),
    ("too deep", "[" * 65 + "]" * 65, "nested deeper than 64 levels", (1, 65)),
]


@pytest.mark.parametrize(
    ("text", "message", "where"), [pytest.param(t, m, w, id=i) for i, t, m, w in ERRORS]
)
def test_errors_say_what_and_where(text: str, message: str, where: tuple[int, int] | None) -> None:
    with pytest.raises(EdnError) as caught:
        edn.read(text)
    assert message in caught.value.message
    assert (
        None if caught.value.line is None else (caught.value.line, caught.value.column)
    ) == where
    if where is not None:
        assert str(caught.value) == f"{where[0]}:{where[1]}: {caught.value.message}"


def test_an_unknown_tag_is_named() -> None:
    with pytest.raises(UnknownTag) as caught:
        edn.read("{:a 1\n :b #foo/bar 2}")
    assert caught.value.tag == "foo/bar"
    assert (caught.value.line, caught.value.column) == (2, 5)
    assert "unknown tag #foo/bar" in caught.value.message


def test_max_depth_is_the_caller_s() -> None:
    assert edn.read("[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(EdnError, match="deeper than 2 levels") as caught:
        edn.read("[[[1]]]", max_depth=2)
    assert caught.value.position == Position(2, 1, 3)


def test_show_and_describe_speak_edn() -> None:
    value = edn.read('{:k [1 "s" sym] :m ^:x {}}')
    assert edn.describe(value[Keyword("k")]) == 'a vector [1 "s" sym]'
    assert edn.describe(Keyword("k")) == "a keyword :k"
    assert edn.describe(None) == "nil"
    assert edn.unwrap(value[Keyword("m")]) == {}
    assert edn.show(list(range(40))).endswith("...") and len(edn.show(list(range(40)))) == 60


EDN_ISH = st.text(alphabet='{}[]()#_^:;"\\ \n\r,abc01./-+eMN@`~\u00e9', max_size=40)


@settings(max_examples=300, deadline=None)
@given(EDN_ISH)
def test_junk_raises_edn_error_only(text: str) -> None:
    error: EdnError | None = None
    document: edn.Document | None = None
    try:
        document = edn.read_document(text)
    except EdnError as exc:  # the one exception type the reader may raise
        error = exc
    if document is not None:
        assert isinstance(document.forms, list)
    else:
        assert error is not None
        assert error.message
        assert error.position is None or 1 <= error.position.line <= text.count("\n") + 1


def test_a_set_is_shown_the_same_whatever_the_hash_seed() -> None:
    # String hashing differs per process (PYTHONHASHSEED): a message must not.
    script = (
        "from condo.spec import parse_spec\n"
        "try:\n"
        "    parse_spec(b'#{u 1 :k \"s\" #{b a} w v}', 'f.edn')\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(6)
    }
    assert seen == {
        "f.edn:1: the top level must be a map like {:spec {:Image ...}}, found a set "
        '#{"s" #{a b} 1 :k u v w}\n'
    }
