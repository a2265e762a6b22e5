"""`/openapi.json` against a real `condo run` process, checked by schemathesis.

Two condos: one without a token or Consul, one with `CONDO_API_TOKEN` and `--expose consul` (on
a prefix of its own), each with a service that deploys (`web`, a real container) and one whose
spec is broken (`broken`, a `spec_error`), so the bodies have something to show. Each condo must
serve exactly `openapi_document(token=..., consul=...)` (checked when it starts); schemathesis
takes that document (loaded with the module, as its pytest integration needs) and sends every
operation its examples, coverage cases (missing, empty, too long and wrongly typed parameters,
other methods, no token, a wrong token) and at most MAX_EXAMPLES generated ones, checking: only
documented status codes, bodies that match the document's schemas, documented content types,
valid data accepted and invalid data refused, a token really required where the document says
so, and no 5xx but the documented timeout (500) of `/v1/wait_for`.

Left out: the websocket `/v1/feed` (a plain GET of it is a 400 by design; tests/integration/
test_web_server.py drives it over real websockets). `/v1/wait_for` is a long-poll (default
60 s): every case of it that would wait gets a timeout of WAIT_TIMEOUT at most.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import httpx
import pytest
import requests
import schemathesis
from schemathesis import Case

from condo import labels
from condo.web.openapi import openapi_document
from condo.web.waitfor import BadParams, parse_wait_params
from tests.integration.harness import free_port

pytestmark = [pytest.mark.docker, pytest.mark.consul, pytest.mark.slow]

TOKEN = "conformance-token"
AGENT = "http://127.0.0.1:8500"  # the Consul dev agent of scripts/test-env
START_LIMIT = 30.0  # seconds for a fresh `condo run` to answer /openapi.json
WAIT_TIMEOUT = 0.01  # seconds: what a waiting /v1/wait_for case is given instead
STOP_LIMIT = 20.0
REQUEST_TIMEOUT = 5.0  # seconds: every answer but a long-poll's is immediate

# Bounded: every operation's examples and coverage cases, plus at most MAX_EXAMPLES generated.
MAX_EXAMPLES = 25


def settings(*, token: str | None, consul: bool) -> schemathesis.Config:
    auth: dict[str, Any] = {} if token is None else {"openapi": {"bearer": {"bearer": token}}}
    operations: list[dict[str, Any]] = [
        # A websocket: see the module's docstring.
        {"include-path": "/v1/feed", "enabled": False},
        {
            # Its timeout answer is a documented 500 (doc/contract.md), not a crash.
            "include-path": "/v1/wait_for",
            "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "500"]}},
        },
    ]
    if not consul:
        # Without Consul these routes' one answer is a documented 400, to valid requests too.
        accepted = ["2xx", "3xx", "400", "401", "403", "404"]
        operations += [
            {
                "include-path": path,
                "checks": {"positive_data_acceptance": {"expected-statuses": accepted}},
            }
            for path in ("/v1/global_state", "/v1/hosts/{host}")
        ]
    else:
        # A host name that nobody uses is a documented 404; a live one (this condo's) a 409.
        accepted = ["2xx", "3xx", "401", "403", "404", "409"]
        operations.append(
            {
                "include-path": "/v1/hosts/{host}",
                "checks": {"positive_data_acceptance": {"expected-statuses": accepted}},
            }
        )
    return schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
            # Stateful testing follows links between operations; condo's API has none.
            "phases": {"stateful": {"enabled": False}},
            "auth": auth,
            "operations": operations,
        }
    )


@attrs.frozen
class Api:
    """A running condo's API."""

    url: str


