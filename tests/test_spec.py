"""condo.spec: table tests for every rule, conversion, identity, and hypothesis properties.

The properties carry the module's central promise: no input makes parse_spec or
parse_self_spec raise anything but SpecError, and valid specs survive to_json/from_json.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from condo.errors import SpecError
from condo.spec import (
    DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    MAX_SPEC_BYTES,
    DeployStrategy,
    SelfSpec,
    ServiceSpec,
    check_service_name,
    parse_self_spec,
    parse_spec,
)

FILE = "svc.edn"
# CONDO_FUZZ_EXAMPLES raises the count for the long run (README, "Reliability").
PROPERTY = settings(
    max_examples=int(os.environ.get("CONDO_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def parse(text: str) -> ServiceSpec:
    return parse_spec(text.encode(), FILE)


def error_of(text: str | bytes, *, self_spec: bool = False) -> SpecError:
    data = text.encode() if isinstance(text, str) else text
    parser = parse_self_spec if self_spec else parse_spec
    with pytest.raises(SpecError) as caught:
        parser(data, "self.edn" if self_spec else FILE)
    return caught.value


# --- the table ------------------------------------------------------------------------------------

GOOD: list[tuple[str, str, dict[str, Any]]] = [
    ("minimal", '{:spec {:Image "app:1"}}', {"container": {"Image": "app:1"}}),
    (
        "all options",
        '{:spec {:Image "app:1"} :deploy [:After 5] :health-timeout 20 :stop-timeout 2.5'
        " :stable-after 3 :pull :never :on-failure :revert :probation 30}",
        {
            "deploy": DeployStrategy("After", 5.0),
            "health_timeout": 20.0,
            "stop_timeout": 2.5,
            "stable_after": 3.0,
            "pull": "never",
            "on_failure": "revert",
            "probation": 30.0,
        },
    ),
    ("on failure retry", '{:spec {:Image "a"} :on-failure :retry}', {"on_failure": "retry"}),
    ("probation float", '{:spec {:Image "a"} :probation 2.5}', {"probation": 2.5}),
    (
        "deploy before",
        '{:spec {:Image "a"} :deploy [:Before]}',
        {"deploy": DeployStrategy("Before")},
    ),
    (
        "deploy after 0",
        '{:spec {:Image "a"} :deploy [:After 0]}',
        {"deploy": DeployStrategy("After", 0)},
    ),
    (
        "deploy after float",
        '{:spec {:Image "a"} :deploy [:After 0.5]}',
        {"deploy": DeployStrategy("After", 0.5)},
    ),
    (
        "nil means default",
        '{:spec {:Image "a"} :deploy nil :health-timeout nil :stop-timeout nil :stable-after nil'
        " :pull nil :on-failure nil :probation nil}",
        {
            "deploy": DeployStrategy("Before"),
            "health_timeout": DEFAULT_HEALTH_TIMEOUT,
            "stop_timeout": DEFAULT_STOP_TIMEOUT,
            "stable_after": 0.0,
            "pull": None,
            "on_failure": "retry",
            "probation": 0.0,
        },
    ),
    (
        "fixed name",
        '{:spec {:Image "a" :Name "web-1"}}',
        {"fixed_name": "web-1", "container": {"Image": "a"}},
    ),
    (
        "nil name",
        '{:spec {:Image "a" :Name nil}}',
        {"fixed_name": None, "container": {"Image": "a"}},
    ),
    (
        "labels",
        '{:spec {:Image "a" :Labels {:app "web" "x.y/z" "1"}}}',
        {"container": {"Image": "a", "Labels": {"app": "web", "x.y/z": "1"}}},
    ),
    (
        "commas and comments",
        '; header\n{:spec, {:Image, "a"}, ; trailing\n}',
        {"container": {"Image": "a"}},
    ),
    (
        "discarded form",
        '#_ {:old 1} {:spec {:Image "a" #_ :Cmd #_ ["x"]}}',
        {"container": {"Image": "a"}},
    ),
    ("windows line ends", '{:spec {:Image "a"}\r\n :pull :always}\r\n', {"pull": "always"}),
    ("utf-8 bom", '\ufeff{:spec {:Image "a"}}', {"container": {"Image": "a"}}),
    (
        "metadata dropped",
        '^{:doc "x"} {:spec ^:private {:Image "a"}}',
        {"container": {"Image": "a"}},
    ),
    (
        "digest image",
        '{:spec {:Image "reg:5000/a@sha256:abc"}}',
        {"container": {"Image": "reg:5000/a@sha256:abc"}},
    ),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in GOOD])
def test_good_specs(text: str, expected: dict[str, Any]) -> None:
    spec = parse(text)
    for attribute, value in expected.items():
        assert getattr(spec, attribute) == value, attribute


# (id, text, message substring, line): each bad input names its problem and where to look.
BAD: list[tuple[str, str | bytes, str, int | None]] = [
    ("empty", "", "empty", None),
    ("whitespace only", " \n\t\n", "empty", None),
    ("comments only", "; nothing\n; here\n", "only comments", None),
    ("discarded only", '#_ {:spec {:Image "a"}}', "only comments or discarded", None),
    ("too large", b" " * (MAX_SPEC_BYTES + 1), "larger than", None),
    ("not utf-8", b'{:spec {:Image "a"}}\n;\xff\xfe', "not UTF-8", 2),
    ("nul byte", b'{:spec\n\n {:Image "a\x00"}}', "NUL", 3),
    ("unclosed map", '{:spec\n  {:Image "a"}', "unclosed '{'", 1),
    ("unclosed vector", '{:spec {:Image "a"}\n :deploy [:After 5\n}', "unexpected '}'", 3),
    ("unclosed nested", '{:spec {:Image "a"\n :Cmd ["x"}', "unexpected '}'", 2),
    ("odd map", '{:spec\n {:Image "a"\n  :Cmd}}', "odd number", 2),
    ("odd top map", '{:spec {:Image "a"}\n :deploy}', "odd number", 1),
    ("illegal char", '{:spec {:Image "a"}\n :x `}', "illegal character '`'", 2),
    ("unterminated string", '{:spec {:Image\n "a}}', "unterminated string", 2),
    ("stray closer", '{:spec {:Image "a"}}}', "unexpected '}'", 1),
    ("unknown tag", '{:spec {:Image "a"}\n :x #foo 1}', "unknown tag #foo", 2),
    ("bad inst", '{:spec {:Image "a"\n :At #inst "nope"}}', "invalid #inst value", 2),
    ("bad ratio", '{:spec {:Image "a"\n\n :x 1/0}}', "invalid literal '1/0'", 3),
    ("huge integer", '{:spec {:Image "a"}\n :x ' + "9" * 5000 + "}", "invalid literal", 2),
    ("two forms", '{:spec {:Image "a"}}\n\n{:spec {:Image "b"}}', "2 top-level forms", 3),
    ("top level vector", '\n[:spec {:Image "a"}]', "top level must be a map", 2),
    ("top level string", '"spec"', "found a string", 1),
    ("missing spec", "{:deploy [:Before]\n :pull :never}", "missing :spec", 1),
    ("spec not a map", '{:deploy [:Before]\n :spec "app:1"}', ":spec must be a map", 2),
    ("missing image", '{:spec\n {:Cmd ["x"]}}', "missing :spec :Image", 1),
    ("image typo", '{:spec\n {:Imag "a"}}', "is :Imag a typo?", 2),
    ("image lowercase", '{:spec {:Cmd []\n :image "a"}}', "write :spec :Image, not :image", 2),
    (
        "image not string",
        '{:spec {:Cmd []\n :Image ["a"]}}',
        ':Image must be a string, found a vector ["a"]',
        2,
    ),
    ("image empty", '{:spec {:Image ""}}', ":Image is empty", 1),
    ("image with space", '{:spec {:Image "app: 1"}}', "contains whitespace", 1),
    ("name not string", '{:spec {:Image "a"\n :Name 1}}', ":Name must be a string", 2),
    ("name invalid", '{:spec {:Image "a"\n :Name "-web"}}', "not a valid Docker container name", 2),
    ("name one char", '{:spec {:Image "a" :Name "w"}}', "not a valid Docker container name", 1),
    (
        "name with slash",
        '{:spec {:Image "a" :Name "/web"}}',
        "not a valid Docker container name",
        1,
    ),
    ("labels not map", '{:spec {:Image "a"\n :Labels ["a=b"]}}', ":Labels must be a map", 2),
    (
        "label value number",
        '{:spec {:Image "a"\n :Labels {:app "x"\n :n 1}}}',
        ":Labels :n must have a string value",
        3,
    ),
    (
        "reserved label",
        '{:spec {:Image "a"\n :Labels {:app "x"\n :condo.service "y"}}}',
        "reserved prefix",
        3,
    ),
    (
        "reserved label string",
        '{:spec {:Image "a" :Labels {"Condo.host" "y"}}}',
        "reserved prefix",
        1,
    ),
    ("env not vector", '{:spec {:Image "a"\n :Env {:A 1}}}', ":Env must be a vector", 2),
    (
        "env item",
        '{:spec {:Image "a"\n :Env ["A=1"\n 2]}}',
        ':Env must hold "KEY=value" strings',
        3,
    ),
    (
        "deploy unknown",
        '{:spec {:Image "a"}\n :deploy [:Sideways]}',
        ":deploy must be [:Before] or [:After n]",
        2,
    ),
    ("deploy keyword", '{:spec {:Image "a"}\n :deploy :Before}', ":deploy must be", 2),
    ("deploy negative", '{:spec {:Image "a"}\n :deploy [:After -1]}', "found [:After -1]", 2),
    ("deploy no delay", '{:spec {:Image "a"}\n :deploy [:After]}', ":deploy must be", 2),
    ("deploy bool delay", '{:spec {:Image "a"}\n :deploy [:After true]}', ":deploy must be", 2),
    ("deploy before extra", '{:spec {:Image "a"}\n :deploy [:Before 1]}', ":deploy must be", 2),
    ("deploy lowercase", '{:spec {:Image "a"}\n :deploy [:after 1]}', ":deploy must be", 2),
    ("health timeout bool", '{:spec {:Image "a"}\n :health-timeout true}', "(a boolean)", 2),
    (
        "health timeout string",
        '{:spec {:Image "a"}\n :health-timeout "10"}',
        ":health-timeout must be a number",
        2,
    ),
    (
        "stop timeout negative",
        '{:spec {:Image "a"}\n\n :stop-timeout -2}',
        ":stop-timeout must be a finite number of seconds >= 0",
        3,
    ),
    ("stop timeout inf", '{:spec {:Image "a"}\n :stop-timeout ##Inf}', ">= 0, found", 2),
    ("stable after nan", '{:spec {:Image "a"}\n :stable-after ##NaN}', ":stable-after", 2),
    (
        "pull unknown",
        '{:spec {:Image "a"}\n :pull :sometimes}',
        ":pull must be one of :always, :missing or :never",
        2,
    ),
    ("pull string", '{:spec {:Image "a"}\n :pull "always"}', ":pull must be one of", 2),
    (
        "on failure unknown",
        '{:spec {:Image "a"}\n :on-failure :rollback}',
        ":on-failure must be :retry or :revert, found :rollback",
        2,
    ),
    ("on failure string", '{:spec {:Image "a"}\n\n :on-failure "revert"}', ":on-failure must", 3),
    (
        "probation negative",
        '{:spec {:Image "a"}\n :probation -1}',
        ":probation must be a finite number of seconds >= 0",
        2,
    ),
    ("probation boolean", '{:spec {:Image "a"}\n :probation true}', "a boolean", 2),
    (
        "unknown key typo",
        '{:spec {:Image "a"}\n :deplyo [:Before]}',
        "unknown key :deplyo (did you mean :deploy?)",
        2,
    ),
    ("unknown key", '{:spec {:Image "a"}\n :replicas 3}', "unknown key :replicas", 2),
    ("namespaced key", '{:spec {:Image "a"}\n :condo/pull :never}', "unknown key :condo/pull", 2),
    ("string top key", '{"spec" {:Image "a"}}', 'the key "spec" must be the keyword :spec', 1),
    ("number top key", '{:spec {:Image "a"} 1 2}', "unknown key 1", 1),
    (
        "duplicate top key",
        '{:spec {:Image "a"}\n :spec {:Image "b"}}',
        "the map has the key :spec twice",
        2,
    ),
    (
        "duplicate inner key",
        '{:spec {:Image "a"\n :Image "b"}}',
        "the map has the key :Image twice",
        2,
    ),
    (
        "keyword and string key",
        '{:spec {:Image "a" :Cmd [] "Cmd" []}}',
        "has the key :Cmd twice",
        1,
    ),
    (
        "non-string inner key",
        '{:spec {:Image "a"\n :Labels {1 "x"}}}',
        "keys must be keywords or strings",
        2,
    ),
    ("infinite inner number", '{:spec {:Image "a"\n :Memory 1e999}}', "not a finite number", 2),
    ("lone surrogate", '{:spec {:Image "a"\n :Cmd ["\\ud800"]}}', "lone surrogate", 2),
    ("too deep", '{:spec {:Image "a"\n :x ' + "[" * 70 + "]" * 70 + "}}", "deeper than 64", 2),
    ("very deep junk", "[" * 100_000, "deeper than 64", 1),
]


@pytest.mark.parametrize(
    ("text", "message", "line"), [pytest.param(t, m, n, id=i) for i, t, m, n in BAD]
)
def test_bad_specs(text: str | bytes, message: str, line: int | None) -> None:
    error = error_of(text)
    assert message in error.message
    assert error.line == line
    assert error.file == FILE
    expected_prefix = FILE if line is None else f"{FILE}:{line}"
    assert str(error) == f"{expected_prefix}: {error.message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{:spec {:Image "a" :Env {"TOKEN" "hunter2"}}}',
            ':Env must be a vector of "KEY=value" strings, found a map',
        ),
        (
            '{:spec {:Image "a" :Env "TOKEN=hunter2"}}',
            ':Env must be a vector of "KEY=value" strings, found a string',
        ),
        (
            '{:spec {:Image "a" :Env [["TOKEN=hunter2"]]}}',
            ':Env must hold "KEY=value" strings, found a vector',
        ),
        (
            '{:spec {:Image "a" :Labels ["token=hunter2"]}}',
            ":Labels must be a map of strings to strings, found a vector",
        ),
        (
            '{:spec {:Image "a" :Labels {"token" ["hunter2"]}}}',
            ":Labels :token must have a string value, found a vector",
        ),
    ],
)
def test_an_env_or_label_error_names_the_kind_of_value_never_the_value(
    text: str, message: str
) -> None:
    # A spec error goes to the API, the feed, Consul and the dashboard; Env values and labels
    # never do (README, Security).
    error = error_of(text)
    assert message in error.message
    assert "hunter2" not in str(error)


def test_metadata_chain_in_a_set_is_a_spec_error() -> None:
    # MetadataValue hashes recursively: a long ^ chain inside a set is a RecursionError inside
    # edn_format, which must come out as a SpecError.
    text = '{:spec {:Image "a" :x #{' + "^:m " * 5000 + "1}}}"
    assert error_of(text).message


# --- conversion -----------------------------------------------------------------------------------


def test_conversion_to_plain_json() -> None:
    spec = parse(
        """
        {:spec {:Image "localhost:5000/app:1"
                :docker/label :ns/value                 ; namespaced keyword key and value
                :Cmd ("sh" "-c" "echo hi")               ; a list
                :Tags #{"b" "a" "c"}                      ; a set, sorted
                :HostConfig {:PortBindings {"80/tcp" [{:HostPort "8000"}]}
                             :Memory 1048576
                             :CpuShares 0.5
                             :Privileged false
                             :Init nil}
                :Chars [\\a \\newline]
                :Sym my-symbol
                :When #inst "2020-01-02T03:04:05Z"
                :Id #uuid "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
                :Big 1N
                :Dec 1.50M}}
        """
    )
    assert spec.container == {
        "Image": "localhost:5000/app:1",
        "docker/label": "ns/value",
        "Cmd": ["sh", "-c", "echo hi"],
        "Tags": ["a", "b", "c"],
        "HostConfig": {
            "PortBindings": {"80/tcp": [{"HostPort": "8000"}]},
            "Memory": 1048576,
            "CpuShares": 0.5,
            "Privileged": False,
            "Init": None,
        },
        "Chars": ["a", "\n"],
        "Sym": "my-symbol",
        "When": "2020-01-02T03:04:05+00:00",
        "Id": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
        "Big": 1,
        "Dec": "1.50",
    }
    # Plain types only: JSON round-trips exactly (no Keyword, Char, ImmutableDict survives).
    assert json.loads(json.dumps(spec.container)) == spec.container
    assert type(spec.container["Chars"][0]) is str


def test_sets_convert_in_a_stable_order() -> None:
    one = parse('{:spec {:Image "a" :x #{{:b 2} {:a 1} [3] "s" 1}}}')
    # Sorted by canonical JSON text: '"s"' < '1' < '[3]' < '{"a":1}' < '{"b":2}'.
    assert one.container["x"] == ["s", 1, [3], {"a": 1}, {"b": 2}]


def test_name_stays_out_of_the_container_body() -> None:
    spec = parse('{:spec {:Image "a" :Name "web.1"}}')
    assert "Name" not in spec.container
    assert spec.fixed_name == "web.1"
    assert spec.to_json()["spec"] == {"Image": "a", "Name": "web.1"}


# --- identity -------------------------------------------------------------------------------------

PLAIN = """{:spec {:Image "app:1" :Env ["A=1" "B=2"] :Labels {:a "1" :b "2"}
         :HostConfig {:Memory 10 :PortBindings {"80/tcp" [{:HostPort "8000"}]}}}
 :deploy [:After 5]}"""
REWRITTEN = """; the same spec, reformatted
{:deploy   [:After 5] ; strategy first
 :spec
 {:HostConfig {:PortBindings {"80/tcp" [{:HostPort "8000"}]}, :Memory 10}
  :Labels {:b "2", :a "1"}
  #_ :Cmd #_ ["ignored"]
  "Env" ["A=1" "B=2"]
  :Image "app:1"}}
