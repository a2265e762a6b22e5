"""The Consul agent the multi-host benchmark shares (loopback): is it up, and removing a run's
keys afterwards.
"""

from __future__ import annotations

import contextlib

import httpx

CONSUL_HOST, CONSUL_PORT = "127.0.0.1", 8500


async def delete_consul_prefix(prefix: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{CONSUL_HOST}:{CONSUL_PORT}") as client:
        with contextlib.suppress(httpx.HTTPError):  # Consul gone: nothing left to clean there
            await client.delete(f"/v1/kv/{prefix}", params={"recurse": "true"})


async def consul_answers() -> bool:
    base = f"http://{CONSUL_HOST}:{CONSUL_PORT}"
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as client:
        try:
            response = await client.get("/v1/status/leader")
        except httpx.HTTPError:
            return False
    return response.status_code == 200 and response.text.strip() not in ('""', "")