@contextlib.contextmanager
def condo_process(tmp_path: Path, *, token: str | None, consul: bool) -> Iterator[Api]:
    """A `condo run` with its API on a free port, serving the document the tests were made of."""
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "web.edn").write_text('{:spec {:Image "condo-test/healthy:1"}}')
    (specs / "broken.edn").write_text("{:spec {:Image 42}}")
    host = f"test-{uuid.uuid4().hex[:10]}"
    prefix = f"condo-test/{uuid.uuid4().hex[:12]}"
    url = f"http://127.0.0.1:{free_port()}"
    argv = [
        sys.executable, "-m", "condo", "run", str(specs), "--state", str(tmp_path / "state.json"),
        "--host", host, "--server", url.removeprefix("http://"), "--log-format", "json",
    ]  # fmt: skip
    if consul:
        argv += ["--expose", "consul", "--consul-endpoint", AGENT, "--consul-prefix", prefix]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CONDO_API_TOKEN", None)
    if token is not None:
        env["CONDO_API_TOKEN"] = token  # the env var, as an operator would keep it out of argv
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with (tmp_path / "condo.log").open("ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    try:
        served = served_document(url, headers)
        assert served == openapi_document(token=token is not None, consul=consul)
        yield Api(url)
    finally:
        process.terminate()  # SIGTERM: condo writes its state and exits, workloads stay
        try:
            process.wait(STOP_LIMIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_LIMIT)
        remove_containers(host)
        if consul:
            httpx.delete(f"{AGENT}/v1/kv/{prefix}", params={"recurse": "true"}, timeout=10)


def served_document(url: str, headers: dict[str, str]) -> Any:
    """GET /openapi.json once condo answers (it is starting: refused connections are retried)."""
    deadline = time.monotonic() + START_LIMIT
    while True:
        try:
            response = httpx.get(f"{url}/openapi.json", headers=headers, timeout=5)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # a sync fixture: the child process is what we wait for
            continue
        assert response.status_code == 200, response.text
        return response.json()


def remove_containers(host: str) -> None:
    """Remove the containers of `host` (this test's unique condo), and only those."""
    filters = [f"--filter=label={key}={value}" for key, value in labels.owned_by(host).items()]
    listed = subprocess.run(
        ["docker", "ps", "-aq", *filters], capture_output=True, text=True, check=True, timeout=30
    )
    ids = listed.stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=True, timeout=60)


@pytest.fixture(scope="module")
def open_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with condo_process(tmp_path_factory.mktemp("open"), token=None, consul=False) as api:
        yield api


@pytest.fixture(scope="module")
def locked_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with condo_process(tmp_path_factory.mktemp("locked"), token=TOKEN, consul=True) as api:
        yield api


def bound_the_wait(case: Case[Any]) -> None:
    """A `/v1/wait_for` case that would wait longer than WAIT_TIMEOUT gets that timeout.

    What waits is decided on the query as sent (schemathesis's serialization, requests' encoding)
    by the route's own parser: a case it refuses is answered 400 at once and is sent as
    generated. The edited case is valid either way, and schemathesis re-validates an edited case,
    so its checks judge what is really sent.
    """
    if case.operation.path != "/v1/wait_for":
        return
    params = case.as_transport_kwargs(base_url="http://condo").get("params")
    url = requests.Request("GET", "http://condo/", params=params).prepare().url or ""
    first = {key: values[0] for key, values in parse_qs(urlsplit(url).query, True).items()}
    try:
        waits = parse_wait_params(first).timeout > WAIT_TIMEOUT
    except BadParams:  # answered 400 at once
        return
    if waits:
        case.query["timeout"] = WAIT_TIMEOUT


def check(case: Case[Any], api: Api) -> None:
    bound_the_wait(case)
    case.call_and_validate(base_url=api.url, timeout=REQUEST_TIMEOUT)


open_schema = schemathesis.openapi.from_dict(
    openapi_document(token=False, consul=False), config=settings(token=None, consul=False)
)
locked_schema = schemathesis.openapi.from_dict(
    openapi_document(token=True, consul=True), config=settings(token=TOKEN, consul=True)
)


@open_schema.parametrize()
def test_the_document_of_a_condo_without_a_token(case: Case[Any], open_api: Api) -> None:
    check(case, open_api)


@locked_schema.parametrize()
def test_the_document_of_a_condo_with_a_token_and_consul(case: Case[Any], locked_api: Api) -> None:
    check(case, locked_api)