"""


def test_equality_is_semantic() -> None:
    one, two = parse(PLAIN), parse(REWRITTEN)
    assert one == two
    assert hash(one) == hash(two)
    assert one.container_hash == two.container_hash
    assert len(one.container_hash) == 64
    assert int(one.container_hash, 16) >= 0


def test_order_of_a_vector_matters() -> None:
    one = parse('{:spec {:Image "a" :Env ["A=1" "B=2"]}}')
    two = parse('{:spec {:Image "a" :Env ["B=2" "A=1"]}}')
    assert one != two
    assert one.container_hash != two.container_hash


def test_int_and_float_differ() -> None:
    # JSON (and Docker) tell 1 from 1.0 and true from 1; so must spec identity.
    one = parse('{:spec {:Image "a" :Memory 1}}')
    assert one != parse('{:spec {:Image "a" :Memory 1.0}}')
    assert ServiceSpec(container={"Image": "a", "x": 1}) != ServiceSpec(
        container={"Image": "a", "x": True}
    )


def test_container_hash_ignores_deploy_and_timeouts() -> None:
    base = parse('{:spec {:Image "a"}}')
    tuned = parse(
        '{:spec {:Image "a"} :deploy [:After 9] :health-timeout 1 :stop-timeout 2'
        " :stable-after 3 :pull :never :on-failure :revert :probation 5}"
    )
    assert base != tuned
    assert base.container_hash == tuned.container_hash


@pytest.mark.parametrize(
    "other",
    [
        '{:spec {:Image "b"}}',
        '{:spec {:Image "a" :Name "fixed"}}',
        '{:spec {:Image "a" :Labels {:x "1"}}}',
        '{:spec {:Image "a" :Cmd ["sh"]}}',
    ],
)
def test_container_hash_follows_the_create_body(other: str) -> None:
    assert parse('{:spec {:Image "a"}}').container_hash != parse(other).container_hash


# --- to_json / from_json --------------------------------------------------------------------------


def test_to_json_shape() -> None:
    spec = parse('{:spec {:Image "a" :Name "ab"} :deploy [:After 5] :pull :missing}')
    assert spec.to_json() == {
        "spec": {"Image": "a", "Name": "ab"},
        "deploy": ["After", 5.0],
        "health_timeout": 10.0,
        "stop_timeout": 10.0,
        "stable_after": 0.0,
        "pull": "missing",
        "on_failure": "retry",
        "probation": 0.0,
    }


@pytest.mark.parametrize(
    "text",
    [
        PLAIN,
        REWRITTEN,
        '{:spec {:Image "a" :Name "ab"} :pull :never :stable-after 2.5}',
        '{:spec {:Image "a"} :on-failure :revert :probation 7.5}',
    ],
)
def test_json_round_trip(text: str) -> None:
    spec = parse(text)
    stored = json.loads(json.dumps(spec.to_json()))
    assert ServiceSpec.from_json(stored) == spec
    assert ServiceSpec.from_json(stored).container_hash == spec.container_hash


def test_to_json_is_a_copy() -> None:
    spec = parse('{:spec {:Image "a" :Env ["A=1"]}}')
    spec.to_json()["spec"]["Env"].append("B=2")
    assert spec.container["Env"] == ["A=1"]


def test_from_json_reads_the_original_condo_state_format() -> None:
    stored = {
        "deploy": ["After", 5],
        "spec": {"Image": "localhost:5000/app:1"},
        "health_timeout": 10,
        "stop_timeout": 10,
    }
    spec = ServiceSpec.from_json(stored)
    assert spec == parse('{:spec {:Image "localhost:5000/app:1"} :deploy [:After 5]}')


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "must be a JSON object"),
        ([], "must be a JSON object"),
        ({}, 'needs a "spec" object'),
        ({"spec": "a"}, 'needs a "spec" object'),
        ({"spec": {}}, "missing :spec :Image"),
        ({"spec": {"Image": 1}}, ":Image must be a string"),
        ({"spec": {"Image": "a", "Name": "/x"}}, "not a valid Docker container name"),
        ({"spec": {"Image": "a", "Labels": {"condo.host": "h"}}}, "reserved prefix"),
        ({"spec": {"Image": "a", "x": float("nan")}}, "not a finite number"),
        ({"spec": {"Image": "a", "x": {1: 2}}}, "non-string key"),
        ({"spec": {"Image": "a", "x": {1, 2}}}, "not JSON"),
        (
            {
                "spec": {
                    "Image": "a",
                    "x": [
                        [
                            [
                                [
                                    [
                                        [
                                            [
                                                [
                                                    [
                                                        [
                                                            [
                                                                [
                                                                    [
                                                                        [
                                                                            [
                                                                                [
                                                                                    [
                                                                                        [
                                                                                            [
                                                                                                [
                                                                                                    [
                                                                                                        [
                                                                                                            [
                                                                                                                [
                                                                                                                    [
                                                                                                                        [
                                                                                                                            [
                                                                                                                                [
                                                                                                                                    [
                                                                                                                                        [
                                                                                                                                            [
                                                                                                                                                [
                                                                                                                                                    [
                                                                                                                                                        [
                                                                                                                                                            [
                                                                                                                                                                [
                                                                                                                                                                    [
                                                                                                                                                                        [
                                                                                                                                                                            [
                                                                                                                                                                                [
                                                                                                                                                                                    [
                                                                                                                                                                                        [
                                                                                                                                                                                            [
                                                                                                                                                                                                [
                                                                                                                                                                                                    [
                                                                                                                                                                                                        [
                                                                                                                                                                                                            [
                                                                                                                                                                                                                [
                                                                                                                                                                                                                    [
                                                                                                                                                                                                                        [
                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                                                    []
                                                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                ]
                                                                                                                                                                                                            ]
                                                                                                                                                                                                        ]
                                                                                                                                                                                                    ]
                                                                                                                                                                                                ]
                                                                                                                                                                                            ]
                                                                                                                                                                                        ]
                                                                                                                                                                                    ]
                                                                                                                                                                                ]
                                                                                                                                                                            ]
                                                                                                                                                                        ]
                                                                                                                                                                    ]
                                                                                                                                                                ]
                                                                                                                                                            ]
                                                                                                                                                        ]
                                                                                                                                                    ]
                                                                                                                                                ]
                                                                                                                                            ]
                                                                                                                                        ]
                                                                                                                                    ]
                                                                                                                                ]
                                                                                                                            ]
                                                                                                                        ]
                                                                                                                    ]
                                                                                                                ]
                                                                                                            ]
                                                                                                        ]
                                                                                                    ]
                                                                                                ]
                                                                                            ]
                                                                                        ]
                                                                                    ]
                                                                                ]
                                                                            ]
                                                                        ]
                                                                    ]
                                                                ]
                                                            ]
                                                        ]
                                                    ]
                                                ]
                                            ]
                                        ]
                                    ]
                                ]
                            ]
                        ]
                    ],
                }
            },
            "deeper than 64",
        ),
        ({"spec": {"Image": "a"}, "deploy": ["Sideways"]}, "deploy must be"),
        ({"spec": {"Image": "a"}, "deploy": "Before"}, "deploy must be"),
        ({"spec": {"Image": "a"}, "health_timeout": "10"}, "health_timeout must be a number"),
        ({"spec": {"Image": "a"}, "stop_timeout": -1}, "stop_timeout must be a finite number"),
        ({"spec": {"Image": "a"}, "stable_after": True}, "a boolean"),
        ({"spec": {"Image": "a"}, "pull": "sometimes"}, "pull must be one of"),
        ({"spec": {"Image": "a"}, "pull": 1}, "pull must be one of"),
        ({"spec": {"Image": "a"}, "on_failure": "undo"}, "on_failure must be :retry or :revert"),
        ({"spec": {"Image": "a"}, "probation": -3}, "probation must be a finite number"),
    ],
)
def test_from_json_rejects_junk(data: object, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        ServiceSpec.from_json(data)
    assert message in caught.value.message
    assert caught.value.file == "<stored spec>"
    assert caught.value.line is None


def test_from_json_ignores_unknown_keys_and_fills_defaults() -> None:
    spec = ServiceSpec.from_json({"spec": {"Image": "a"}, "added_later": 1})
    assert spec == ServiceSpec(container={"Image": "a"})
    assert spec.deploy == DeployStrategy("Before")
    assert spec.health_timeout == DEFAULT_HEALTH_TIMEOUT


# --- effective pull -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "pull", "effective"),
    [
        ("app", None, "always"),
        ("app:latest", None, "always"),
        ("app:1", None, "missing"),
        ("localhost:5000/app", None, "always"),
        ("localhost:5000/app:latest", None, "always"),
        ("localhost:5000/app:1.2", None, "missing"),
        ("localhost:5000/team/app:1", None, "missing"),
        ("app@sha256:0123abcd", None, "missing"),
        ("app:latest@sha256:0123abcd", None, "missing"),
        ("localhost:5000/app@sha256:0123abcd", None, "missing"),
        ("app:1", "always", "always"),
        ("app", "never", "never"),
        ("app:latest", "missing", "missing"),
    ],
)
def test_effective_pull(image: str, pull: str | None, effective: str) -> None:
    pull_part = f" :pull :{pull}" if pull else ""
    spec = parse(f'{{:spec {{:Image "{image}"}}{pull_part}}}')
    assert spec.pull == pull
    assert spec.effective_pull() == effective
    assert spec.image == image


# --- service names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "a", "0", "web.api", "web-1", "my_svc", "A" * 200])
def test_good_service_names(name: str) -> None:
    assert check_service_name(name) is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("A" * 201, "201 characters long"),
        (".web", "cannot prefix"),
        ("-web", "cannot prefix"),
        ("_web", "cannot prefix"),
        ("web api", "cannot prefix"),
        ("web/api", "cannot prefix"),
        ("wéb", "cannot prefix"),
        ("web\n", "cannot prefix"),
    ],
)
def test_bad_service_names(name: str, message: str) -> None:
    problem = check_service_name(name)
    assert problem is not None
    assert message in problem


# --- self.edn -------------------------------------------------------------------------------------


def test_self_spec() -> None:
    one = parse_self_spec(b'{:Image "condo:1" :Name "condo-main" :Env ["A=1"]}', "self.edn")
    two = parse_self_spec(b'; same\n{:Env ["A=1"], :Name "condo-main", :Image "condo:1"}', "x")
    assert one == two
    assert one.container == {"Image": "condo:1", "Env": ["A=1"]}
    assert one.fixed_name == "condo-main"
    assert re.fullmatch(r"[0-9a-f]{16}", one.hash)
    assert one.hash == two.hash
    assert one.hash != parse_self_spec(b'{:Image "condo:2"}', "self.edn").hash
    assert isinstance(one, SelfSpec)


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("", "empty", None),
        ('{:spec\n {:Image "condo:1"}}', "without the :spec wrapper", 1),
        ("[1]", "self.edn must be a map", 1),
        ('{:Cmd ["x"]}', "missing :Image", 1),
        ('{:Image "a"\n :Env "A=1"}', ":Env must be a vector", 2),
        ('{:Image "a"\n :Labels {:condo.self "1"}}', "reserved prefix", 2),
        ('{:Image "a" :Name "x"}', "not a valid Docker container name", 1),
        ('{:Image "a"} {:Image "b"}', "2 top-level forms", 1),
    ],
)
def test_bad_self_specs(text: str, message: str, line: int | None) -> None:
    error = error_of(text, self_spec=True)
    assert message in error.message
    assert error.line == line
    assert error.file == "self.edn"


# --- properties: nothing but SpecError ------------------------------------------------------------


def check_outcome(data: bytes) -> None:
    """Both parsers either succeed or raise a well-formed SpecError; nothing else escapes."""
    lines = data.count(b"\n") + 1
    for parser in (parse_spec, parse_self_spec):
        error = spec_error(parser, data)
        if error is not None:
            assert error.file == "f.edn"
            assert error.message
            assert error.line is None or 1 <= error.line <= lines


def spec_error(parser: Callable[[bytes, str], object], data: bytes) -> SpecError | None:
    try:
        parser(data, "f.edn")
    except SpecError as error:  # the one exception type allowed out; anything else fails the test
        return error
    return None


@PROPERTY
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_spec_errors(data: bytes) -> None:
    check_outcome(data)


@PROPERTY
@given(st.text(max_size=300))
def test_random_text_raises_only_spec_errors(text: str) -> None:
    check_outcome(text.encode("utf-8", "surrogatepass"))


# Fragments that stress every corner of edn_format's lexer, parser and tag actions.
EDN_ATOMS = [
    ":spec",
    ":Image",
    ":Name",
    ":Labels",
    ":Env",
    ":deploy",
    ":Before",
    ":After",
    ":pull",
    ":health-timeout",
    ":stop-timeout",
    ":stable-after",
    ":on-failure",
    ":probation",
    ":revert",
    ":always",
    ":x/y",
    ":a/b/c",
    '"app:1"',
    '"ab"',
    '"condo.x"',
    '"',
    '"\\"',
    '"\\ud800"',
    '"\\N{nope}"',
    '"\\u00e9"',
    "1",
    "-1",
    "0",
    "01",
    "1.5",
    "1e999",
    "-1e999",
    "1N",
    "1.5M",
    "1e5M",
    "1/2",
    "1/0",
    "0x1F",
    "##Inf",
    "##NaN",
    "##-Inf",
    "nil",
    "true",
    "false",
    "sym",
    "@@@",
    ".5",
    "\\a",
    "\\newline",
    "\\u00e9",
    "\\",
    "#",
    "#_",
    "^",
    "^:m",
    "#foo",
    "#inst",
    '#inst "2020-01-01"',
    '#inst "junk"',
    "#inst 1",
    '#uuid "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"',
    '#uuid "x"',
    "#:ns",
    "#:ns{:a 1}",
    ";c\n",
    "\r",
    "\ufeff",
    "`",
    "~",
    "\x00",
    "9" * 5000,
]
OPENERS = ["{", "[", "(", "#{", "#:n{"]
CLOSERS = ["}", "]", ")", ""]
SEPARATORS = [" ", "\n", ",", " ; note\n", "\r\n", "\t", " #_ 1 "]


def edn_ish() -> st.SearchStrategy[str]:
    atoms = st.sampled_from(EDN_ATOMS) | st.text(alphabet=string.printable, max_size=5)
    return st.recursive(
        atoms,
        lambda children: st.builds(
            lambda opener, items, separator, closer: opener + separator.join(items) + closer,
            st.sampled_from(OPENERS),
            st.lists(children, max_size=6),
            st.sampled_from(SEPARATORS),
            st.sampled_from(CLOSERS),
        ),
        max_leaves=30,
    )


@PROPERTY
@given(st.lists(edn_ish(), min_size=1, max_size=3), st.sampled_from(SEPARATORS))
def test_edn_ish_input_raises_only_spec_errors(forms: list[str], separator: str) -> None:
    check_outcome(separator.join(forms).encode("utf-8", "surrogatepass"))


@PROPERTY
@given(edn_ish())
def test_edn_ish_spec_bodies_raise_only_spec_errors(body: str) -> None:
    check_outcome(
        ('{:spec {:Image "a" :x ' + body + "}\n :deploy " + body + "}").encode(
            "utf-8", "surrogatepass"
        )
    )


# --- properties: valid specs round-trip -----------------------------------------------------------

KEYWORD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")
READ_KEYS = {"image", "name", "labels", "env"}

# Text a spec can hold: no lone surrogates (not UTF-8) and no NUL (the file would be binary).
json_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
json_keys = st.text(json_chars, min_size=1, max_size=8).filter(lambda k: k.lower() not in READ_KEYS)
json_text = st.text(json_chars, max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_keys, children, max_size=4)
    ),
    max_leaves=15,
)


def edn_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def edn_key(key: str) -> str:
    return f":{key}" if KEYWORD_NAME.fullmatch(key) else edn_string(key)


def to_edn(value: Any, gap: str) -> str:
    """Render plain JSON as EDN, with `gap` (whitespace, commas, comments) between forms."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return edn_string(value)
    if isinstance(value, list):
        return "[" + gap.join(to_edn(item, gap) for item in value) + "]"
    pairs = (edn_key(key) + gap + to_edn(item, gap) for key, item in value.items())
    return "{" + gap.join(pairs) + "}"


