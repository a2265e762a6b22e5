"""The `condo` command line: cyclopts turns argv and `CONDO_*` env vars into calls.

Owns: building the cyclopts App (`build_app`, a fresh one per call: no module-level app) and the
console-script entry point `main`. Each command is a thin function that hands its arguments to
the module that does the work and returns the exit code; logic stays out of this module, except
`validate_files`, which is small and only ever used here.

Exit codes: 0 success, 1 the command's own failure (e.g. an invalid spec), 2 usage errors
(cyclopts reports those itself).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, TextIO

import structlog
from cyclopts import App, CycloptsError, Parameter
from cyclopts.config import Env

import condo
from condo import logs, remote
from condo.config import (
    DEFAULT_MAX_FEEDS,
    DEFAULT_MAX_WAITS,
    DEFAULT_SERVER,
    Config,
    parse_allowed_host,
    parse_notify_url,
    parse_server,
)
from condo.docker import ContainerId, open_docker
from condo.errors import ConfigError, SpecError
from condo.fds import raise_fd_limit
from condo.proxy.haproxy import socket_path_problem
from condo.proxy.reconcile import proxy_directory
from condo.run import serve
from condo.selfdeploy import HandOverPlan, run_hand_over
from condo.spec import (
    MAX_SPEC_BYTES,
    ServiceSpec,
    parse_self_spec,
    parse_spec,
    shared_listener_errors,
)

SELF_SPEC_NAME = "self.edn"


def build_app() -> App:
    """The whole CLI; every option is also read from `CONDO_<OPTION>` (without the command)."""
    app = App(
        name="condo",
        help="A simple, idempotent supervisor for Docker containers.",
        version=condo.__version__,
        backend="trio",
        config=Env(prefix="CONDO_", command=False),
    )
    app.command(run)
    app.command(wait)
    app.command(state, name="state")
    app.command(hosts, name="hosts")
    app.command(forget, name="forget")
    app.command(validate)
    # `condo plan` exits 2 for "changes" (terraform's -detailed-exitcode): its usage errors are
    # raised to `main`, which exits 1 for them, instead of cyclopts' 2.
    app.command(plan, exit_on_error=False)
    # Internal: run by condo itself in a short-lived container during a self-deploy.
    app.command(hand_over, name="hand-over", show=False)
    return app


def main() -> None:
    """Console-script entry point (`condo = "condo.cli:main"`); exits with the command's code."""
    try:
        build_app()()
    except CycloptsError:  # only `condo plan`'s usage errors get here, already printed
        sys.exit(1)
    except SystemExit as done:
        if sys.argv[1:2] == ["wait"]:
            # CI waits on this exit: tearing down the interpreter (every module condo imports)
            # took 150-300 ms after the answer. Nothing is left to clean up but the output.
            code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
            for stream in (sys.stdout, sys.stderr):
                # None when closed (`>&-`); a reader gone (EPIPE): the verdict's code stands.
                with contextlib.suppress(AttributeError, OSError, ValueError):
                    stream.flush()
            os._exit(code)
        raise


def _commas(_type: object, value: str, delimiter: str | None = None) -> list[str]:
    """CONDO_ALLOWED_HOST, CONDO_NOTIFY: a comma-separated list (cyclopts would split on blanks)."""
    del _type, delimiter  # cyclopts' env_var_split signature
    return [part.strip() for part in value.split(",") if part.strip()]


# --- run -----------------------------------------------------------------------------------------


