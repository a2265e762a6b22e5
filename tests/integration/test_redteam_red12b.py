"""Red team of issue 12 (bar 3) against the real Consul agent: a prefix followed by folder at the
limit (MAX_WATCHES folders, each watch a blocking request held open) through condo's own client
(`open_consul_client`, its connection pool): the watches and the publisher's calls all get a
connection."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import pytest
import trio

from condo.consul import ConsulSource, KeyLayout, open_consul_client
from condo.consul import source as source_module
from condo.consul.layout import encode_value
from tests.consul_support import until_pictured
from tests.integration.test_consul_session import AGENT, Area, consul_area

pytestmark = pytest.mark.consul

CAP = 20
TXN_OPS = 64  # Consul's most operations in one transaction


@pytest.fixture
async def area() -> AsyncIterator[Area]:
    async with consul_area() as area:
        yield area


async def test_at_the_folder_limit_every_watch_and_the_publishers_calls_get_a_connection(
    area: Area,
) -> None:
    layout = KeyLayout.of(area.prefix)
    folders = source_module.MAX_WATCHES
    view = {"state": "Stable", "current": {"image": "img:1"}}
    ops = [
        {
            "KV": {
                "Verb": "set",
                "Key": layout.key(f"s{n:03d}", "h1"),
                "Value": base64.b64encode(encode_value("h1", f"s{n:03d}", view, 1.0)).decode(),
            }
        }
        for n in range(folders)
    ]
    for at in range(0, len(ops), TXN_OPS):
        response = await area.http.put("/v1/txn", content=json.dumps(ops[at : at + TXN_OPS]))
        assert response.status_code == 200, response.text
    with trio.fail_after(CAP):
        async with open_consul_client(AGENT) as client, trio.open_nursery() as nursery:
            source = ConsulSource(client, layout, watch_worth=0)
            await nursery.start(source.run)
            await until_pictured(source, lambda p: len(p.hosts.get("h1", {})) == folders)
            requests = source.requests
            await trio.sleep(0.5)  # every folder's watch and the prefix's are in flight
            # A call of the publisher's (a renewal: the session's life) meanwhile: at once.
            with trio.fail_after(2):
                await client.list_sessions()
            # One folder's change: its watch and the prefix's answer, nothing reads whole.
            key = layout.key("s050", "h1")
            moved = dict(view, current={"image": "img:2"})
            await area.http.put(f"/v1/kv/{key}", content=encode_value("h1", "s050", moved, 2.0))
            await until_pictured(
                source, lambda p: p.hosts["h1"]["s050"]["current"]["image"] == "img:2"
            )
            await trio.sleep(6)  # beyond any pool's wait (5 s): no call went unanswered
            assert client.failed_at is None and not source.stale
            assert source.requests - requests <= 3
            nursery.cancel_scope.cancel()
