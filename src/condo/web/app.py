"""The HTTP API's routes (doc/contract.md "HTTP API"), built by `build_app(context)`.

Owns the Quart-Trio app: routes, the Host, Origin and token checks, the caps on waiting requests,
and the rule that every error is JSON `{"error": "..."}` (400, 401, 403, 404, 405, 413, 503, and
500 for condo's own bugs) and never an HTML page.
Everything the routes read comes in through `WebContext`; nothing here talks to Docker or Consul
(the engine is a `ping` behind `EngineHealth`, the hosts a `StateSource`).

Invariants:
- Every route (`/healthz` too, unknown paths too) answers a `Host` that is not allowed with 403
  before anything else, and the websocket refuses an `Origin` other than its own with 403
  (condo.web.hosts: DNS rebinding and cross-site websockets). No `Host` or no `Origin` is fine.
- With an API token, every route but `/healthz` answers 401 before doing anything else (even for
  unknown paths, so they leak nothing); the websocket also accepts `?token=`. A browser that asks
  for the dashboard page (`/`, `/ui`, Accept: text/html) gets its 401 with the page itself as the
  body (script and styles inlined, `locked_page`): it holds no state, and asks for the token.
- A request that waits (`/v1/wait_for`, the feed) first takes one of its kind's `Slots`; with none
  free it is answered 503 at once (with `Connection: close`, so that the refused connection does
  not linger either). It waits inside `context.closing.guard()`: shutdown answers it at once (503,
  or close 1001).
- Bad input is a 4xx: parameters are validated before use, bodies above `MAX_BODY` are refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import trio
from quart import Response, jsonify, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import WebsocketMismatch

import condo
from condo.errors import ForgetRefused
from condo.history import History
from condo.memo import PerVersion
from condo.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from condo.metrics import Metrics
from condo.store import Store
from condo.waiting import HostDirectory, StateSource, Verdict, evaluate, hosts_document
from condo.web.assets import INDEX, StaticFile, StaticFiles, locked_page
from condo.web.auth import bearer, token_matches
from condo.web.door import Door
from condo.web.feed import GlobalSnapshots, Snapshots, run_feed
from condo.web.health import EngineHealth
from condo.web.hosts import AllowedHosts, same_origin
from condo.web.lifecycle import Closing
from condo.web.openapi import openapi_document
from condo.web.slots import Slots
from condo.web.waitfor import MAX_NAME, BadParams, SharedWaits, WaitParams, parse_wait_params

log = structlog.get_logger(__name__)

MAX_BODY = 64 * 1024  # no route takes a body; anything larger is refused with 413
SHUTTING_DOWN = "condo is shutting down"
PAGES = frozenset({"root", "ui"})  # the endpoints that serve the dashboard page
# The dashboard loads its script and styles from /ui/ and reads the API (fetch and the feed's
# websocket: 'self' covers ws:// to the same host): nothing else is allowed.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@attrs.frozen(kw_only=True)
class WebContext:
    """Everything the routes read."""

    store: Store
    local: StateSource  # this host only (wait_for without Consul)
    global_source: StateSource | None  # every host, from Consul; None when exposing is off
    host_directory: HostDirectory | None = None  # the hosts' records (Consul), for forget
    health: EngineHealth
    state_file_error: Callable[[], BaseException | None]
    metrics: Metrics
    closing: Closing
    static: StaticFiles
    api_token: str | None = attrs.field(default=None, repr=False)
    allowed_hosts: AllowedHosts = attrs.field(factory=AllowedHosts.of)
    max_waits: int = 10_000  # open /v1/wait_for at once (condo.fds.web_caps sizes it)
    max_feeds: int = 100  # open /v1/feed at once
    # Every service's deploys (an in-memory one when the caller has none: tests).
    history: History = attrs.Factory(History)


def _error(code: int, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": message, **extra}), code


def encoded_state(store: Store) -> PerVersion[int, bytes]:
    """The `/v1/state` body, encoded once per store version (it is the hot route)."""
    return PerVersion(
        lambda: store.version,
        lambda _: json.dumps(store.view(), separators=(",", ":")).encode(),
    )


def build_app(context: WebContext) -> QuartTrio:
    """A fresh app over `context` (no module-level app: one per server, one per test)."""
    app = QuartTrio(__name__, static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY,
        # Errors are ours to render (as JSON), also in debug mode.
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
    )
    # Exact paths only: no redirects for doubled or trailing slashes.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    snapshots = Snapshots(context.store)
    global_snapshots = (
        None if context.global_source is None else GlobalSnapshots(context.global_source)
    )
    locked = locked_page(context.static)
    waits = Slots(context.max_waits)
    feeds = Slots(context.max_feeds)

    # --- guards ---------------------------------------------------------------------------

    @app.before_request
    async def refuse_bodies_and_strangers() -> Any:
        host = request.headers.get("Host")
        if not context.allowed_hosts.allows(host):
            return _foreign_host(host)
        length = request.content_length
        if length is not None and length > MAX_BODY:
            return _error(413, f"request bodies are limited to {MAX_BODY} bytes")
        # /healthz needs no token, whatever the method: a TRACE of it gets its 405, not a 401.
        if context.api_token is None or request.endpoint == "healthz" or request.path == "/healthz":
            return None
        if not token_matches(context.api_token, bearer(request.headers.get("Authorization"))):
            if locked is not None and request.endpoint in PAGES and _wants_html():
                return _locked(locked)
            return _unauthorized()
        return None

    @app.before_websocket
    async def refuse_strangers_on_websockets() -> Any:
        host = websocket.headers.get("Host")
        if not context.allowed_hosts.allows(host):
            return _foreign_host(host)
        origin = websocket.headers.get("Origin")
        if not same_origin(origin, host):
            return _error(403, f"the websocket's Origin {origin!r} is not this API's own"[:300])
        if context.api_token is None:
            return None
        # An empty ?token= is no token (the CLI refuses an empty --api-token; this holds anyway).
        query_token = websocket.args.get("token") or None
        presented = bearer(websocket.headers.get("Authorization")) or query_token
        if not token_matches(context.api_token, presented):
            return _unauthorized()
        return None

    @app.after_request
    async def harden(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        if isinstance(exc, NotFound):
            response, _ = _error(404, f"no such route: {request.path}"[:300])
        elif isinstance(exc, MethodNotAllowed):
            allowed = sorted(exc.valid_methods or ())
            response, _ = _error(405, f"method {request.method} not allowed", allowed=allowed)
            response.headers["Allow"] = ", ".join(allowed)
        elif isinstance(exc, WebsocketMismatch):
            response, _ = _error(400, f"{request.path} is a websocket: connect with ws://")
        else:
            response, _ = _error(status, exc.description or exc.name)
        return response, status

    @app.errorhandler(Exception)
    async def condo_bug(exc: Exception) -> Any:
        # A bug in a route: say so in JSON, log the traceback once; the server keeps serving.
        log.error("web.route_failed", path=request.path, exc_info=exc)
        return _error(500, "internal error (condo logged the details)")

    # --- the API ----------------------------------------------------------------------------

    state_body = encoded_state(context.store)

    @app.get("/v1/state")
    async def state() -> Any:
        return Response(state_body.value, content_type="application/json")

    @app.get("/v1/history")
    async def history() -> Any:
        if "name" not in request.args:
            return jsonify({"services": _all_history(context)})
        name = request.args["name"].strip()
        if not name or len(name) > MAX_NAME:
            return _error(400, f"name must be 1 to {MAX_NAME} characters, not blank")
        if name not in context.store.entries and name not in context.history.entries:
            return _error(404, f"no service {name} on this host, nor in its history"[:300])
        return jsonify({"services": context.history.view(name)})

    @app.get("/v1/global_state")
    async def global_state() -> Any:
        if context.global_source is None:
            return _error(400, "global state needs Consul: run condo with --expose consul")
        source = context.global_source
        name: str | None = None
        if "name" in request.args:  # one service's part (`condo wait`'s progress): a few kB
            name = request.args["name"].strip()
            if not name or len(name) > MAX_NAME:
                return _error(400, f"name must be 1 to {MAX_NAME} characters, not blank")
        await source.fresh()  # an idle source (nobody asked lately) reads first
        return jsonify(
            {
                "hosts": hosts_document(source.picture(), name),
                "stale": source.stale,
                "read_at": source.read_at,
            }
        )

    @app.delete("/v1/hosts/<host>")
    async def forget_host(host: str) -> Any:
        if context.host_directory is None:
            return _error(400, "host records need Consul: run condo with --expose consul")
        try:
            await context.host_directory.forget(host)
        except ForgetRefused as exc:
            status = {"unknown": 404, "live": 409}.get(exc.reason, 503)
            return _error(status, str(exc))
        return jsonify({"forgotten": host})

    source = context.global_source or context.local
    shared = SharedWaits(source)
    app.extensions["condo.waits"] = shared  # read by tests: how many evaluations

    @app.before_serving
    async def follow_the_waits() -> None:
        # quart-trio's serving nursery: the one task that evaluates every wait, for as long as
        # the app serves (cancelled with it).
        app.nursery.start_soon(shared.run)

    # The plain long-polls are parked by the front door (condo.web.door) below hypercorn; the
    # route answers the others (a connection's later requests, or a head that came in pieces)
    # and is the reference the door's answers match byte for byte (tests/test_web_serve.py).
    app.extensions["condo.door"] = Door(
        shared=shared,
        slots=waits,
        closing=context.closing,
        allowed_hosts=context.allowed_hosts,
        api_token=context.api_token,
        answer=lambda params, verdict, closing: wait_answer(source, params, verdict, closing),
        dumps=lambda body: app.json.dumps(body, separators=(",", ":")),
        gauge=context.metrics.web_waiters,
        state=lambda: (context.store.version, state_body.value),
    )

    @app.get("/v1/wait_for")
    async def wait_for() -> Any:
        try:
            params = parse_wait_params(request.args)
        except BadParams as exc:
            return _error(400, str(exc))
        if not waits.try_take():
            return _full("waits", waits.cap, "--max-waits")
        context.metrics.web_waiters.inc()
        try:
            # An idle source (nobody asked lately) reads first: the timeout counts from a fresh
            # picture, and a timeout of 0 still answers from one.
            with context.closing.guard():
                await source.fresh()
            key = shared.join(params.name, params.image)
            with (
                context.closing.guard() as guard,
                trio.move_on_after(params.timeout),
                shared.waiting(key),
            ):
                await trio.sleep_forever()
        finally:
            context.metrics.web_waiters.dec()
            waits.release()
        answer, status = wait_answer(source, params, key.verdict, guard.cancelled_caught)
        return jsonify(answer), status

    @app.get("/healthz")
    async def healthz() -> Any:
        engine = await context.health.status()
        file_error = context.state_file_error()
        body: dict[str, Any] = {
            "host": context.store.host,
            "version": condo.__version__,
            "engine": {"ok": engine.ok, "api_version": engine.api_version, "error": engine.error},
            "state_file": {"ok": file_error is None, "error": _text(file_error)},
            # condo's clock: the dashboard counts ages and countdowns by it, not the browser's.
            "time": time.time(),
        }
        if not engine.ok:
            body["status"] = "unavailable"
            body["error"] = f"the Docker engine does not answer: {engine.error}"
            return jsonify(body), 503
        body["status"] = "ok" if file_error is None else "degraded"
        return jsonify(body)

    @app.get("/metrics")
    async def metrics() -> Any:
        return Response(context.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    document = openapi_document(
        token=context.api_token is not None, consul=context.global_source is not None
    )

    @app.get("/openapi.json")
    async def openapi() -> Any:
        return jsonify(document)

    @app.websocket("/v1/feed")
    async def feed() -> Any:
        # Refused before the handshake completes, as the other refusals are.
        shape = websocket.args.get("global", "whole")
        if shape not in ("whole", "delta"):
            return _error(400, f"global must be whole or delta, not {shape[:40]!r}")
        if not feeds.try_take():
            # Refused before the handshake completes: the client gets this as an HTTP answer.
            return _full("feeds", feeds.cap, "--max-feeds")
        try:
            await _feed(deltas=shape == "delta")
        finally:
            feeds.release()
        return None

    async def _feed(*, deltas: bool) -> None:
        await websocket.accept()
        context.metrics.web_feeds.inc()
        try:
            with context.closing.guard() as guard:
                await run_feed(
                    context.store,
                    snapshots,
                    websocket.send,
                    websocket.receive,
                    global_snapshots,
                    context.history,
                    deltas=deltas,
                )
        finally:
            context.metrics.web_feeds.dec()
        if guard.cancelled_caught:
            await websocket.close(1001, SHUTTING_DOWN)

    # --- the dashboard ----------------------------------------------------------------------

    @app.get("/")
    async def root() -> Any:
        return await _static(INDEX)

    @app.get("/ui")
    async def ui() -> Any:
        return await _static(INDEX)

    @app.get("/ui/<path:asset>")
    async def ui_asset(asset: str) -> Any:
        return await _static(asset)

    async def _static(name: str) -> Any:
        found = context.static.lookup(name)
        if found is None:
            return _error(404, "no such file")
        response = Response(found.data, content_type=found.content_type)
        if found.content_type.startswith("text/html"):
            response.headers["Content-Security-Policy"] = PAGE_POLICY
        response.headers["Cache-Control"] = "no-cache"
        return response

    return app


def wait_answer(
    source: StateSource, params: WaitParams, verdict: Verdict | None, shutting_down: bool
) -> tuple[dict[str, Any], int]:
    """The body and status of a `/v1/wait_for` answer: `verdict` (None: there was none in time,
    or `shutting_down` cut the wait)."""
    if verdict is not None and verdict.failed:
        # Failed for good on some host (reverted, or a permanent error): no use waiting.
        failed = {host: dict(why) for host, why in verdict.failed.items()}
        return {"status": "failed", "hosts": list(verdict.hosts), "failed": failed}, 500
    if verdict is not None:
        return {"status": "ok", "hosts": list(verdict.hosts)}, 200
    if shutting_down:
        return {"error": SHUTTING_DOWN, "status": "unavailable"}, 503
    picture = source.picture()
    late = evaluate(params.name, params.image, picture.hosts, picture.records)
    body: dict[str, Any] = {
        "status": "timeout",
        "hosts": list(late.hosts),
        "pending": {host: dict(why) for host, why in late.pending.items()},
    }
    if source.stale:
        # No verdict from a picture that may be out of date, not even "no host runs it".
        body["stale"] = True
        body["read_at"] = source.read_at
        body["error"] = "Consul could not be read from this host: the picture is stale"
    elif not late.hosts:
        body["error"] = f"no host runs {params.name}"
    return body, 500


def _all_history(context: WebContext) -> dict[str, Any]:
    """Every service with deploys, and every service the store has (an empty list until its first
    deploy)."""
    services: dict[str, Any] = {name: [] for name in context.store.entries}
    services.update(context.history.view())
    return dict(sorted(services.items()))


def _wants_html() -> bool:
    # Browsers navigating to a page name text/html; API clients (and `*/*`) get JSON.
    return "text/html" in request.headers.get("Accept", "")


def _locked(page: StaticFile) -> tuple[Response, int]:
    response = Response(page.data, content_type=page.content_type)
    response.headers["Content-Security-Policy"] = page.policy or PAGE_POLICY
    response.headers["WWW-Authenticate"] = 'Bearer realm="condo"'
    return response, 401


def _foreign_host(host: str | None) -> tuple[Response, int]:
    message = (
        f"Host {host!r} is not allowed: condo answers loopback names, the address it listens on,"
        " and names given with --allowed-host"
    )
    return _error(403, message[:400])


def _full(kind: str, cap: int, option: str) -> tuple[Response, int]:
    response, status = _error(
        503, f"too many open {kind} (at most {cap}; see {option})", status="unavailable"
    )
    response.headers["Retry-After"] = "1"
    # The refused client hangs up at once, so its connection does not hold a descriptor either.
    response.headers["Connection"] = "close"
    return response, status


def _unauthorized() -> tuple[Response, int]:
    response, status = _error(401, "a valid API token is required (Authorization: Bearer TOKEN)")
    response.headers["WWW-Authenticate"] = 'Bearer realm="condo"'
    return response, status


def _text(error: BaseException | None) -> str | None:
    return None if error is None else str(error)