@st.composite
def valid_specs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """(create body with Name, top-level options as EDN text pieces → expected values)."""
    body: dict[str, Any] = draw(st.dictionaries(json_keys, json_values, max_size=5))
    body["Image"] = draw(st.from_regex(r"[a-z0-9]+(/[a-z0-9]+)?(:[a-z0-9.]+)?", fullmatch=True))
    if draw(st.booleans()):
        body["Name"] = draw(st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,20}", fullmatch=True))
    if draw(st.booleans()):
        label_keys = json_keys.filter(lambda key: not key.lower().startswith("condo."))
        body["Labels"] = draw(st.dictionaries(label_keys, json_text, max_size=3))
    if draw(st.booleans()):
        body["Env"] = draw(st.lists(json_text, max_size=3))
    seconds = st.integers(0, 10**6) | st.floats(0, 1e6, allow_nan=False)
    options: dict[str, Any] = {}
    if draw(st.booleans()):
        options["deploy"] = draw(
            st.sampled_from([["Before"]]) | st.tuples(st.just("After"), seconds).map(list)
        )
    for key in ("health-timeout", "stop-timeout", "stable-after", "probation"):
        if draw(st.booleans()):
            options[key] = draw(seconds)
    if draw(st.booleans()):
        options["pull"] = draw(st.sampled_from(["always", "missing", "never"]))
    if draw(st.booleans()):
        options["on-failure"] = draw(st.sampled_from(["retry", "revert"]))
    return body, options


