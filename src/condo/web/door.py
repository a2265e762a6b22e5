"""The API's front door: plain long-polls parked below hypercorn and answered in bulk, and the hot
`GET /v1/state`, both without hypercorn's or quart's per-request machinery.

Owns: the first look at every new connection (`Door.admit`, called from hypercorn's TCPServer
before it builds anything), the connections it takes (`conns`), their answers, and their next
requests until one is not the door's (then hypercorn serves that connection from there on).

Thousands of long-polls wait at once and are answered at once when a deploy turns Stable.
Through hypercorn each held a TCPServer, its h11 state, its tasks and quart's request objects
(≈ 20 kB), and each answer went alone through h11, a send lock, `send_all` and the keep-alive
timer (≈ 0.35 ms each, so the 10,000th came seconds after the first). Here a parked long-poll
is a `_Conn` (a plain socket, its key, its deadline) with no task and no hypercorn object; when
its (name, image)'s verdict is final (`SharedWaits.on_final`), one loop writes the same bytes,
encoded once, to every parked socket with a non-blocking send, and yields to the scheduler every
`BATCH` writes so that supervision runs in between; from SHARE_AT waiters a worker thread writes
half of them meanwhile (the sends alone: everything else stays on the Trio thread). One task
watches every door connection (an epoll of their own, edge-triggered): a hang-up closes it at
once (its slot is free), a next request is read without a task; one task keeps the deadlines.
`/v1/state` under load (8 clients asking as fast as they can) starved supervision: each answer
of quart and hypercorn took a millisecond of the one Trio thread. The door answers it with bytes
built once per store version and second (the body is the app's own, `encoded_state`).

What the door takes: a request read whole in one peek that is exactly `GET /v1/wait_for?...`
or `GET /v1/state` over HTTP/1.1, with one Host that is allowed, the token when one is
required, no body, no `Connection` other than keep-alive, and for a long-poll good parameters
and a free slot, while the source is fresh (Consul's idles until asked: the route reads first).
Anything else (a bad parameter too: its 400 is quart's) is left untouched in
the socket and hypercorn serves it, and the connection from then on. The answers are byte for
byte what hypercorn and quart would send (tests/test_web_serve.py compares them): the same
body, headers in the same order, h11's own encoding (`wire`), hypercorn's `date` header,
`connection: close` once closing or at hypercorn's keep-alive limit (then the door closes the
connection, as hypercorn would). An idle connection is closed after hypercorn's
`keep_alive_timeout`, as hypercorn would.
Linux only (epoll); elsewhere there is no door and hypercorn serves everything.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import itertools
import math
import re
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl
from wsgiref.handlers import format_date_time

import h11
import structlog
import trio
from werkzeug.datastructures import MultiDict

from condo.web.auth import bearer, token_matches
from condo.web.hosts import AllowedHosts
from condo.web.lifecycle import Closing
from condo.web.slots import Slots
from condo.web.waitfor import BadParams, SharedVerdict, SharedWaits, WaitParams, parse_wait_params

log = structlog.get_logger(__name__)

BATCH = 256  # writes between two checkpoints of the answering loop
SHARE_AT = 1000  # waiters of one answer from which a worker thread writes half of them
MAX_HEAD = 16 * 1024  # a longer head (or one not whole in the first read) goes to hypercorn

# The headers of every JSON answer of the API, after the app's own hardening, in quart's order
# (content-length goes second).
JSON_HEADERS = (
    (b"content-type", b"application/json"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(rb"/v1/wait_for(\?[\x21-\x7e]*)?|/v1/state")

# A connection's states: its long-poll waits; its answer is being written by a task of its own
# (the socket took only part of it); idle after its answer; closed or handed to hypercorn.
WAITING, SENDING, IDLE, DONE = 0, 1, 2, 3
HANG_UP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0
GONE = select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0  # not a half-close

Answer = tuple[dict[str, Any], int]  # body, status (condo.web.app.wait_answer)


class Hypercorn(Protocol):
    """hypercorn's TCPServer, as far as the door cares: what it needs to serve a connection."""

    app: Any
    config: Any
    context: Any
    state: Any
    stream: Any


