"""A moto S3 server on 127.0.0.1 and a fault-injecting HTTP proxy in front of it."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode_aws_chunked(raw: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += raw[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


class FaultProxy:
    """Forwards S3 requests to `upstream`; `fault(method, path, n)` may answer instead, and
    `delay(method, path)` may hold a request back first (a slow PUT that lands late).

    `fault` returns None to forward, or an HTTP status to send back (with an S3-style body).
    `n` counts requests seen so far; `injected` counts the faults sent.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.fault = lambda method, path, n: None
        self.delay = lambda method, path: 0.0  # seconds to hold a request before forwarding it
        self.seen = 0
        self.injected = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                pause = proxy.delay(self.command, self.path)
                if pause:
                    time.sleep(pause)
                with proxy._lock:
                    proxy.seen += 1
                    status = proxy.fault(self.command, self.path, proxy.seen)
                    if status is not None:
                        proxy.injected += 1
                if status is not None:
                    code = {503: b"SlowDown", 403: b"AccessDenied"}.get(status, b"InternalError")
                    msg = b"<Error><Code>" + code + b"</Code><Message>injected fault</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if self.headers.get("Content-Encoding", "").lower() == "aws-chunked":
                    # unwrap the SDK's streaming framing so the upstream sees a plain body
                    body = _decode_aws_chunked(body)
                    drop = {"content-encoding", "x-amz-decoded-content-length", "x-amz-trailer"}
                    headers = {k: v for k, v in headers.items() if k.lower() not in drop}
                    headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in {"transfer-encoding", "content-length", "connection"}:
                        self.send_header(k, v)
                # a HEAD answer carries the object's length, not that of its (empty) body
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
