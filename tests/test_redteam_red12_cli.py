"""Red team of issue 12: `condo wait` leaves with os._exit once its verdict is printed (condo.cli
main). Its exit code must stay the verdict's, without a traceback, when its output cannot be
written: a reader that went away (`condo wait ... | head -c0`), or no stdout at all (`>&-`)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def condo_saying_ok() -> Iterator[str]:
    """A stand-in condo whose /v1/wait_for answers "done" at once; its URL."""

    class Condo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            wait = self.path.startswith("/v1/wait_for")
            answer = {"status": "ok", "hosts": ["h1"]} if wait else {"hosts": {}, "stale": False}
            body = json.dumps(answer).encode()
            self.send_response(200)
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


WAIT = [sys.executable, "-m", "condo", "wait", "--name", "web", "--image", "web:2"]


@pytest.mark.parametrize("stdout", ["reader gone", "closed"])
def test_condo_wait_keeps_its_verdict_when_its_output_cannot_be_written(stdout: str) -> None:
    with condo_saying_ok() as url:
        argv = [*WAIT, "--url", url, "--timeout", "5"]
        if stdout == "closed":
            done = subprocess.run(
                ["sh", "-c", 'exec "$@" >&-', "sh", *argv],
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
                check=False,
            )
        else:
            read, write = os.pipe()
            os.close(read)  # the reader went away before the verdict
            try:
                done = subprocess.run(
                    argv, stdout=write, stderr=subprocess.PIPE, text=True, timeout=30, check=False
                )
            finally:
                os.close(write)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0