async def run(
    prefixes: Annotated[list[Path], Parameter(negative=())],
    /,
    *,
    state: Path = Path("condo-state.json"),
    server: str = DEFAULT_SERVER,
    server_reuse_port: bool = False,
    docker: str = "unix:///var/run/docker.sock",
    docker_config: Path | None = None,
    host: str | None = None,
    expose: Literal["none", "consul"] = "none",
    consul_endpoint: str = "http://127.0.0.1:8500",
    consul_prefix: str = "condo",
    consul_token: str | None = None,
    api_token: str | None = None,
    allowed_host: Annotated[list[str] | None, Parameter(negative=(), env_var_split=_commas)] = None,
    max_waits: int = DEFAULT_MAX_WAITS,
    max_feeds: int = DEFAULT_MAX_FEEDS,
    notify: Annotated[list[str] | None, Parameter(negative=(), env_var_split=_commas)] = None,
    stop_on_exit: bool = False,
    proxy_plane: Literal["auto", "haproxy"] = "auto",
    log_format: Literal["auto", "console", "json"] = "auto",
) -> int:
    """Keep exactly the containers the spec files in PREFIX... describe running.

    SIGTERM/SIGINT persist the state and exit 0, leaving every workload running (unless
    --stop-on-exit); SIGHUP re-reads the registry credentials.

    Parameters
    ----------
    prefixes
        Directories whose *.edn files are the services.
    state
        The state file (written atomically after every change).
    server
        [HOST:]PORT for the HTTP API (a bare PORT binds 127.0.0.1), or "off".
    server_reuse_port
        Listen with SO_REUSEPORT, so that a successor condo (self-deploy with host networking)
        can listen on the same port before this one stops: a self-deploy without API gap.
    docker
        The engine: unix:///path or tcp://HOST:PORT.
    docker_config
        Docker's config.json for registry credentials (default: $DOCKER_CONFIG/config.json,
        then ~/.docker/config.json).
    host
        This condo's name (default: the machine's hostname); it labels every container.
    expose
        Publish the state to Consul ("consul") or not ("none").
    consul_endpoint
        Consul's HTTP address.
    consul_prefix
        The Consul KV prefix for condo's keys.
    consul_token
        Sent to Consul as X-Consul-Token.
    api_token
        When set, every API route but /healthz needs "Authorization: Bearer TOKEN".
    allowed_host
        A Host name the API answers besides localhost, 127.0.0.1, ::1 and the --server address
        (any port; repeat the option for several; CONDO_ALLOWED_HOST takes a comma-separated list).
    max_waits
        At most this many /v1/wait_for long-polls at once (503 beyond; fewer if the open-files
        limit is low).
    max_feeds
        At most this many /v1/feed websockets at once (503 beyond; fewer if the open-files limit
        is low).
    notify
        POST a JSON notice to this URL on every deploy started, stable or failed and every
        service removed (repeat the option for several; CONDO_NOTIFY takes a comma-separated
        list).
    stop_on_exit
        Stop and remove every workload on SIGTERM/SIGINT (the original condo's behaviour).
    proxy_plane
        The data plane of :proxy's :tcp listeners: "auto" (the kernel's NAT when condo can use
        nftables, else HAProxy) or "haproxy" (always; :http listeners always use HAProxy).
    log_format
        "json", "console", or "auto" (JSON unless stderr is a terminal).
    """
    logs.configure(log_format)
    # Each wait and feed holds a descriptor: take all the kernel allows (condo.fds).
    before, after = raise_fd_limit()
    structlog.get_logger(__name__).info("condo.open_files", soft_limit=after, was=before)
    try:
        config = Config(
            prefixes=tuple(prefixes),
            state_path=state,
            docker_url=docker,
            docker_config=docker_config,
            host=host or socket.gethostname(),
            server=parse_server(server, reuse_port=server_reuse_port),
            stop_on_exit=stop_on_exit,
            proxy_plane=proxy_plane,
            expose=expose,
            consul_endpoint=consul_endpoint,
            consul_prefix=consul_prefix,
            consul_token=consul_token,
            api_token=api_token,
            allowed_hosts=tuple(parse_allowed_host(name) for name in allowed_host or ()),
            max_waits=max_waits,
            max_feeds=max_feeds,
            notify_urls=tuple(parse_notify_url(url) for url in notify or ()),
        )
        config.check()
        await serve(config)
    except ConfigError as exc:
        print(f"condo: {exc}", file=sys.stderr)
        return 2
    return 0


# --- hand-over (internal) -------------------------------------------------------------------------


