"""condo.web: the HTTP API, the websocket feed and the live dashboard's static files.

Modules, each owning one thing:
    app        `build_app(WebContext)`: the Quart-Trio routes, the token check, JSON errors
    serve      `ApiServer`, `serve_web`: the socket, hypercorn in condo's nursery, shutdown
    feed       `WS /v1/feed`: snapshot first, then the latest state on each change
    waitfor    `/v1/wait_for`'s parameters and its wait (condo.waiting.evaluate, no polling)
    local      `LocalSource`: the Store as a StateSource (wait_for without Consul)
    health     `EngineHealth`: the engine's ping for /healthz, cached and shared
    auth       the bearer-token check (constant time)
    hosts      which Host names the API answers, which Origin may open the feed
    slots      the caps on open waits and feeds (503 beyond them)
    lifecycle  `Closing`: wakes every waiting request at shutdown
    assets     the package's static files, served by exact name only
    openapi    the OpenAPI document of the routes

Nothing here imports condo.docker: the engine is reached through the small `EngineProbe` protocol.
"""

from condo.web.app import WebContext, build_app
from condo.web.local import LocalSource
from condo.web.serve import ApiServer, Condo, serve_web

__all__ = ["ApiServer", "Condo", "LocalSource", "WebContext", "build_app", "serve_web"]