def render(body: dict[str, Any], options: dict[str, Any], gap: str, reverse: bool) -> str:
    pieces = [(":spec", to_edn(body, gap))]
    for key, value in options.items():
        if key == "deploy":
            rendered = "[" + gap.join([f":{value[0]}", *(repr(v) for v in value[1:])]) + "]"
        elif key in ("pull", "on-failure"):
            rendered = f":{value}"
        else:
            rendered = repr(value)
        pieces.append((f":{key}", rendered))
    if reverse:
        pieces.reverse()
    return "{" + gap.join(f"{key}{gap}{value}" for key, value in pieces) + "}"


@PROPERTY
@given(valid_specs(), st.sampled_from(SEPARATORS[:-1]), st.sampled_from(SEPARATORS[:-1]))
def test_valid_specs_round_trip(
    spec_parts: tuple[dict[str, Any], dict[str, Any]], gap: str, other_gap: str
) -> None:
    body, options = spec_parts
    spec = parse(render(body, options, gap, reverse=False))

    expected = dict(body)
    name = expected.pop("Name", None)
    assert spec.container == expected
    assert json.dumps(spec.container, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert spec.fixed_name == name
    deploy = options.get("deploy", ["Before"])
    assert spec.deploy == DeployStrategy(deploy[0], *deploy[1:])
    assert spec.health_timeout == options.get("health-timeout", DEFAULT_HEALTH_TIMEOUT)
    assert spec.stop_timeout == options.get("stop-timeout", DEFAULT_STOP_TIMEOUT)
    assert spec.stable_after == options.get("stable-after", 0.0)
    assert spec.pull == options.get("pull")
    assert spec.on_failure == options.get("on-failure", "retry")
    assert spec.probation == options.get("probation", 0.0)

    # parse → to_json → (real JSON text) → from_json is the identity.
    assert ServiceSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    # Layout and key order do not change the spec or its identity.
    again = parse(render(body, options, other_gap, reverse=True))
    assert again == spec
    assert again.container_hash == spec.container_hash


EDN_EDITS = [*'{}[]()#^\\";:_ \n0@`', "#_", "#inst", "##Inf", "1/0", "\r"]


@PROPERTY
@given(valid_specs(), st.data())
def test_mutated_valid_specs_raise_only_spec_errors(
    spec_parts: tuple[dict[str, Any], dict[str, Any]], data: st.DataObject
) -> None:
    text = render(*spec_parts, gap=" ", reverse=False)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + data.draw(st.sampled_from(EDN_EDITS)) + text[at:]
    check_outcome(text.encode("utf-8", "surrogatepass"))


def test_the_readme_spec_example_is_valid_and_means_what_it_says() -> None:
    """README, "Spec files": the `web.edn` example, as written, is a valid spec."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [example] = [
        b for b in re.findall(r"```clojure\n(.*?)```", readme, re.DOTALL) if "web.edn" in b
    ]
    spec = parse_spec(example.encode(), "web.edn")
    assert spec.image == "registry.example.com/web:1.2"
    assert spec.deploy.strategy == "After" and spec.deploy.delay == 5
    assert spec.health_timeout == 30 and spec.stop_timeout == 10
    # The front door's example is the right way to a fixed port under [:After n]: no warning.
    assert [(p.host, p.port, p.target) for p in spec.proxy] == [("127.0.0.1", 8080, 80)]
    assert spec.warnings == ()
