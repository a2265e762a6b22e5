"""condo.consul's pure parts and its HTTP edge: key layout, value encoding, endpoint parsing, and
the mapping of Consul's answers and httpx's failures into ConsulError (scripted with
httpx.MockTransport: exact statuses and bodies as the 1.8.7 agent gives them).
The real agent is exercised in tests/integration/test_consul_*.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import structlog
import trio
from hypothesis import given
from hypothesis import strategies as st

import condo
from condo.config import Config
from condo.consul import Acquire, ConsulClient, KeyLayout, decode_value, encode_value
from condo.consul.client import SessionId, open_consul_client, parse_endpoint
from condo.consul.layout import OBJECT_FIELDS, ForeignValue, check_name
from condo.errors import ConfigError, ConsulError
from condo.run import run_condo

SECRET = "s3cr3t-consul-token"

# --- key layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_prefix", "normal"),
    [("condo", "condo"), ("/condo/", "condo"), (" team/condo ", "team/condo"), ("a/b/c", "a/b/c")],
)
def test_prefix_is_normalised(given_prefix: str, normal: str) -> None:
    layout = KeyLayout.of(given_prefix)
    assert layout.prefix == normal
    assert layout.folder == f"{normal}/"
    assert layout.key("web", "h1") == f"{normal}/web/h1"


@pytest.mark.parametrize("bad", ["", "/", "  ", "a//b", "a/../b", "./a"])
def test_prefix_that_names_no_folder_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="--consul-prefix"):
        KeyLayout.of(bad)


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("condo/web/h1", ("web", "h1")),
        ("condo/a b%c?d/host.example", ("a b%c?d", "host.example")),
        ("condo/web", None),  # too short
        ("condo/web/h1/extra", None),  # too deep
        ("condo//h1", None),  # empty service
        ("condo/web/", None),  # empty host
        ("condo2/web/h1", None),  # another prefix that merely starts alike
        ("other/web/h1", None),
    ],
)
def test_keys_parse_back_or_are_foreign(key: str, parsed: tuple[str, str] | None) -> None:
    assert KeyLayout.of("condo").parse(key) == parsed


@pytest.mark.parametrize("bad", ["", "a/b", "/"])
def test_host_names_must_be_one_key_segment(bad: str) -> None:
    with pytest.raises(ConfigError):
        check_name("--host", bad)


# --- values --------------------------------------------------------------------------------------

segment = st.text(min_size=1, max_size=30).filter(lambda s: "/" not in s)
json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=20)


@given(
    service=segment,
    host=segment,
    # Not a field readers read into (`reverted`...): a leaf there is a foreign value, refused on
    # purpose (tests/test_redteam_red12.py). Hypothesis draws the code's own string literals.
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in OBJECT_FIELDS), json_leaf, max_size=5
    ),
    at=st.floats(min_value=0, max_value=4e9),
)
def test_values_round_trip(service: str, host: str, extra: dict[str, Any], at: float) -> None:
    layout = KeyLayout.of("condo")
    view = {**extra, "state": "Stable", "current": {"image": "x:1"}}
    raw = encode_value(host, service, view, at)
    value = decode_value(layout, layout.key(service, host), raw)
    assert (value.host, value.service, value.at) == (host, service, at)
    assert value.state == view
    assert value.version == condo.__version__


def test_value_document_shape() -> None:
    raw = encode_value("h1", "web", {"state": "Wait"}, 12.5)
    assert json.loads(raw) == {
        "host": "h1",
        "service": "web",
        "state": {"state": "Wait"},
        "version": condo.__version__,
        "at": 12.5,
    }


GOOD = {"host": "h1", "service": "web", "state": {"state": "Stable"}}


@pytest.mark.parametrize(
    ("key", "raw", "reason"),
    [
        ("condo/web/h1", None, "empty value"),
        ("condo/web/h1", b"\xff\xfe", "not JSON"),
        ("condo/web/h1", b"{nope", "not JSON"),
        ("condo/web/h1", b"[1, 2]", "not a JSON object"),
        ("condo/web/h1", json.dumps({**GOOD, "host": 3}).encode(), "no host or service"),
        ("condo/web/h2", json.dumps(GOOD).encode(), "not its own key"),
        ("condo/db/h1", json.dumps(GOOD).encode(), "not its own key"),
        ("condo/web/h1", json.dumps({**GOOD, "state": "Stable"}).encode(), "no service state"),
        ("condo/web/h1", json.dumps({**GOOD, "state": {}}).encode(), "no service state"),
        ("condo/web", json.dumps(GOOD).encode(), "not a <prefix>"),
    ],
)
def test_foreign_values_are_refused(key: str, raw: bytes | None, reason: str) -> None:
    with pytest.raises(ForeignValue, match=reason):
        decode_value(KeyLayout.of("condo"), key, raw)


def test_missing_optional_fields_take_defaults() -> None:
    value = decode_value(KeyLayout.of("condo"), "condo/web/h1", json.dumps(GOOD).encode())
    assert (value.version, value.at) == ("", 0.0)


# --- endpoint ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "base"),
    [
        ("http://127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("http://127.0.0.1:8500/", "http://127.0.0.1:8500"),
        ("https://consul.example:8501", "https://consul.example:8501"),
        ("tcp://localhost:8500", "http://localhost:8500"),  # the original condo's syntax
    ],
)
def test_endpoints(endpoint: str, base: str) -> None:
    assert parse_endpoint(endpoint) == base


@pytest.mark.parametrize("bad", ["127.0.0.1:8500", "unix:///tmp/consul.sock", "http://", "ftp://x"])
def test_bad_endpoints_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="--consul-endpoint"):
        parse_endpoint(bad)


# --- the HTTP edge -------------------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def scripted(handler: Handler, *, token: str | None = None) -> ConsulClient:
    headers = {"X-Consul-Token": token} if token else {}
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(handler), base_url="http://consul", headers=headers
    )
    return ConsulClient(http)


def answer(status: int, body: str = "", headers: dict[str, str] | None = None) -> Handler:
    return lambda request: httpx.Response(status, text=body, headers=headers)


@pytest.mark.parametrize(
    ("status", "body", "transient"),
    [
        (500, "rpc error: No cluster leader", True),
        (503, "", True),
        (429, "rate limited", True),
        (403, "Permission denied", False),
        (400, "Request decode failed", False),
    ],
)
async def test_error_statuses_map_once(status: int, body: str, transient: bool) -> None:
    with trio.fail_after(10):
        client = scripted(answer(status, body))
        with pytest.raises(ConsulError) as caught:
            await client.delete("condo/web/h1")
        assert caught.value.status == status
        assert caught.value.transient is transient
        assert "DELETE /v1/kv/condo/web/h1" in str(caught.value)
        if status == 403:
            assert "--consul-token" in str(caught.value)


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
async def test_no_answer_is_transient_and_marks_unreachable(
    failure: httpx.HTTPError, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        calls = 0

        def handler(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise failure
            return httpx.Response(200, text="true")

        client = scripted(handler)
        marks = [client.unreachable_since]
        with pytest.raises(ConsulError) as caught:
            await client.renew_session(SessionId("abc"))
        assert caught.value.transient and caught.value.status is None
        marks.append(client.unreachable_since)
        assert await client.renew_session(SessionId("abc")) is True
        marks.append(client.unreachable_since)
        # Set by the call that got no answer, cleared by the next one that did.
        assert marks == [None, trio.current_time(), None]


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, "true", Acquire.DONE),
        (200, "false", Acquire.REFUSED),
        (500, 'invalid session "0b7a4c6e-1111-2222-3333-444455556666"', Acquire.NO_SESSION),
    ],
)
async def test_acquire_outcomes_are_answers(status: int, body: str, outcome: Acquire) -> None:
    with trio.fail_after(10):
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(status, text=body)

        client = scripted(handler)
        assert await client.acquire("condo/a b/h1", b'{"x":1}', SessionId("sid-1")) is outcome
        (request,) = seen
        assert request.method == "PUT"
        assert request.url.raw_path == b"/v1/kv/condo/a%20b/h1?acquire=sid-1"
        assert request.content == b'{"x":1}'


async def test_acquire_with_another_server_error_is_an_error() -> None:
    with trio.fail_after(10):
        client = scripted(answer(500, "rpc error: leadership lost"))
        with pytest.raises(ConsulError, match="leadership lost") as caught:
            await client.acquire("condo/web/h1", b"{}", SessionId("s"))
        assert caught.value.transient


async def test_renew_404_means_the_session_is_gone() -> None:
    with trio.fail_after(10):
        client = scripted(answer(404, "Session id 'abc' not found"))
        assert await client.renew_session(SessionId("abc")) is False


async def test_session_create_sends_ttl_delete_and_no_lock_delay() -> None:
    with trio.fail_after(10):
        bodies: list[Any] = []

        def handler(request: httpx.Request) -> httpx.Response:
            bodies.append(json.loads(request.content))
            return httpx.Response(200, json={"ID": "new-session"})

        client = scripted(handler)
        assert await client.create_session("condo:condo:h1", 10.0) == "new-session"
        assert bodies == [
            {"Name": "condo:condo:h1", "TTL": "10s", "Behavior": "delete", "LockDelay": "0s"}
        ]


async def test_an_answer_that_is_not_json_is_a_transient_error() -> None:
    with trio.fail_after(10):
        client = scripted(answer(200, "<html>proxy</html>"))
        with pytest.raises(ConsulError, match="not JSON") as caught:
            await client.create_session("x", 10)
        assert caught.value.transient


async def test_empty_prefix_is_an_empty_listing_with_its_index() -> None:
    with trio.fail_after(10):
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(404, headers={"X-Consul-Index": "109"})

        client = scripted(handler)
        listing = await client.read_prefix("condo/", index=7)
        assert (listing.index, listing.entries) == (109, ())
        assert seen[0].url.params["index"] == "7"
        assert seen[0].url.params["wait"] == "30s"
        assert seen[0].url.params["recurse"] == "true"


async def test_index_zero_never_blocks() -> None:
    with trio.fail_after(10):
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(404, headers={"X-Consul-Index": "5"})

        await scripted(handler).read_prefix("condo/")
        assert "index" not in seen[0].url.params and "wait" not in seen[0].url.params


async def test_listing_decodes_values_and_holders() -> None:
    with trio.fail_after(10):
        body = [
            {"Key": "condo/web/h1", "Value": "eyJ4IjoxfQ==", "Session": "s1", "ModifyIndex": 108},
            {"Key": "condo/empty/h1", "Value": None, "ModifyIndex": 9},
            {"Key": "condo/bad/h1", "Value": "***", "Session": "", "ModifyIndex": 10},
            {"NotAKey": True},
        ]
        client = scripted(
            lambda request: httpx.Response(200, json=body, headers={"X-Consul-Index": "108"})
        )
        listing = await client.read_prefix("condo/")
        assert listing.index == 108
        assert [(e.key, e.value, e.session, e.modify_index) for e in listing.entries] == [
            ("condo/web/h1", b'{"x":1}', "s1", 108),
            ("condo/empty/h1", None, None, 9),
            ("condo/bad/h1", None, None, 10),
        ]


async def test_token_goes_in_the_header_and_nowhere_else() -> None:
    with trio.fail_after(10):
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            raise httpx.ConnectError("[Errno 111] Connection refused")

        client = scripted(handler, token=SECRET)
        with structlog.testing.capture_logs() as logs, pytest.raises(ConsulError) as caught:
            await client.destroy_session(SessionId("s"))
        assert seen[0].headers["X-Consul-Token"] == SECRET
        assert SECRET not in str(seen[0].url)
        assert SECRET not in str(caught.value)
        assert SECRET not in repr(caught.value)
        assert SECRET not in repr(client)
        assert logs and SECRET not in repr(logs)


async def test_open_client_sends_the_token_to_a_real_socket() -> None:
    with trio.fail_after(10):
        # Nothing listens on port 9 (discard): a real refused connection, mapped like any other.
        async with open_consul_client("http://127.0.0.1:9", token=SECRET) as client:
            with pytest.raises(ConsulError) as caught:
                await client.list_sessions()
        assert caught.value.transient and caught.value.status is None
        assert "ConnectError" in str(caught.value)
        assert SECRET not in str(caught.value) and SECRET not in repr(client)


async def test_open_client_without_token_sends_no_header() -> None:
    with trio.fail_after(10):
        async with open_consul_client("http://127.0.0.1:9") as client:
            assert "X-Consul-Token" not in client._http.headers


# --- settings checked before anything starts -----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"consul_prefix": "/"}, "--consul-prefix"),
        ({"consul_endpoint": "ftp://consul"}, "--consul-endpoint"),
        ({"host": "rack/7"}, "--host"),
    ],
)
async def test_run_condo_refuses_bad_consul_settings_as_a_plain_config_error(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with trio.fail_after(10):
        config = Config(
            prefixes=(tmp_path,), state_path=tmp_path / "state.json", host="h1", expose="consul"
        )
        with trio.fail_after(10), pytest.raises(ConfigError, match=message):
            # Not wrapped in an ExceptionGroup: the CLI turns it into exit code 2.
            await run_condo(attrs.evolve(config, **changes))
