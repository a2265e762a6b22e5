"""`:proxy` without the engine: the spec key's rules (file:line), the container it asks for,
the routes a service's states give (condo.routes, pure), the listen addresses two spec files
cannot share (condo.specdir), the HAProxy config condo writes, and what the engine's inspect
answer says of the published ports."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

from condo.docker.models import Container
from condo.errors import ProxyError, SpecError
from condo.fsm import Box, Phase, ServiceState
from condo.proxy import haproxy
from condo.proxy.reconcile import RETRY_DELAY, ProxyReconciler, run_proxy
from condo.routes import Server, desired_routes, listener_views, service_routes
from condo.spec import ProxyListener, ServiceSpec, parse_spec
from condo.specdir import SpecScanner
from condo.store import Store
from tests.proxy_support import inspected, published_on_loopback

FILE = "web.edn"


def parse(text: str) -> ServiceSpec:
    return parse_spec(text.encode(), FILE)


def spec(proxy: str = '[{:listen "127.0.0.1:8080" :port 80}]', extra: str = "") -> ServiceSpec:
    return parse(f'{{:spec {{:Image "web:1" {extra}}}\n :deploy [:After 2]\n :proxy {proxy}}}')


# --- the spec key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proxy", "expected"),
    [
        ('[{:listen "127.0.0.1:8080" :port 80}]', ProxyListener("127.0.0.1", 8080, 80, "tcp")),
        ('[{:listen "8080" :port 80 :mode :http}]', ProxyListener("", 8080, 80, "http")),
        ("[{:listen 8080 :port 80}]", ProxyListener("", 8080, 80, "tcp")),
        ('[{:listen "[::1]:9000" :port 81}]', ProxyListener("::1", 9000, 81, "tcp")),
    ],
)
def test_a_listener_is_read(proxy: str, expected: ProxyListener) -> None:
    assert spec(proxy).proxy == (expected,)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{:spec {:Image "a"}\n :proxy {:listen 80}}', 2, ":proxy must be a vector"),
        ('{:spec {:Image "a"}\n :proxy [80]}', 2, ":proxy [0] must be a map"),
        (
            '{:spec {:Image "a"}\n :proxy [{:listen "80" :port 80}\n {:listne "81" :port 80}]}',
            3,
            ":proxy [1] has the unknown key :listne",
        ),
        (
            '{:spec {:Image "a"}\n :proxy [{:port 80\n :listen "web:80"}]}',
            3,
            ':proxy [0] :listen must be "[HOST:]PORT"',
        ),
        ('{:spec {:Image "a"}\n :proxy [{:listen "0" :port 80}]}', 2, ":listen must be"),
        ('{:spec {:Image "a"}\n :proxy [{:listen "::1" :port 80}]}', 2, ":listen must be"),
        ('{:spec {:Image "a"}\n :proxy [{:listen "80"}]}', 2, ":proxy [0] :port must be"),
        ('{:spec {:Image "a"}\n :proxy [{:listen "80" :port "80"}]}', 2, ":port must be"),
        ('{:spec {:Image "a"}\n :proxy [{:listen "80" :port 70000}]}', 2, ":port must be"),
        (
            '{:spec {:Image "a"}\n :proxy [{:listen "80" :port 80\n :mode :udp}]}',
            3,
            ":mode must be :tcp or :http",
        ),
        (
            '{:spec {:Image "a"}\n :proxy [{:listen "8080" :port 80}\n'
            ' {:listen "127.0.0.1:8080" :port 81}]}',
            3,
            "is also 8080, an earlier listener of this spec",
        ),
        (
            '{:spec {:Image "a"\n :HostConfig {:PortBindings {"80/tcp" [{:HostPort "8080"}]}}}\n'
            ' :proxy [{:listen "127.0.0.1:8080" :port 80}]}',
            3,
            "is also published by :HostConfig :PortBindings (8080)",
        ),
    ],
)
def test_a_bad_proxy_is_an_error_at_its_line(text: str, line: int, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(text)
    assert caught.value.line == line
    assert message in caught.value.message


def test_a_port_published_elsewhere_is_no_clash() -> None:
    bound = ':HostConfig {:PortBindings {"80/tcp" [{:HostIp "127.0.0.2" :HostPort "8080"}]}}'
    assert len(spec(extra=bound).proxy) == 1


def test_the_container_publishes_each_proxied_port_on_loopback() -> None:
    two = spec('[{:listen "8080" :port 80} {:listen "8443" :port 443} {:listen "9" :port 80}]')
    assert two.create_body["HostConfig"]["PortBindings"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}],
        "443/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}],
    }
    assert two.create_body["ExposedPorts"] == {"80/tcp": {}, "443/tcp": {}}
    assert "HostConfig" not in two.container  # the file's body is left as it was


def test_the_proxied_ports_decide_a_redeploy_the_listen_address_does_not() -> None:
    plain = parse('{:spec {:Image "web:1"}\n :deploy [:After 2]}')
    moved = spec('[{:listen "127.0.0.1:9090" :port 80}]')
    other_port = spec('[{:listen "127.0.0.1:8080" :port 81}]')
    assert spec().container_hash != plain.container_hash
    assert spec().container_hash == moved.container_hash
    assert spec().container_hash != other_port.container_hash
    assert ServiceSpec.from_json(spec().to_json()) == spec()
    assert "proxy" not in plain.to_json()  # the state file's shape without :proxy is unchanged


def test_after_with_a_fixed_host_port_and_no_proxy_is_a_warning() -> None:
    fixed = '{:spec {:Image "a" :HostConfig {:PortBindings {"80/tcp" [{:HostPort "8080"}]}}}'
    assert "use :proxy" in parse(fixed + " :deploy [:After 1]}").warnings[0]
    assert parse(fixed + "}").warnings == ()  # [:Before] stops the old one first
    other = ':HostConfig {:PortBindings {"81/tcp" [{:HostPort "9090"}]}}'
    assert spec(extra=other).warnings == ()  # with :proxy, condo leaves the rest to the user


# --- routes ---------------------------------------------------------------------------------


def box(cid: str, spec_: ServiceSpec) -> Box:
    return Box(id=cid, name=f"web_{cid}", spec=spec_, created_at=1.0, healthcheck=True)


def test_routes_lead_to_the_stable_container_only() -> None:
    s = spec()
    old, new = box("old", s), box("new", s)
    listener = s.proxy[0]

    def servers(state: ServiceState) -> tuple[Server, ...]:
        (route,) = service_routes("web", state)
        assert route.listener == listener
        return route.servers

    stable = ServiceState(phase=Phase.Stable, desired=s, current=old)
    assert servers(stable) == (Server("old", "web_old", 80, "ready"),)
    candidate = attrs.evolve(stable, phase=Phase.WaitNext, next=new)
    assert servers(candidate) == (Server("old", "web_old", 80, "ready"),)
    draining = attrs.evolve(candidate, draining=True)
    assert servers(draining) == (
        Server("new", "web_new", 80, "ready"),
        Server("old", "web_old", 80, "drain"),
    )
    assert servers(ServiceState(phase=Phase.Wait, desired=s, current=new)) == ()
    assert servers(attrs.evolve(stable, phase=Phase.TryAgainNext)) == servers(stable)
    assert service_routes("web", attrs.evolve(stable, desired=None, removed=True)) == ()
    assert listener_views(draining) == [
        {
            "listen": "127.0.0.1:8080",
            "port": 80,
            "mode": "tcp",
            "to": {"id": "new", "name": "web_new"},
            "draining": [{"id": "old", "name": "web_old"}],
        }
    ]


def test_a_container_without_the_port_published_is_no_server() -> None:
    before = parse('{:spec {:Image "web:1"}}')  # deployed before :proxy was added
    state = ServiceState(phase=Phase.Stable, desired=spec(), current=box("old", before))
    (route,) = service_routes("web", state)
    assert route.servers == ()


def test_a_before_hold_lasts_the_stop_and_the_health_check() -> None:
    before = parse(
        '{:spec {:Image "a"} :health-timeout 7 :stop-timeout 3 :proxy [{:listen "80" :port 80}]}'
    )
    (route,) = service_routes("web", ServiceState(desired=before))
    assert route.hold_timeout == 10
    (after,) = service_routes("web", ServiceState(desired=spec()))
    assert after.hold_timeout == 10.0  # [:After n]: nothing is stopped first


def test_a_listen_address_claimed_twice_goes_to_the_first_service() -> None:
    a = ServiceState(phase=Phase.Stable, desired=spec(), current=box("a", spec()))
    b = ServiceState(phase=Phase.Stable, desired=spec('[{:listen "8080" :port 80}]'))
    routes, conflicts = desired_routes({"b": b, "a": a})
    assert [r.service for r in routes] == ["a"]
    assert [(c.service, c.owner) for c in conflicts] == [("b", "a")]


# --- two spec files ---------------------------------------------------------------------------


def test_two_files_sharing_a_listen_address_are_both_errors(tmp_path: Path) -> None:
    (tmp_path / "api.edn").write_text('{:spec {:Image "a"}\n :proxy [{:listen "8080" :port 80}]}')
    (tmp_path / "web.edn").write_text(
        '{:spec {:Image "w"}\n :proxy [{:listen "9000" :port 80}\n'
        ' {:listen "127.0.0.1:8080" :port 81}]}'
    )
    (tmp_path / "other.edn").write_text('{:spec {:Image "o"} :proxy [{:listen "8081" :port 80}]}')
    snapshot = SpecScanner([tmp_path]).scan()
    api, web = snapshot.entries["api"].error, snapshot.entries["web"].error
    assert api is not None and web is not None
    assert (api.line, web.line) == (2, 3)
    assert f"8080 is also a listener in {tmp_path / 'web.edn'}" in api.message
    assert f"127.0.0.1:8080 is also a listener in {tmp_path / 'api.edn'}" in web.message
    assert snapshot.entries["other"].spec is not None


# --- HAProxy's config and the engine's answer ---------------------------------------------------


def test_the_config_holds_listeners_servers_and_the_hold() -> None:
    frontend = haproxy.Frontend(
        name=haproxy.frontend_name("127.0.0.1", 8080),
        bind=haproxy.bind_address("127.0.0.1", 8080),
        mode="http",
        hold_timeout=10,
        servers=(
            haproxy.ServerLine("cnew", 32001, "ready"),
            haproxy.ServerLine("cold", 32000, "drain"),
        ),
    )
    text = haproxy.render_config(Path("/run/p"), [frontend])
    assert "stats socket /run/p/admin.sock mode 600 level admin expose-fd listeners" in text
    assert "frontend l_127_0_0_1_8080\n    bind 127.0.0.1:8080\n    mode http\n" in text
    assert "    retries 13\n    server hold 127.0.0.1:1 backup\n" in text
    assert "    server cnew 127.0.0.1:32001\n    server cold 127.0.0.1:32000 disabled\n" in text
    # The servers change over the socket: only listeners change the signature (a reload).
    moved = attrs.evolve(frontend, servers=())
    assert haproxy.signature([moved]) == haproxy.signature([frontend])
    assert "splice" not in text  # HTTP mode reads every request
    tcp = haproxy.render_config(Path("/run/p"), [attrs.evolve(frontend, mode="tcp")])
    assert "    mode tcp\n    balance roundrobin\n    retries 13\n    option splice-auto\n" in tcp
    assert haproxy.bind_address("", 80) == ":80"
    assert haproxy.bind_address("::1", 80) == "[::1]:80"


def test_inspect_gives_the_ports_published_on_loopback() -> None:
    info = inspected(
        "abc",
        {
            "Ports": {
                "80/tcp": [
                    {"HostIp": "0.0.0.0", "HostPort": "8000"},
                    {"HostIp": "127.0.0.1", "HostPort": "32768"},
                ],
                "81/tcp": None,
                "82/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}],
            }
        },
    )
    assert dict(info.loopback_ports) == {"80/tcp": 32768}


async def test_the_state_view_shows_listeners_and_warnings() -> None:
    store = Store("h")
    s = spec()
    store.set_state("web", ServiceState(phase=Phase.Stable, desired=s, current=box("a", s)))
    fixed = '{:spec {:Image "a" :HostConfig {:PortBindings {"80/tcp" [{:HostPort "80"}]}}}'
    store.set_state("old", ServiceState(desired=parse(fixed + " :deploy [:After 1]}")))
    web, old = store.view()["services"]["web"], store.view()["services"]["old"]
    assert web["proxy"][0]["to"] == {"id": "a", "name": "web_a"}
    assert web["warnings"] == []
    assert old["proxy"] == []
    assert "use :proxy" in old["warnings"][0]


def test_the_sockets_are_absolute_paths_for_a_relative_state_file() -> None:
    # HAProxy reads `stats socket condo-state.json.proxy/admin.sock` as HOST:PORT.
    proxy = haproxy.HAProxy(Path("condo-state.json.proxy"))
    assert proxy.admin_socket.is_absolute() and proxy.config.is_absolute()
    assert f"stats socket {proxy.admin_socket} " in haproxy.render_config(proxy.directory, [])


# --- an error a user sees -------------------------------------------------------------------------


class OneContainer:
    """The engine's inspect answer for every container: running, port 80 published on
    127.0.0.1:32768."""

    async def inspect(self, cid_or_name: str) -> Container:
        return inspected(cid_or_name, published_on_loopback(32768))


def stable_store() -> Store:
    store = Store("h")
    s = spec()
    store.set_state("web", ServiceState(phase=Phase.Stable, desired=s, current=box("a", s)))
    store.mark_settled()
    return store


async def proxy_error_of(store: Store, proxy: haproxy.HAProxy) -> str:
    """Run the proxy task until `/v1/state` shows its error; check that the same error again
    changes nothing (the task does not spin on its own report), then give the error."""
    async with trio.open_nursery() as nursery:
        await nursery.start(
            run_proxy, store, OneContainer(), ProxyReconciler(proxy, OneContainer())
        )
        with trio.fail_after(10):
            while "proxy" not in store.view():
                await store.wait_changed(store.version)
        shown = store.view()["proxy"]
        version = store.version
        await trio.sleep(RETRY_DELAY * 1.5)  # another pass, the same error
        assert store.version == version
        assert store.view()["proxy"] == shown
        nursery.cancel_scope.cancel()
    assert shown["at"] > 0
    return str(shown["error"])


async def test_a_missing_haproxy_is_an_error_in_the_state(tmp_path: Path) -> None:
    proxy = haproxy.HAProxy(tmp_path / "s.proxy", binary=str(tmp_path / "no-haproxy"))
    error = await proxy_error_of(stable_store(), proxy)
    assert f"cannot run {tmp_path / 'no-haproxy'}" in error
    assert "apt-get install haproxy" in error


async def test_a_socket_path_too_long_is_an_error_in_the_state(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (haproxy.SOCKET_PATH_LIMIT - len(str(tmp_path))))
    proxy = haproxy.HAProxy(deep / "s.proxy", binary=str(tmp_path / "never-run"))
    error = await proxy_error_of(stable_store(), proxy)
    assert error.startswith(f"the proxy's socket path {deep / 's.proxy' / 'master.sock'} is ")
    assert "give condo a --state file in a shorter directory" in error
    assert haproxy.socket_path_problem(tmp_path / "s.proxy") is None


async def test_the_proxy_error_comes_and_goes_in_the_state() -> None:
    store = Store("h")
    assert "proxy" not in store.view()
    store.set_proxy_error("haproxy refused its config: bad")
    version = store.version
    assert store.view()["proxy"]["error"] == "haproxy refused its config: bad"
    store.set_proxy_error("haproxy refused its config: bad")
    assert store.version == version  # the same error: no change, its first `at` stays
    store.set_proxy_error(None)
    assert "proxy" not in store.view()


@pytest.mark.parametrize(
    "listen",
    [
        "::1:8080",  # an IPv6 address itself: the host must be in brackets
        "[fe80::1%eth0]:8080",  # a zone: HAProxy refuses it, and the whole config with it
        "\u0668\u0660\u0668\u0660",  # 8080 in Arabic-Indic digits
    ],
)
def test_a_listen_address_haproxy_would_not_take_is_an_error(listen: str) -> None:
    with pytest.raises(SpecError, match=":listen must be"):
        spec(f'[{{:listen "{listen}" :port 80}}]')


async def test_a_pass_inspects_each_container_once_however_many_listeners(tmp_path: Path) -> None:
    asked: list[str] = []

    class Counting(OneContainer):
        async def inspect(self, cid_or_name: str) -> Container:
            asked.append(cid_or_name)
            return await super().inspect(cid_or_name)

    many = " ".join(f'{{:listen "127.0.0.1:{9000 + i}" :port 80}}' for i in range(50))
    s = spec(f"[{many}]")
    state = ServiceState(phase=Phase.Stable, desired=s, current=box("a", s))
    routes, _ = desired_routes({"web": state})
    proxy = haproxy.HAProxy(tmp_path / "s.proxy", binary=str(tmp_path / "no-haproxy"))
    with pytest.raises(ProxyError, match="cannot run"):  # after the lookups
        await ProxyReconciler(proxy, Counting()).reconcile(routes)
    assert asked == ["a"]