def wire(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The bytes hypercorn's h11 protocol writes for this answer to a keep-alive HTTP/1.1 GET."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    connection.next_event()  # the request
    connection.next_event()  # its end
    parts = [
        connection.send(h11.Response(status_code=status, headers=headers)),
        connection.send(h11.Data(data=body)),
        connection.send(h11.EndOfMessage()),
    ]
    return b"".join(part or b"" for part in parts)


class _Conn:
    """One connection the door holds: waiting for its verdict, sending, or idle between requests.

    Its socket is a plain (non-blocking) one: a Trio socket only while a task finishes a write
    (`sending`) or once it goes to hypercorn.
    """

    __slots__ = (
        "deadline",
        "eof",
        "fd",
        "key",
        "params",
        "pending",
        "sending",
        "served",
        "sock",
        "state",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.key: SharedVerdict | None = None
        self.params: WaitParams | None = None
        self.deadline = math.inf
        self.state = IDLE
        self.pending = False  # its next request came before its answer went
        self.eof = False  # half-closed by the client while its answer was being written
        self.served = 0  # requests answered on this connection (hypercorn's keep-alive count)
        self.sending: trio.socket.SocketType | None = None


# What `Door._route` found in a request head: a long-poll's parameters, or the state route.
STATE = "state"
Route = WaitParams | str


class Door:
    """The front door of one served app (see the module's docstring)."""

    def __init__(
        self,
        *,
        shared: SharedWaits,
        slots: Slots,
        closing: Closing,
        allowed_hosts: AllowedHosts,
        api_token: str | None,
        answer: Callable[[WaitParams, Any, bool], Answer],
        dumps: Callable[[Any], str],
        gauge: Any,
        state: Callable[[], tuple[int, bytes]] | None = None,
    ) -> None:
        self.shared = shared
        self.slots = slots
        self.closing = closing
        self.allowed_hosts = allowed_hosts
        self.api_token = api_token
        self._answer = answer
        self._dumps = dumps
        self._gauge = gauge
        self._state = state
        self._state_answer: tuple[tuple[int, int], bytes] | None = None
        self.conns: dict[int, _Conn] = {}  # by descriptor: every connection the door holds
        self.encodes = 0  # answers encoded (tests: one per final verdict, not per waiter)
        self.writes = 0  # answers written
        self.thread_writes = 0  # ... of which by the worker thread (tests)
        self.share_at = SHARE_AT  # waiters of one answer from which a thread writes half
        self.handed = 0  # idle connections whose next request went through hypercorn's server
        self._epoll: Any = None
        self._nursery: trio.Nursery | None = None
        self._serve: Callable[[trio.SocketStream], Any] | None = None
        self._ready: list[SharedVerdict] = []
        self._wake = trio.Event()
        self._timers: list[tuple[float, int, _Conn]] = []  # the long-polls' deadlines
        # Idle connections' keep-alive deadlines: now + a constant, so in order (no heap).
        self._idle: collections.deque[tuple[float, _Conn]] = collections.deque()
        self._quiet = trio.Event()  # set while no bulk answer is being written
        self._quiet.set()
        self._timer_moved = trio.Event()
        self._seq = itertools.count()
        self._keep_alive = 5.0  # hypercorn's keep_alive_timeout, read from its config
        self._max_requests = 1000  # hypercorn's keep_alive_max_requests, likewise

    @staticmethod
    def available() -> bool:
        return hasattr(select, "epoll")

    # --- the first look at a connection ------------------------------------------------------

    async def admit(self, server: Hypercorn) -> bool:
        """Take `server`'s connection if its first request is the door's: True when the door
        owns it now (hypercorn must do nothing more), False to let hypercorn serve it."""
        if self._nursery is None or not isinstance(server.stream, trio.SocketStream):
            return False
        if self._serve is None:
            factory: Any = type(server)
            app, config, context, state = server.app, server.config, server.context, server.state
            self._serve = lambda stream: factory(app, config, context, state, stream).run()
            self._keep_alive = float(config.keep_alive_timeout)
            self._max_requests = int(config.keep_alive_max_requests)
        sock = server.stream.socket
        head = b""
        # Nothing asked within the keep-alive timeout, or condo stopping: closed, as hypercorn
        # closes an idle connection (it would hold shutdown for the graceful timeout).
        with self.closing.guard(), trio.move_on_after(self._keep_alive):
            try:
                head = await sock.recv(MAX_HEAD + 1, socket.MSG_PEEK)
            except OSError:
                head = b""
            if not head:  # hung up before asking anything
                sock.close()
                return True
        if not head:
            sock.close()
            return True
        try:
            found = self._route(head)
        except Exception:
            # A bug of the door never takes the API down: hypercorn serves this connection (the
            # request is still in the socket, only peeked at).
            log.exception("door.route_failed")
            return False
        if found is None:
            return False
        route, size = found
        # The socket leaves its stream (which Trio's serve_listeners closes when hypercorn's
        # handler returns) for a plain socket of the door's own on the same descriptor.
        conn = _Conn(socket.socket(fileno=sock.detach()))
        conn.sock.setblocking(False)
        self.conns[conn.fd] = conn
        # Edge-triggered: a hang-up, or the next request (taken once the answer is out).
        self._epoll.register(conn.fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._guarded(self._take, conn, route, size)
        return True

    def _guarded(self, handle: Callable[..., None], conn: _Conn, *args: Any) -> None:
        """`handle(conn, *args)`; a bug of the door (an exception) closes that one connection and
        is logged: it never takes the API, or condo, down."""
        try:
            handle(conn, *args)
        except Exception:
            log.exception("door.connection_failed")
            with contextlib.suppress(Exception):
                self._drop(conn)

    def _next(self, conn: _Conn) -> None:
        """The next request of an idle connection, read without waiting (its edge came)."""
        for _ in range(4):  # a few pipelined ones at most; then hypercorn reads the rest
            if conn.state != IDLE:
                return
            try:
                head = conn.sock.recv(MAX_HEAD + 1, socket.MSG_PEEK)
            except BlockingIOError:
                return  # nothing yet
            except OSError:
                head = b""
            if not head:
                self._drop(conn, hung_up=True)
                return
            found = self._route(head)
            if found is None:
                self._hand_over(conn)
                return
            self._take(conn, *found)
            if conn.state != IDLE and len(head) > found[1]:
                # A pipelined request is in the socket already: no edge will come for it, so
                # it is read once this answer is out.
                conn.pending = True
        if conn.state == IDLE:
            self._hand_over(conn)

    def _take(self, conn: _Conn, route: Route, size: int) -> None:
        """Serve the request `route` (its head, `size` bytes, is still in the socket)."""
        # Take the request out of the socket (it was only peeked at): what follows it, if
        # anything, is the connection's next request.
        conn.sock.recv(size)
        conn.served += 1
        last = conn.served >= self._max_requests  # hypercorn's keep-alive limit
        if isinstance(route, WaitParams):
            self._park(conn, route)
        else:
            conn.state = SENDING
            self._write(conn, self._state_bytes(last), last)

    def _route(self, data: bytes) -> tuple[Route, int] | None:
        """What the door does with the request at the start of `data` (and its head's size),
        or None: hypercorn serves it. A long-poll takes its slot here."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or self.closing.closed:
            return None
        target = self._plain_get(data[:end])
        if target is None:
            return None
        if target == b"/v1/state":
            return (STATE, end + 4) if self._state is not None else None
        params = self._wait_params(target)
        # A stale source (Consul's idle: nobody asked lately; or away) leaves the long-poll to
        # the route, which awaits a fresh picture first (a parked one has no task to await it).
        if params is None or self.shared.source.stale or not self.slots.try_take():
            return None
        return params, end + 4

    def _plain_get(self, head: bytes) -> bytes | None:
        """The target of a plain GET the door may answer (Host, token, no body), or None."""
        line, *lines = head.split(b"\r\n")
        method, _, rest = line.partition(b" ")
        target, _, version = rest.partition(b" ")
        if method != b"GET" or version != b"HTTP/1.1" or not _TARGET.fullmatch(target):
            return None
        host: bytes | None = None
        authorization: bytes | None = None
        for header in lines:
            name, colon, value = header.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                return None  # a folded line, a space before the colon: h11 judges it
            value = value.strip(b" \t")
            if not _VALUE.fullmatch(value):
                return None
            name = name.lower()
            if name == b"host":
                if host is not None:
                    return None
                host = value
            elif name == b"authorization":
                if authorization is not None:
                    return None
                authorization = value
            elif name == b"connection":
                if value.lower() != b"keep-alive":
                    return None
            elif name in (b"transfer-encoding", b"expect", b"upgrade") or (
                name == b"content-length" and value != b"0"
            ):
                return None  # a body, or a protocol switch: hypercorn and quart decide
        if host is None or not self.allowed_hosts.allows(host.decode("latin-1")):
            return None
        # Header values are latin-1 to quart (obs-text bytes too): read them alike, or a token
        # that is not UTF-8 would raise here, out of hypercorn's connection handler.
        if self.api_token is not None and not token_matches(
            self.api_token,
            bearer(None if authorization is None else authorization.decode("latin-1")),
        ):
            return None
        return target

    @staticmethod
    def _wait_params(target: bytes) -> WaitParams | None:
        _, _, query = target.partition(b"?")
        try:
            # What werkzeug's request.args does, so that both read the same parameters.
            args = MultiDict(
                parse_qsl(query.decode(), keep_blank_values=True, errors="werkzeug.url_quote")
            )
            params = parse_wait_params(args)
        except (BadParams, UnicodeError, LookupError, ValueError):
            return None  # quart answers it (a 400, with the reason)
        if not math.isfinite(params.timeout):
            return None
        return params

    # --- parked long-polls ------------------------------------------------------------------

    def _park(self, conn: _Conn, params: WaitParams) -> None:
        key = self.shared.join(params.name, params.image)
        conn.key, conn.params, conn.state = key, params, WAITING
        self._gauge.inc()
        key.parked.add(conn)
        if key.verdict is not None:
            self._answer_one(
                conn, self._shared_answer(key), functools.partial(self._final_answer, key)
            )
        else:
            self._arm(conn, trio.current_time() + params.timeout)

    def _unpark(self, conn: _Conn) -> None:
        """`conn` no longer waits: its slot, its gauge and its key go."""
        if conn.state != WAITING:
            return
        conn.state = SENDING
        key, conn.key = conn.key, None
        assert key is not None
        key.parked.discard(conn)
        self.shared.leave(key)
        self.slots.release()
        self._gauge.dec()

    def _drop(self, conn: _Conn, *, hung_up: bool = False) -> None:
        """Close `conn` (hung up, timed out idle, or answered for the last time)."""
        if conn.state == DONE:
            return  # closed already, or handed to hypercorn
        self._unpark(conn)
        conn.state = DONE
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            # (closing the descriptor takes it out of the epoll too)
        if not hung_up:  # a graceful close, as hypercorn's: our side's EOF first
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if conn.sending is not None:
            conn.sending.close()  # wakes the task writing the rest (Trio knows the socket)
        else:
            conn.sock.close()

    def _arm(self, conn: _Conn, deadline: float) -> None:
        conn.deadline = deadline
        if deadline == math.inf:
            return
        if not self._timers or deadline < self._timers[0][0]:
            self._timer_moved.set()
        heapq.heappush(self._timers, (deadline, next(self._seq), conn))
        if len(self._timers) > 2 * len(self.conns) + 64:
            # Mostly deadlines of answered long-polls (each held its connection): drop them.
            self._timers = [
                t for t in self._timers if t[2].deadline == t[0] and t[2].state == WAITING
            ]
            heapq.heapify(self._timers)

    # --- answers ------------------------------------------------------------------------------

    def on_final(self, key: SharedVerdict) -> None:
        """`SharedWaits`' hook: `key`'s verdict is final; answer its parked waiters."""
        if key.parked:
            self._ready.append(key)
            self._wake.set()

    def _encode(self, answer: Answer, *, closing: bool = False, last: bool = False) -> bytes:
        """The whole answer: `closing` (shutdown) or `last` (hypercorn's keep-alive limit) add
        `connection: close`, each where its author (the app, or hypercorn) puts it."""
        body, status = answer
        self.encodes += 1
        data = (self._dumps(body) + "\n").encode()
        return self._wire(status, data, closing=closing, last=last, stamp=time.time())

    @staticmethod
    def _wire(status: int, body: bytes, *, closing: bool, last: bool, stamp: float) -> bytes:
        headers = [JSON_HEADERS[0], (b"content-length", str(len(body)).encode()), *JSON_HEADERS[1:]]
        if closing:  # condo.web.serve.closing_connections' header, before hypercorn's own
            headers.append((b"connection", b"close"))
        headers.append((b"date", format_date_time(stamp).encode()))  # as hypercorn does
        if last:  # hypercorn's own, after its date
            headers.append((b"connection", b"close"))
        return wire(status, headers, body)

    def _shared_answer(self, key: SharedVerdict) -> bytes:
        if key.answer is None:
            key.answer = self._encode(self._final_answer(key))
        answer = key.answer
        assert isinstance(answer, bytes)
        return answer

    def _final_answer(self, key: SharedVerdict) -> Answer:
        params = WaitParams(name=key.name, image=key.image, timeout=0.0)
        return self._answer(params, key.verdict, False)

    def _state_bytes(self, last: bool = False) -> bytes:
        """`GET /v1/state`'s answer: the body encoded once per store version (the app's), the
        whole answer once per version and second (its `date`)."""
        assert self._state is not None
        version, body = self._state()
        stamp = (version, int(time.time()))
        if not last and self._state_answer is not None and self._state_answer[0] == stamp:
            return self._state_answer[1]
        data = self._wire(200, body, closing=False, last=last, stamp=stamp[1])
        if not last:
            self._state_answer = (stamp, data)
        return data

    def _answer_one(
        self,
        conn: _Conn,
        data: bytes,
        remake: Callable[[], Answer] | None = None,
        *,
        closing: bool = False,
    ) -> None:
        """Write a long-poll's answer (`closing`: the shutdown's, which closes the connection);
        `remake` gives its body and status again when the connection is at hypercorn's
        keep-alive limit (that answer says `connection: close` too, and closes it)."""
        self._unpark(conn)
        last = conn.served >= self._max_requests
        if last and remake is not None:
            data = self._encode(remake(), closing=closing, last=True)
        self._write(conn, data, closing or last)

    def _write(self, conn: _Conn, data: bytes, close: bool) -> None:
        """Write `data` to `conn` without blocking; a rest goes to a task of its own."""
        self.writes += 1
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client went away
            self._drop(conn, hung_up=True)
            return
        if sent < len(data):
            self._rest(conn, memoryview(data)[sent:], close)
        else:
            self._after(conn, close)

    def _rest(self, conn: _Conn, rest: memoryview, close: bool) -> None:
        """The rest of an answer the socket did not take at once: a task of its own writes it."""
        assert self._nursery is not None
        conn.sending = trio.socket.from_stdlib_socket(conn.sock)
        self._nursery.start_soon(self._finish, conn, rest, close)

    async def _finish(self, conn: _Conn, rest: memoryview, close: bool) -> None:
        sock = conn.sending
        assert sock is not None
        try:
            while rest:
                sent = await sock.send(rest)
                rest = rest[sent:]
        except (OSError, trio.ClosedResourceError):  # gone, dropped by TCP_USER_TIMEOUT
            self._drop(conn, hung_up=True)
            return
        conn.sending = None
        self._after(conn, close)

    def _after(self, conn: _Conn, close: bool) -> None:
        """An answer is out: close, or wait idle for the connection's next request."""
        if close or conn.eof or conn.state == DONE:
            self._drop(conn)
            return
        conn.state = IDLE
        conn.deadline = deadline = trio.current_time() + self._keep_alive
        if not self._idle:
            self._timer_moved.set()
        self._idle.append((deadline, conn))
        if conn.pending:  # its next request came meanwhile (its edge is spent: read it now)
            conn.pending = False
            self._next(conn)

    async def _answering(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            ready, self._ready = self._ready, []
            self._quiet = trio.Event()  # hang-ups wait: the answers go first
            for key in ready:
                began, cpu = time.monotonic(), time.thread_time()
                data = self._shared_answer(key)
                waiting = [c for c in cast("list[_Conn]", list(key.parked)) if c.state == WAITING]
                answered = len(waiting)
                # A large crowd is shared with a worker thread: send(2) on loopback is ~15 us of
                # kernel work each (the receiver's side included), done without the GIL, so two
                # threads write on both cores (10,000 answers: p99 -15 to -25 % in bench/api).
                # The worker only sends, to connections unparked here; their bookkeeping comes
                # back to this thread. (Not those at hypercorn's keep-alive limit: their answer
                # is another.)
                theirs: list[_Conn] = []
                if len(waiting) >= self.share_at:
                    middle = len(waiting) // 2
                    limit = self._max_requests
                    theirs = [c for c in waiting[middle:] if c.served < limit]
                    waiting = waiting[:middle] + [c for c in waiting[middle:] if c.served >= limit]
                    for conn in theirs:
                        self._unpark(conn)
                async with trio.open_nursery() as helping:
                    if theirs:
                        helping.start_soon(self._answer_in_thread, theirs, data)
                    for index, conn in enumerate(waiting):
                        if conn.state == WAITING:
                            self._answer_one(conn, data, functools.partial(self._final_answer, key))
                        if index % BATCH == BATCH - 1:
                            await trio.lowlevel.checkpoint()
                log.info(
                    "web.door.answered",
                    service=key.name,
                    image=key.image,
                    waiters=answered,
                    seconds=round(time.monotonic() - began, 4),
                    # (its CPU: the Trio thread's, the other tasks run at its checkpoints included)
                    cpu_seconds=round(time.thread_time() - cpu, 4),
                )
            self._quiet.set()

    async def _answer_in_thread(self, conns: list[_Conn], data: bytes) -> None:
        """Write `data` to `conns` (unparked) from a worker thread, then finish each here: the
        next request, a rest to write, a close at hypercorn's keep-alive limit, or a hang-up."""
        socks = [c.sock for c in conns]
        # Shielded: `conns` are unparked already, so a shutdown's cancel that came before the
        # thread started would leave them with no answer at all (`_close_all` answers only the
        # parked ones). The sends never block: the thread ends soon either way.
        try:
            with trio.CancelScope(shield=True):
                sent = await trio.to_thread.run_sync(_send_each, socks, data)
            self.thread_writes += len(conns)
        except RuntimeError:
            # No thread to be had ("can't start new thread": a pids limit): this thread sends
            # them itself, as below SHARE_AT, rather than leave them unanswered and the door down.
            log.warning("web.door.no_worker_thread", exc_info=True)
            sent = _send_each(socks, data)
        for conn, count in zip(conns, sent, strict=True):
            self.writes += 1
            if conn.state == DONE:
                continue  # dropped meanwhile (closed by `_close_all` at shutdown)
            if count < 0:
                self._drop(conn, hung_up=True)
            elif count < len(data):
                self._rest(conn, memoryview(data)[count:], False)
            else:
                self._after(conn, False)

    async def _watching(self) -> None:
        """Hang-ups of the door's connections, and the next requests of idle ones."""
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            # Again after each wake: a set event's `wait` is still a checkpoint, where a bulk
            # answer may begin (and its worker thread send to sockets a hang-up here would close).
            while not self._quiet.is_set():
                await self._quiet.wait()
            for fd, events in self._epoll.poll(0, 1024):
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if events & HANG_UP and conn.state == SENDING and not events & GONE:
                    # Half-closed after its request (`nc -N`): hypercorn finishes an answer it
                    # is writing, and so does the door; then it closes.
                    conn.eof = True
                elif events & HANG_UP:
                    # Hung up, or half-closed (hypercorn drops those too): closed right here, with
                    # no task, since every client of a bulk answer may do it at once.
                    self._drop(conn, hung_up=True)
                elif conn.state == IDLE:
                    self._guarded(self._next, conn)
                else:
                    conn.pending = True  # its next request, once its answer is out

    def _hand_over(self, conn: _Conn) -> None:
        """`conn`'s next request is hypercorn's (a task and a TCPServer, as for a new one)."""
        del self.conns[conn.fd]
        self._epoll.unregister(conn.fd)
        conn.state = DONE
        assert self._nursery is not None
        self._nursery.start_soon(self._next_request, conn.sock)

    async def _next_request(self, sock: socket.socket) -> None:
        # Through hypercorn's TCPServer.run, so through `admit` (which finds it is hypercorn's).
        assert self._serve is not None
        self.handed += 1
        await self._serve(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    async def _timing(self) -> None:
        while True:
            now = trio.current_time()
            # Thousands of long-polls sent with one timeout end together, each with an answer
            # of its own (~60 us): yield every BATCH of them, as the bulk answers do.
            done = 0
            while self._timers and self._timers[0][0] <= now:
                deadline, _, conn = heapq.heappop(self._timers)
                if conn.deadline != deadline or conn.state == DONE:
                    continue  # re-armed since, or gone
                if conn.state == WAITING:
                    assert conn.params is not None
                    answer = self._answer(conn.params, None, False)
                    self._answer_one(conn, self._encode(answer), functools.partial(_same, answer))
                    done += 1
                    if done % BATCH == 0:
                        await trio.lowlevel.checkpoint()
            while self._idle and self._idle[0][0] <= now:
                deadline, conn = self._idle.popleft()
                if conn.deadline == deadline and conn.state == IDLE:
                    self._drop(conn)  # idle for keep_alive_timeout, as hypercorn would
                    done += 1
                    if done % BATCH == 0:
                        await trio.lowlevel.checkpoint()
            self._timer_moved = trio.Event()
            soonest = min(
                self._timers[0][0] if self._timers else math.inf,
                self._idle[0][0] if self._idle else math.inf,
            )
            with trio.move_on_at(soonest):
                await self._timer_moved.wait()

    # --- serving ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the door open until `closing`; then answer every parked long-poll 503 (with
        `connection: close`) and close the idle connections. Connections handed to hypercorn
        after a door answer run in this task's nursery until they end."""
        self._epoll = select.epoll()
        self.shared.on_final = self.on_final
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async with trio.open_nursery() as loops:
                    loops.start_soon(self._answering)
                    loops.start_soon(self._watching)
                    loops.start_soon(self._timing)
                    task_status.started()
                    with self.closing.guard():
                        await trio.sleep(math.inf)  # until closing
                    loops.cancel_scope.cancel()
                self._close_all()
        finally:
            self._nursery = None
            self.shared.on_final = None
            for conn in list(self.conns.values()):
                self._drop(conn)
            self._epoll.close()

    def _close_all(self) -> None:
        shutting_down: tuple[bytes, Callable[[], Answer]] | None = None
        for conn in list(self.conns.values()):
            if conn.state == WAITING:
                if shutting_down is None:
                    assert conn.params is not None
                    answer = self._answer(conn.params, None, True)  # the same for every wait
                    remake = functools.partial(_same, answer)
                    shutting_down = self._encode(answer, closing=True), remake
                self._answer_one(conn, *shutting_down, closing=True)
            elif conn.state == IDLE:
                self._drop(conn)  # (SENDING ones close once their answer is out)


def _send_each(socks: list[socket.socket], data: bytes) -> list[int]:
    """In a worker thread: `data` sent once to each non-blocking socket; per socket the bytes it
    took (0: none for now), or -1 when it is gone."""
    sent: list[int] = []
    for sock in socks:
        try:
            sent.append(sock.send(data))
        except BlockingIOError:
            sent.append(0)
        except OSError:
            sent.append(-1)
    return sent


def _same(answer: Answer) -> Answer:
    return answer