async def hand_over(
    *,
    old: str,
    new: str,
    self_hash: str,
    state: Path,
    docker: str = "unix:///var/run/docker.sock",
) -> int:
    """Stop condo OLD, start NEW and keep it if healthy, else bring OLD back (self-deploy).

    Parameters
    ----------
    old
        The running condo's container.
    new
        Its successor's container (created, not started).
    self_hash
        The successor's self.edn hash (remembered in the state file if it fails).
    state
        The state file, at the same path as in the old condo.
    docker
        The engine.
    """
    logs.configure("json")
    plan = HandOverPlan(
        old=ContainerId(old), new=ContainerId(new), hash=self_hash, state_path=state,
        docker_url=docker,
    )  # fmt: skip
    async with open_docker(docker) as client:
        return await run_hand_over(client, plan)


# --- wait / state -----------------------------------------------------------------------------


async def wait(
    *,
    name: str,
    image: str,
    timeout: float = 300.0,  # noqa: ASYNC109 -- the contract's --timeout, sent to the server
    url: str = remote.DEFAULT_URL,
    api_token: str | None = None,
) -> int:
    """Block until every host that runs NAME is Stable on IMAGE (for CI).

    Prints progress; exit 0 when done, 1 on timeout (naming the hosts still pending), 2 on usage
    or connection errors, 3 as soon as IMAGE failed for good on some host (reverted, or a
    permanent error such as an image that does not exist), naming the host and the reason.

    Parameters
    ----------
    name
        The service (its spec file's name without .edn).
    image
        The image every host must run it on, exactly as in the spec.
    timeout
        Seconds to wait (at most 3600).
    url
        A condo's HTTP API.
    api_token
        The condo's --api-token, if it has one.
    """
    # No stdout at all (`condo wait ... >&-`): the exit code alone says the verdict.
    out = sys.stdout if sys.stdout is not None else io.StringIO()
    return await remote.wait(
        name, image, wait_seconds=timeout, url=url, api_token=api_token, out=out
    )


async def state(*, url: str = remote.DEFAULT_URL, api_token: str | None = None) -> int:
    """Print every service of every host (all hosts when condo exposes to Consul).

    Parameters
    ----------
    url
        A condo's HTTP API.
    api_token
        The condo's --api-token, if it has one.
    """
    return await remote.state(url=url, api_token=api_token, out=sys.stdout)


async def hosts(*, url: str = remote.DEFAULT_URL, api_token: str | None = None) -> int:
    """List every host in Consul: whether it is live, when it was last seen, what it runs.

    A host that is not live (cut off, its condo stopped or killed, its agent dead) still counts
    for `condo wait` until it comes back or is forgotten.

    Parameters
    ----------
    url
        A condo's HTTP API (one that runs with --expose consul).
    api_token
        The condo's --api-token, if it has one.
    """
    return await remote.hosts(url=url, api_token=api_token, out=sys.stdout)


async def forget(
    decommissioned: str, /, *, url: str = remote.DEFAULT_URL, api_token: str | None = None
) -> int:
    """Forget a decommissioned host: `condo wait` stops counting it. Refused while it is live.

    Parameters
    ----------
    decommissioned
        The host's --host name, as `condo hosts` lists it. (Not named HOST: CONDO_HOST, the
        --host of `condo run`, must never pick the host to forget.)
    url
        A condo's HTTP API (one that runs with --expose consul).
    api_token
        The condo's --api-token, if it has one.
    """
    return await remote.forget(decommissioned, url=url, api_token=api_token, out=sys.stdout)


# --- plan -----------------------------------------------------------------------------------------


