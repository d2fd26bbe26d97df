"""A fault-injecting HTTP proxy on loopback, in front of an S3 server (moto's), for tests.

    proxy = FaultProxy(upstream="http://127.0.0.1:PORT", seed=0, slowdown=0.05, reset=0.02)
    proxy.start()            # proxy.endpoint: point AWS_ENDPOINT_URL at it
    ...
    proxy.stop(); proxy.counts  # {"requests": .., "slowdown": .., "error500": .., "reset": .., "slow": ..}

Each request draws one number from a seeded generator and, by the rates given, is
answered 503 SlowDown or 500 InternalError (S3's XML bodies), has its connection reset
(RST, no answer), is held ``slow_seconds`` before being forwarded, or is forwarded as it
is. A faulted request never reaches the server, so a retry is always safe. Plain
Python (stdlib): a ThreadingHTTPServer and http.client.
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "error500", "reset", "slow")
_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
        '<RequestId>fault-proxy</RequestId></Error>')


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0, slowdown: float = 0.0, error500: float = 0.0,
                 reset: float = 0.0, slow: float = 0.0, slow_seconds: float = 0.5):
        self.upstream = urlsplit(upstream)
        self.rates = {"slowdown": slowdown, "error500": error500, "reset": reset, "slow": slow}
        self.slow_seconds = slow_seconds
        self.counts = {"requests": 0, **{fault: 0 for fault in FAULTS}}
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def draw(self) -> str | None:
        """The fault for the next request (or None), counted."""
        with self._lock:
            self.counts["requests"] += 1
            u, edge = self._random.random(), 0.0
            for fault in FAULTS:
                edge += self.rates[fault]
                if u < edge:
                    self.counts[fault] += 1
                    return fault
        return None


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self, status: int, code: str, message: str) -> None:
            body = _XML.format(code=code, message=message).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends RST, as a dropped connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _forward(self, body: bytes) -> None:
            upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection", "expect")}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            self.send_response_only(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            # HEAD: the upstream's Content-Length describes the object, not this empty body.
            length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _handle(self) -> None:
            body = self._body()
            fault = proxy.draw()
            if fault == "reset":
                return self._reset()
            if fault == "slowdown":
                return self._answer(503, "SlowDown", "Please reduce your request rate.")
            if fault == "error500":
                return self._answer(500, "InternalError", "We encountered an internal error. Please try again.")
            if fault == "slow":
                time.sleep(proxy.slow_seconds)
            self._forward(body)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
