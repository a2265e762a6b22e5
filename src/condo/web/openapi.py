"""The OpenAPI 3 document of condo's HTTP API (served at `/openapi.json`).

Hand-written, next to the routes it describes, and exact for the condo that serves it: bearer
auth, the 401 answers and the websocket's `?token=` are in the document only when condo runs
with `--api-token`, because without one no route asks for it; `/v1/global_state` answers 200
with `--expose consul` and always 400 without it.
tests/test_web.py compares its paths and methods with the app's url_map, so a route cannot be
added, renamed or removed without this document following; tests/integration/
test_openapi_conformance.py runs schemathesis against a real `condo run`, with and without a
token, so the parameters, status codes, bodies and content types cannot drift either. The
websocket `/v1/feed` is described as the GET that upgrades (OpenAPI has no websocket object) and
marked `x-websocket: true`; a plain GET of it answers 400.
"""

from __future__ import annotations

from typing import Any

import condo
from condo.deploys import MAX_ENTRIES, OUTCOMES
from condo.web.waitfor import MAX_IMAGE, MAX_NAME, MAX_TIMEOUT

PHASES = ["Init", "Wait", "TryAgain", "Stable", "WaitNext", "TryAgainNext"]


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _error(description: str) -> dict[str, Any]:
    return _json("Error", description)


