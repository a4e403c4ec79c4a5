"""Real transports for tests: an aiosmtpd SMTP sink, a local HTTP SMS webhook, and a local HTTP
server of JSON documents (an identity provider's JWKS)."""
from __future__ import annotations

import email
import email.policy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller

from fhir_dmp.runtime.embedded_db import free_port as _free_port


class Sink:
    """aiosmtpd handler that keeps what it receives."""

    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                       policy=email.policy.default)
        with self.lock:
            self.messages.append(msg)
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp():
    sink = Sink()
    port = _free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    yield sink, port
    ctl.stop()


class _LocalHttpServer:
    """A real threaded HTTP server on 127.0.0.1 for ``Handler``; ``url`` its base."""

    def _serve(self, handler: type[BaseHTTPRequestHandler], **serve_options) -> str:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs=serve_options, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SmsServer(_LocalHttpServer):
    def __init__(self, statuses=()):
        self.received: list[tuple[dict, dict]] = []
        self.statuses = list(statuses)  # status codes to answer first, then 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = outer.statuses.pop(0) if outer.statuses else 200
                if status == 200:
                    outer.received.append((json.loads(body), dict(self.headers)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.url = self._serve(Handler) + "/sms"


@pytest.fixture
def sms():
    server = SmsServer()
    yield server
    server.close()


class JwksServer(_LocalHttpServer):
    """A real HTTP server on 127.0.0.1 serving JSON documents by path."""

    def __init__(self):
        self.routes: dict[str, dict] = {}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hits[self.path] = hits.get(self.path, 0) + 1
                doc = routes.get(self.path)
                body = json.dumps(doc).encode() if doc is not None else b"{}"
                self.send_response(200 if doc is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.url = self._serve(Handler, poll_interval=0.02)


@pytest.fixture
def jwks_server():
    server = JwksServer()
    yield server
    server.close()
