"""A stand-in condo for tests of the CLI's remote commands (`condo wait`): a real HTTP server on
loopback, in a thread, answering what the test says."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


@contextmanager
def stand_in_condo(status: int = 200, answer: Mapping[str, object] | None = None) -> Iterator[str]:
    """A stand-in condo (its URL) whose /v1/wait_for answers `status` and `answer` at once
    ("done" by default) and whose /v1/global_state shows no host."""
    said = {"status": "ok", "hosts": ["h1"]} if answer is None else answer

    class Condo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            wait = self.path.startswith("/v1/wait_for")
            body = json.dumps(said if wait else {"hosts": {}, "stale": False}).encode()
            self.send_response(status if wait else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Condo) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
