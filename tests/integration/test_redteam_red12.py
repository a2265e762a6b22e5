"""Red team of issue 12 against the real Consul agent: the watcher that follows a large prefix
folder by folder (condo.consul.source, `watch_worth=0`) keeps the multi-host truth through
deletes, a folder deleted and recreated between two reads, and rewrites of the same bytes."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import pytest
import trio

from condo.consul import ConsulSource, KeyLayout, open_consul_client
from condo.consul.layout import encode_value
from condo.waiting import Picture
from tests.consul_support import until_pictured
from tests.integration.test_consul_session import AGENT, Area, consul_area

pytestmark = pytest.mark.consul

CAP = 20


@pytest.fixture
async def area() -> AsyncIterator[Area]:
    async with consul_area() as area:
        yield area


def view(image: str) -> dict[str, object]:
    return {"state": "Stable", "current": {"image": image}}


def images(picture: Picture) -> dict[tuple[str, str], str]:
    return {
        (service, host): str(state["current"]["image"])
        for host, services in picture.hosts.items()
        for service, state in services.items()
    }


async def test_by_folder_the_picture_follows_deletes_and_a_folder_recreated(area: Area) -> None:
    layout = KeyLayout.of(area.prefix)

    def put(service: str, host: str, image: str) -> dict[str, object]:
        value = encode_value(host, service, view(image), 1.0)
        return {
            "KV": {
                "Verb": "set",
                "Key": layout.key(service, host),
                "Value": base64.b64encode(value).decode(),
            }
        }

    def delete_tree(service: str) -> dict[str, object]:
        return {"KV": {"Verb": "delete-tree", "Key": f"{layout.folder}{service}/"}}

    async def txn(*ops: dict[str, object]) -> None:
        response = await area.http.put("/v1/txn", content=json.dumps(list(ops)))
        assert response.status_code == 200, response.text

    expected = {(s, h): "img:1" for s in ("s1", "s2", "s3") for h in ("h1", "h2")}
    await txn(*(put(s, h, i) for (s, h), i in expected.items()))
    with trio.fail_after(CAP):
        async with open_consul_client(AGENT) as client, trio.open_nursery() as nursery:
            source = ConsulSource(client, layout, watch_worth=0)
            await nursery.start(source.run)
            await until_pictured(source, lambda p: images(p) == expected)
            await trio.sleep(0.2)  # now followed by folder (its second read on)

            # One key deleted.
            await area.http.delete(f"/v1/kv/{layout.key('s1', 'h2')}")
            del expected["s1", "h2"]
            await until_pictured(source, lambda p: images(p) == expected)

            # A folder deleted and recreated in one transaction (no read can fall between):
            # fewer keys, one of them with the very bytes it had.
            await txn(delete_tree("s2"), put("s2", "h1", "img:1"))
            del expected["s2", "h2"]
            await until_pictured(source, lambda p: images(p) == expected)

            # The same, with the other key, its old bytes again, and a new one elsewhere.
            await txn(delete_tree("s2"), put("s2", "h2", "img:1"), put("s3", "h1", "img:2"))
            del expected["s2", "h1"]
            expected["s2", "h2"] = "img:1"
            expected["s3", "h1"] = "img:2"
            await until_pictured(source, lambda p: images(p) == expected)

            # A whole folder gone, and back a moment later, separately.
            await area.http.delete(f"/v1/kv/{layout.folder}s3/", params={"recurse": "true"})
            for key in [k for k in expected if k[0] == "s3"]:
                del expected[key]
            await until_pictured(source, lambda p: images(p) == expected)
            await txn(put("s3", "h2", "img:3"))
            expected["s3", "h2"] = "img:3"
            await until_pictured(source, lambda p: images(p) == expected)
            # Settled: a last look after a few more reads.
            await trio.sleep(0.3)
            assert images(source.picture()) == expected
            nursery.cancel_scope.cancel()