_UNAUTHORIZED = _error("the request has no valid Bearer token (condo runs with --api-token)")
# The dashboard's pages answer a browser (Accept: text/html) with a page that asks for the token.
_PAGE_UNAUTHORIZED = {
    "description": "no valid Bearer token: JSON, or for a browser (Accept: text/html) the page "
    "that asks for the token",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}},
        "text/html": {},
    },
}
_FOREIGN_HOST = _error(
    "the Host is not localhost, 127.0.0.1, [::1], the --server address or an --allowed-host name"
)

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Container": {
        "type": "object",
        "required": ["id", "name", "image", "created_at", "stable_at"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "image": {"type": "string"},
            "created_at": {"type": "number", "description": "unix seconds"},
            "stable_at": {"type": ["number", "null"], "description": "unix seconds"},
        },
    },
    "Service": {
        "type": "object",
        "required": ["state", "current", "next", "retry_at", "error", "spec_error"],
        "properties": {
            "state": {"type": "string", "enum": PHASES},
            "current": {
                "oneOf": [{"$ref": "#/components/schemas/Container"}, {"type": "null"}],
                "description": "the container the state is about (in WaitNext: the stable one)",
            },
            "next": {
                "oneOf": [{"$ref": "#/components/schemas/Container"}, {"type": "null"}],
                "description": "the candidate in WaitNext",
            },
            "retry_at": {"type": ["number", "null"], "description": "unix seconds"},
            "error": {
                "type": ["object", "null"],
                "properties": {
                    "message": {"type": "string"},
                    "at": {"type": "number"},
                    "unobserved": {
                        "const": True,
                        "description": "the engine refuses condo: the state is not confirmed",
                    },
                },
            },
            "spec_error": {
                "type": ["object", "null"],
                "properties": {
                    "file": {"type": "string"},
                    "line": {"type": ["integer", "null"]},
                    "message": {"type": "string"},
                },
            },
            "image": {"type": ["string", "null"], "description": "the desired image"},
            "deploy": {"type": ["array", "null"], "description": '["Before"] or ["After", n]'},
            "deploying": {"type": ["string", "null"], "description": "image being deployed"},
            "draining": {"type": "boolean"},
            "attempt": {"type": "integer", "description": "consecutive failed attempts"},
            "failed": {"oneOf": [{"$ref": "#/components/schemas/Container"}, {"type": "null"}]},
            "removed": {"type": "boolean"},
            "probation_until": {
                "type": ["number", "null"],
                "description": "unix seconds: the Stable container is on probation until then "
                "(`condo wait` waits for it); null otherwise",
            },
            "reverted": {
                "type": ["object", "null"],
                "description": "the desired spec failed and `:on-failure :revert` went back to "
                "the last good one; the desired spec is not tried again until its container "
                "part changes",
                "required": ["from", "to", "reason", "at"],
                "properties": {
                    "from": {"type": "string", "description": "the failed image"},
                    "to": {
                        "type": "string",
                        "description": "the image serving again, as pinned: repo@sha256:... "
                        "(its registry digest), else its image id",
                    },
                    "reason": {"type": "string"},
                    "at": {"type": "number", "description": "unix seconds"},
                },
            },
            "spec_hash": {
                "type": ["string", "null"],
                "description": "the desired spec's container hash (label condo.spec-hash): "
                "a different one redeploys",
            },
            "serving_hash": {
                "type": ["string", "null"],
                "description": "the container hash of the container that serves (null: none); "
                "after a revert it is the last good spec's, not the desired one's",
            },
            "spec_fields": {
                "type": ["object", "null"],
                "description": "a fingerprint of each top-level key of the desired create body",
                "additionalProperties": {"type": "string"},
            },
            "options": {
                "type": ["object", "null"],
                "description": "the desired spec's keys that never replace a container "
                "(deploy, health_timeout, stop_timeout, stable_after, pull, on_failure, "
                "probation, proxy)",
            },
            "proxy": {
                "type": "array",
                "description": "each `:proxy` listener and the container it leads to (`to`: "
                "the Stable one, null while none is; `draining`: the old one of an [:After n])",
                "items": {
                    "type": "object",
                    "required": ["listen", "port", "mode", "to", "draining"],
                    "properties": {
                        "listen": {"type": "string"},
                        "port": {"type": "integer"},
                        "mode": {"type": "string", "enum": ["tcp", "http"]},
                        "to": {
                            "type": ["object", "null"],
                            "properties": {"id": {"type": "string"}, "name": {"type": "string"}},
                        },
                        "draining": {"type": "array", "items": {"type": "object"}},
                        "plane": {
                            "type": ["string", "null"],
                            "enum": ["nat", "haproxy", None],
                            "description": "the data plane that carries the listener (null "
                            "until the proxy task first routed it)",
                        },
                    },
                },
            },
            "warnings": {
                "type": "array",
                "items": {"type": "string"},
                "description": "what the desired spec allows but will not work as hoped",
            },
        },
    },
    "State": {
        "type": "object",
        "required": ["host", "services"],
        "properties": {
            "host": {"type": "string"},
            "services": {
                "type": "object",
                "additionalProperties": {"$ref": "#/components/schemas/Service"},
            },
            "self": {
                "type": "object",
                "description": "the last self-deploy (self.edn), present once one began",
                "required": ["hash", "state", "error"],
                "properties": {
                    "hash": {"type": "string"},
                    "state": {"enum": ["deploying", "waiting", "failed"]},
                    "error": {"type": ["string", "null"], "description": "why it failed"},
                },
            },
            "proxy": {
                "type": "object",
                "description": "present while the :proxy data plane (HAProxy) cannot run or be"
                " reached: why, since when (unix seconds)",
                "required": ["error", "at"],
                "properties": {"error": {"type": "string"}, "at": {"type": "number"}},
            },
        },
    },
    "GlobalState": {
        "type": "object",
        "required": ["hosts", "stale", "read_at"],
        "properties": {
            "hosts": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["services", "live", "last_seen"],
                    "properties": {
                        "services": {
                            "type": "object",
                            "description": "what the host publishes now (empty when not live)",
                            "additionalProperties": {"$ref": "#/components/schemas/Service"},
                        },
                        "live": {"type": "boolean", "description": "its session is alive"},
                        "last_seen": {
                            "type": ["number", "null"],
                            "description": "when it was last seen live (unix seconds); null "
                            "while live",
                        },
                        "runs": {
                            "type": "object",
                            "description": "its record: what it last said it runs",
                            "additionalProperties": {
                                "type": "object",
                                "properties": {
                                    "state": {"type": ["string", "null"]},
                                    "image": {"type": ["string", "null"]},
                                },
                            },
                        },
                    },
                },
            },
            "stale": {"type": "boolean", "description": "Consul could not be read lately"},
            "read_at": {
                "type": ["number", "null"],
                "description": "the last good read of Consul (unix seconds)",
            },
        },
    },
    "Pending": {
        "type": "object",
        "description": "host -> why it is not done yet",
        "additionalProperties": {
            "type": "object",
            "properties": {
                "state": {"type": "string", "enum": [*PHASES, "unreachable"]},
                "image": {"type": ["string", "null"]},
                "deploying": {"type": ["string", "null"]},
                "error": {"type": ["object", "null"]},
                "since": {
                    "type": ["number", "null"],
                    "description": "unreachable: when the host was last seen live",
                },
                "last_state": {
                    "type": ["string", "null"],
                    "description": "unreachable: the state it last published",
                },
            },
        },
    },
    "WaitDone": {
        "type": "object",
        "required": ["status", "hosts"],
        "properties": {
            "status": {"const": "ok"},
            "hosts": {"type": "array", "items": {"type": "string"}},
        },
    },
    "WaitTimeout": {
        "type": "object",
        "required": ["status", "pending"],
        "properties": {
            "status": {"const": "timeout"},
            "pending": {"$ref": "#/components/schemas/Pending"},
            "hosts": {"type": "array", "items": {"type": "string"}},
            "error": {"type": "string"},
            "stale": {"const": True, "description": "no verdict: Consul could not be read"},
            "read_at": {"type": ["number", "null"]},
        },
    },
    "WaitFailed": {
        "type": "object",
        "required": ["status", "failed"],
        "properties": {
            "status": {"const": "failed"},
            "failed": {
                "type": "object",
                "description": "the hosts where the image failed for good (reverted, or a "
                "permanent error such as an image that does not exist), with `reason`",
                "additionalProperties": {
                    "type": "object",
                    "required": ["reason"],
                    "properties": {"reason": {"type": "string"}},
                },
            },
            "hosts": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Forgotten": {
        "type": "object",
        "required": ["forgotten"],
        "properties": {"forgotten": {"type": "string"}},
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
            "host": {"type": "string"},
            "version": {"type": "string", "description": "condo's version"},
            "engine": {"type": "object"},
            "state_file": {"type": "object"},
            "time": {"type": "number", "description": "condo's clock (unix seconds)"},
            "error": {"type": "string"},
        },
    },
    "Deploy": {
        "type": "object",
        "description": "one deploy of one spec, its retries included",
        "required": [
            "image",
            "digest",
            "spec_hash",
            "strategy",
            "started_at",
            "stable_at",
            "ended_at",
            "outcome",
            "error",
        ],
        "properties": {
            "image": {"type": "string"},
            "digest": {
                "type": ["string", "null"],
                "description": "the image's RepoDigests entry (repo@sha256:...) once it turned "
                "stable; null for a local-only image",
            },
            "spec_hash": {"type": "string"},
            "strategy": {"type": "array", "description": '["Before"] or ["After", n]'},
            "started_at": {"type": "number", "description": "unix seconds"},
            "stable_at": {"type": ["number", "null"], "description": "unix seconds"},
            "ended_at": {"type": ["number", "null"], "description": "unix seconds"},
            "outcome": {"type": "string", "enum": list(OUTCOMES)},
            "error": {"type": ["string", "null"], "description": "why it failed"},
            "attempts": {"type": "integer", "description": "attempts of this spec in a row"},
            "container": {"type": ["string", "null"], "description": "its (last) container id"},
        },
    },
    "History": {
        "type": "object",
        "required": ["services"],
        "properties": {
            "services": {
                "type": "object",
                "description": f"service -> its last {MAX_ENTRIES} deploys, newest first",
                "additionalProperties": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/Deploy"},
                },
            },
        },
    },
    "FeedMessage": {
        "oneOf": [
            {"$ref": "#/components/schemas/FeedSnapshot"},
            {"$ref": "#/components/schemas/FeedGlobal"},
            {"$ref": "#/components/schemas/FeedGlobalDelta"},
            {"$ref": "#/components/schemas/FeedHistory"},
        ],
        "discriminator": {"propertyName": "type"},
    },
    "FeedSnapshot": {
        "type": "object",
        "description": "this host's state: always the first message, then one per change",
        "required": ["type", "version", "state"],
        "properties": {
            "type": {"const": "snapshot"},
            "version": {"type": "integer"},
            "state": {"$ref": "#/components/schemas/State"},
        },
    },
    "FeedGlobal": {
        "type": "object",
        "description": "every host's state (only with --expose consul): once, right after the "
        "first snapshot",
        "required": ["type", "token", "stale", "hosts"],
        "properties": {
            "type": {"const": "global"},
            "token": {"type": "integer", "description": "identifies the picture"},
            "stale": {"type": "boolean", "description": "Consul could not be read lately"},
            "read_at": {
                "type": ["number", "null"],
                "description": "when Consul was last read (unix seconds)",
            },
            "hosts": {"$ref": "#/components/schemas/GlobalState/properties/hosts"},
        },
    },
    "FeedGlobalDelta": {
        "type": "object",
        "description": "then one per new picture: the hosts whose body changed since the last "
        "message to this client, and the hosts gone; applied to what it has, the new picture",
        "required": ["type", "token", "stale", "hosts", "gone"],
        "properties": {
            "type": {"const": "global_delta"},
            "token": {"type": "integer", "description": "identifies the picture"},
            "stale": {"type": "boolean", "description": "Consul could not be read lately"},
            "read_at": {"type": ["number", "null"]},
            "hosts": {"$ref": "#/components/schemas/GlobalState/properties/hosts"},
            "gone": {"type": "array", "items": {"type": "string"}},
        },
    },
    "FeedHistory": {
        "type": "object",
        "description": "deploy history: every service's right after the first snapshot, then "
        "the whole list of each service whose history changed (latest value)",
        "required": ["type", "version", "services"],
        "properties": {
            "type": {"const": "history"},
            "version": {"type": "integer"},
            "services": {"$ref": "#/components/schemas/History/properties/services"},
        },
    },
}


