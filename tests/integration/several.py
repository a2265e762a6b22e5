"""Several condos' files side by side on one engine, each with its own folder and host name.

For the tests of what hosts see of each other (Consul, `condo wait`). Each is condo_files in its
own folder `host<n>`: the containers of every one are removed at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from condo.docker import DockerClient
from tests.integration.harness import CondoUnderTest, condo_files


@contextlib.asynccontextmanager
async def condos(
    tmp_path: Path, docker: DockerClient, count: int
) -> AsyncIterator[list[CondoUnderTest]]:
    async with contextlib.AsyncExitStack() as stack:
        made = []
        for n in range(count):
            folder = tmp_path / f"host{n}"
            folder.mkdir()
            made.append(await stack.enter_async_context(condo_files(folder, docker)))
        yield made