async def plan(
    prefixes: Annotated[list[Path], Parameter(negative=())],
    /,
    *,
    url: str = remote.DEFAULT_URL,
    api_token: str | None = None,
    all: Annotated[bool, Parameter(negative=())] = False,  # noqa: A002 -- the contract's --all
) -> int:
    """Show what the spec files in PREFIX... would change in what a running condo runs.

    One line per service: "+ create", "~ redeploy" (the container fields that differ, image
    a → b), "= update in place" (keys that never touch the container), "- remove", "! invalid"
    (file:line: message). It changes nothing. Exit 0 no change, 2 changes, 1 invalid specs or
    errors.

    Parameters
    ----------
    prefixes
        Spec directories, as `condo run` would be given them.
    url
        The running condo's HTTP API.
    api_token
        The condo's --api-token, if it has one.
    all
        Also list the services that would not change.
    """
    return await remote.plan(
        prefixes, url=url, api_token=api_token, show_unchanged=all, out=sys.stdout
    )


# --- validate -------------------------------------------------------------------------------------


def validate(
    files: Annotated[list[str], Parameter(negative=())],
    /,
    *,
    state: Path = Path("condo-state.json"),
) -> int:
    """Check spec files without running anything.

    Prints "FILE: ok" for each valid file and "FILE:LINE: message" on stderr for each invalid
    one. A file named self.edn is checked as condo's own bare container spec. Exit code 0 when
    every file is valid, else 1.

    Parameters
    ----------
    files
        Spec files (*.edn) to check.
    state
        The state file `condo run` is given: a `:proxy` spec is warned when the proxy's sockets
        beside it would have too long a path.
    """
    return validate_files(files, sys.stdout, sys.stderr, state=state)


def validate_files(
    files: Sequence[str], out: TextIO, err: TextIO, *, state: Path = Path("condo-state.json")
) -> int:
    """Check each file, report on `out` / `err` (naming files as given); 0 when all are valid."""
    failed = False
    clashes = _shared_listeners(files)
    # Known without running anything: HAProxy could not make its sockets beside this state.
    sockets = socket_path_problem(proxy_directory(state))
    for file in files:
        problem = check_file(file) or clashes.get(file)
        if problem is None:
            print(f"{file}: ok", file=out)
            for warning in spec_warnings(file, sockets):
                print(f"{file}: warning: {warning}", file=err)
        else:
            failed = True
            print(problem, file=err)
    return 1 if failed else 0


def _shared_listeners(files: Sequence[str]) -> dict[str, SpecError]:
    """The files among `files` whose `:proxy` listen addresses clash with another's (as spec
    directories report them: an error of both)."""
    specs: dict[str, tuple[str, ServiceSpec]] = {}
    for file in files:
        path = Path(file)
        if path.name == SELF_SPEC_NAME or check_file(file) is not None:
            continue
        try:
            specs[file] = (file, parse_spec(path.read_bytes(), file))
        except (OSError, SpecError):  # changed since check_file: it will say so itself
            continue
    return shared_listener_errors(specs)


def spec_warnings(file: str, sockets: str | None = None) -> tuple[str, ...]:
    """What a valid service spec allows but will not work as hoped (ServiceSpec.warnings);
    `sockets`: why the proxy cannot run, a warning of every spec with `:proxy`."""
    path = Path(file)
    if path.name == SELF_SPEC_NAME:
        return ()
    try:
        spec = parse_spec(path.read_bytes(), file)
    except (OSError, SpecError):  # check_file just read and parsed it: a race, nothing to warn
        return ()
    if spec.proxy and sockets is not None:
        return (*spec.warnings, f":proxy cannot run: {sockets}")
    return spec.warnings


def check_file(file: str) -> SpecError | None:
    """None when `file` holds a valid spec (self.edn: a valid self spec), else the problem."""
    path = Path(file)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            return SpecError(file, "is a directory, not a spec file")
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            return SpecError(file, "is not a regular file")
        with path.open("rb") as handle:
            # One byte more than allowed is enough for parse_spec to say "too large".
            data = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:  # missing, unreadable, ...: this file is bad, the others still count
        return SpecError(file, f"cannot read the file: {exc.strerror or exc}")
    try:
        if path.name == SELF_SPEC_NAME:
            parse_self_spec(data, file)
        else:
            parse_spec(data, file)
    except SpecError as exc:
        return exc
    return None