def _page(summary: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "the page", "content": {"text/html": {}}}},
        }
    }


# Holds a character that `str.strip()` keeps: condo.web.waitfor strips `name` and `image` and
# refuses them blank. Spelled out because `\s` differs between Python, ECMA-262 (JSON Schema) and
# other regex engines (U+001C-U+001F, U+0085); these escapes read the same in all of them.
NOT_BLANK = r"[^\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def _text_parameter(name: str, max_length: int, description: str) -> dict[str, Any]:
    # Blank (all whitespace) or longer than max_length: 400 (the length counts before stripping
    # here, after it in the route: a longer padded value is the one thing the route accepts more).
    return {
        "name": name,
        "in": "query",
        "required": True,
        "description": description,
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": max_length,
            "pattern": NOT_BLANK,
        },
    }


def openapi_document(*, token: bool, consul: bool) -> dict[str, Any]:
    """The whole document (a fresh dict on each call) of a condo that runs with --api-token
    (`token`) or not, and with --expose consul (`consul`) or not."""
    paths: dict[str, Any] = {
        "/v1/state": {
            "get": {
                "summary": "This host's services",
                "responses": {"200": _json("State", "the state")},
            }
        },
        "/v1/history": {
            "get": {
                "summary": "This host's deploys, per service, newest first",
                "parameters": [
                    {
                        **_text_parameter("name", MAX_NAME, "only this service"),
                        "required": False,
                    }
                ],
                "responses": {
                    "200": _json("History", "the deploys"),
                    "400": _error("a blank or too long name"),
                    "404": _error("no such service on this host, nor in its history"),
                },
            }
        },
        "/v1/global_state": {
            "get": {
                "summary": "Every host's services, from Consul",
                "parameters": [
                    {
                        **_text_parameter("name", MAX_NAME, "only this service of each host"),
                        "required": False,
                    }
                ],
                "responses": (
                    {
                        "200": _json("GlobalState", "every host's state"),
                        "400": _error("a blank or too long name"),
                    }
                    if consul
                    else {"400": _error("this condo runs without --expose consul: always 400")}
                ),
            }
        },
        "/v1/hosts/{host}": {
            "delete": {
                "summary": "Forget a decommissioned host: waits no longer count it",
                "parameters": [
                    {"name": "host", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": (
                    {
                        "200": _json("Forgotten", "its record is gone"),
                        "404": _error("no such host under the prefix"),
                        "409": _error("the host is live"),
                        "503": _error("Consul cannot be read or refused"),
                    }
                    if consul
                    else {"400": _error("this condo runs without --expose consul: always 400")}
                ),
            }
        },
        "/v1/wait_for": {
            "get": {
                "summary": "Wait until every host running NAME has it Stable on IMAGE",
                "parameters": [
                    _text_parameter("name", MAX_NAME, "the service"),
                    _text_parameter("image", MAX_IMAGE, "the image it must be Stable on"),
                    {
                        "name": "timeout",
                        "in": "query",
                        "required": False,
                        "description": "seconds to wait; empty is the default",
                        # `timeout=` is the same as no timeout: the default.
                        "allowEmptyValue": True,
                        "schema": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": MAX_TIMEOUT,
                            "default": 60,
                        },
                    },
                ],
                "responses": {
                    "200": _json("WaitDone", "deployed everywhere it runs"),
                    "400": _error("missing or bad parameters"),
                    "500": {
                        "description": "the timeout passed (the pending hosts), or the image "
                        "failed for good on some host (answered at once)",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/WaitTimeout"},
                                        {"$ref": "#/components/schemas/WaitFailed"},
                                    ]
                                }
                            }
                        },
                    },
                    "503": _error(
                        "condo is shutting down, or too many waits are open (--max-waits); "
                        "answered at once"
                    ),
                },
            }
        },
        "/v1/feed": {
            "get": {
                "summary": "Websocket: the state now, then after every change (latest value)",
                "x-websocket": True,
                "parameters": [
                    {
                        "name": "global",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": ["whole", "delta"], "default": "whole"},
                        "description": "other hosts' pictures after the first: whole `global` "
                        "messages, or `global_delta` messages with only the hosts that changed",
                    }
                ],
                "responses": {
                    "101": {
                        "description": "upgraded; every message is a FeedMessage; closes with "
                        "1001 when condo shuts down",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/FeedMessage"}
                            }
                        },
                    },
                    "400": _error(
                        "not a websocket request, or a `global` other than whole or delta"
                    ),
                    "403": _error(
                        "a foreign Host, or an Origin that is not this API's own "
                        "(no Origin is fine)"
                    ),
                    "503": _error("too many feeds are open (--max-feeds); answered at once"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Whether the engine answers (no token needed)",
                "responses": {
                    "200": _json("Health", "ok, or degraded (the state file cannot be written)"),
                    "503": _json("Health", "the engine does not answer"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4)",
                "responses": {
                    "200": {"description": "metrics", "content": {"text/plain": {}}},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3", "content": {"application/json": {}}},
                },
            }
        },
        "/": _page("The dashboard"),
        "/ui": _page("The dashboard"),
        "/ui/{asset}": {
            "get": {
                "summary": "The dashboard's static files",
                "parameters": [
                    {"name": "asset", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "the file"},
                    "404": _error("no such file"),
                },
            }
        },
    }
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"].setdefault("403", _FOREIGN_HOST)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "condo",
            "version": condo.__version__,
            "description": "The HTTP API of `condo run`. Every error answer is JSON "
            '`{"error": "..."}` (but a browser asking a dashboard page without the token gets '
            "the page that asks for it). Every route answers 403 to a Host other than "
            "localhost, an IP address, the --server address and the --allowed-host names (any "
            "port). This condo runs "
            + (
                "with --api-token: every route but /healthz needs `Authorization: Bearer TOKEN` "
                "(the websocket also accepts `?token=`) and answers 401 without it."
                if token
                else "without --api-token: no route asks for a token."
            ),
        },
        "paths": paths,
        "components": {"schemas": _SCHEMAS},
    }
    if token:
        _require_token(document)
    return document


def _require_token(document: dict[str, Any]) -> None:
    """Bearer auth on every route but /healthz, their 401s, and the websocket's `?token=`."""
    document["security"] = [{"bearer": []}]
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "the --api-token"}
    }
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if path == "/healthz":
                operation["security"] = []
                continue
            unauthorized = _PAGE_UNAUTHORIZED if path in ("/", "/ui") else _UNAUTHORIZED
            operation["responses"]["401"] = unauthorized
    document["paths"]["/v1/feed"]["get"]["parameters"] += [
        {
            "name": "token",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "the API token, for clients that cannot set headers",
        },
    ]
