"""The pure rules behind the API's exposure: Host and Origin (condo.web.hosts), `--allowed-host`
parsing (condo.config), the descriptor budget (condo.fds) and the slot counter (condo.web.slots).
Table tests; the behaviour over HTTP is in test_web.py and tests/integration/."""

from __future__ import annotations

import subprocess
import sys

import pytest

from condo.config import parse_allowed_host
from condo.errors import ConfigError
from condo.fds import RESERVE, Caps, web_caps
from condo.web.hosts import AllowedHosts, same_origin, split_authority
from condo.web.slots import Slots


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:4280", ("localhost", 4280)),
        ("[::1]", ("::1", None)),
        ("[::1]:80", ("::1", 80)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("::1", None),  # IPv6 needs brackets in a Host
        ("[::1", None),
        ("[::1]x", None),
        ("[]:80", None),
        (":80", None),
        ("host:", None),
        ("host:http", None),
        ("host:99999", None),
        ("host:\uff18\uff10", None),  # non-ASCII digits
        ("", None),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int | None] | None) -> None:
    assert split_authority(authority) == expected


def test_allowed_hosts_are_loopback_the_bind_names_and_extras() -> None:
    assert AllowedHosts.of().names == {"localhost", "127.0.0.1", "::1"}
    # Wildcard binds are not names anyone connects to.
    assert AllowedHosts.of(("0.0.0.0", "::", "")).names == {"localhost", "127.0.0.1", "::1"}
    allowed = AllowedHosts.of(("10.0.0.5", "Condo-Box"), ("ci.example",))
    assert allowed.names == {"localhost", "127.0.0.1", "::1", "10.0.0.5", "condo-box", "ci.example"}


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (None, True),  # HTTP/1.0 without Host: not a browser
        ("localhost", True),
        ("127.0.0.1:4280", True),
        ("[::1]:4280", True),
        ("10.0.0.5:80", True),
        ("ci.example:443", True),
        ("CI.EXAMPLE", True),
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("127.0.0.2", True),  # an IP address written out: no name to rebind
        ("172.17.0.2:80", True),  # condo's container address, from another container
        ("[fd00::2]:80", True),
        ("127.1", False),  # shorthand, hex and plain integers are names to a browser
        ("0x7f.1", False),
        ("2130706433", False),
        ("ci.example.", False),
        ("", False),
        ("localhost:bad", False),
    ],
)
def test_allows(host: str | None, allowed: bool) -> None:
    assert AllowedHosts.of(("10.0.0.5",), ("ci.example",)).allows(host) is allowed


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        (None, "localhost:4280", True),
        (None, None, True),
        ("http://localhost:4280", "localhost:4280", True),
        ("http://LOCALHOST:4280/", "localhost:4280", True),
        ("https://condo.example", "condo.example", True),
        ("https://condo.example:443", "condo.example", True),
        ("http://condo.example", "condo.example:80", True),
        ("http://[::1]:4280", "[::1]:4280", True),
        ("http://localhost:4281", "localhost:4280", False),
        ("http://localhost", "localhost:4280", False),
        ("https://localhost", "localhost:80", False),
        ("http://evil.example:4280", "localhost:4280", False),
        ("null", "localhost:4280", False),
        ("file://", "localhost", False),
        ("chrome-extension://abc", "abc", False),
        ("http://localhost:4280/path", "localhost:4280", False),
        ("http://user@localhost:4280", "localhost:4280", False),
        ("http://[::1:4280", "localhost:4280", False),
        ("http://localhost:4280", None, False),
    ],
)
def test_same_origin(origin: str | None, host: str | None, same: bool) -> None:
    assert same_origin(origin, host) is same


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("ci.example", "ci.example"),
        (" CI.Example ", "ci.example"),
        ("[fd00::5]", "fd00::5"),
        ("fd00::5", "fd00::5"),
        ("10.0.0.5", "10.0.0.5"),
    ],
)
def test_parse_allowed_host(value: str, name: str) -> None:
    assert parse_allowed_host(value) == name


@pytest.mark.parametrize(
    "value", ["", "  ", "ci.example:4280", "[::1]:80", "http://ci.example", "a b", "u@host"]
)
def test_parse_allowed_host_refuses_what_would_never_match(value: str) -> None:
    with pytest.raises(ConfigError, match="--allowed-host"):
        parse_allowed_host(value)


@pytest.mark.parametrize(
    ("limit", "max_waits", "max_feeds", "caps"),
    [
        (1_048_576, 10_000, 100, Caps(waits=10_000, feeds=100)),  # a raised limit: as asked
        (1024, 10_000, 100, Caps(waits=796, feeds=100)),  # the usual soft limit
        (512, 10_000, 100, Caps(waits=336, feeds=48)),  # feeds keep an eighth of the budget
        (512, 100, 10, Caps(waits=100, feeds=10)),
        (512, 10_000, 0, Caps(waits=384, feeds=0)),
        (512, 0, 1000, Caps(waits=0, feeds=384)),
        (RESERVE, 10_000, 100, Caps(waits=0, feeds=0)),
        (50, 10_000, 100, Caps(waits=0, feeds=0)),
    ],
)
def test_web_caps_keep_the_reserve(limit: int, max_waits: int, max_feeds: int, caps: Caps) -> None:
    result = web_caps(limit, max_waits, max_feeds)
    assert result == caps
    assert result.waits + result.feeds + RESERVE <= max(limit, RESERVE)


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    # In a child, so that this test process keeps its own limits.
    code = (
        "import resource\n"
        "from condo.fds import raise_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 300))\n"
        "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "print(raise_fd_limit())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert out == "(64, 300) (300, 300)\n(300, 300)\n"


def test_slots_refuse_beyond_the_cap_and_free_on_release() -> None:
    slots = Slots(2)
    assert [slots.try_take(), slots.try_take(), slots.try_take()] == [True, True, False]
    assert slots.taken == 2
    slots.release()
    assert slots.try_take() is True
    assert slots.try_take() is False
    assert Slots(0).try_take() is False
