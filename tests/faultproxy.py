"""An HTTP proxy that injects S3 faults between the tool and a real S3 server.

The tool is pointed at the proxy's URL; the proxy forwards each request
unchanged (Host header included, so SigV4 signatures stay valid) unless a
rule matches it, in which case it answers 503 SlowDown or 500, resets the
connection, or delays before forwarding; or it forwards the request and spoils
the answer's body: a 200 with a short body and a Content-Length to match
("short200"), a body cut off after the full Content-Length was announced
("cutoff", closed cleanly) or reset mid-body ("resetbody"); or it answers a
ranged GET as a server that ignores Range would, with 200 and a huge body
("ignorerange", counting in `sent` what the client let it send), or with
another range than was asked for ("shiftrange": the Content-Range moved by a
byte, the body spoilt). "acceptbaddigest" plays a server that does not
check Content-MD5: a write whose body does not hash to its Content-MD5 is
answered 200 (and dropped) instead of reaching the server. Rules fire a
bounded number of times.
"""

import base64
import hashlib
import http.client
import re
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by the test fault proxy</Message></Error>"
)


@dataclass
class Rule:
    action: str  # "503" | "500" | "reset" | "delay" | "corrupt" (flip a byte of the body)
    #              | "droppart" (a CompleteMultipartUpload that lists all but its last part)
    #              | "short200" | "cutoff" | "resetbody" (spoil the answer's body, see the module doc)
    #              | "ignorerange" | "shiftrange" (a wrong answer to a ranged GET, see the module doc)
    #              | "acceptbaddigest" (200 to a write whose body does not match its Content-MD5)
    method: str | None = None  # e.g. "PUT"; None: any
    path: str | None = None  # regex searched in the request path (with query)
    times: int | None = 1  # how often it fires; None: always
    delay: float = 0.0  # seconds, for "delay"
    fired: int = 0
    sent: int = 0  # body bytes the client took, for "ignorerange"

    def matches(self, method, path):
        if self.times is not None and self.fired >= self.times:
            return False
        if self.method and self.method != method:
            return False
        return not self.path or re.search(self.path, path) is not None


class FaultProxy:
    def __init__(self, upstream, tls=None):
        """`tls`: (certfile, keyfile) to serve HTTPS to the client side."""
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.rules = []
        self.lock = threading.Lock()
        self.requests = 0
        self.seen = []  # (method, path, headers, body) of every request, for wire checks
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy.match(self.command, self.path)
                proxy.record(self.command, self.path, dict(self.headers.items()), body)
                if rule and rule.action == "reset":
                    # RST instead of FIN: what a dying load balancer does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if rule and rule.action in ("503", "500"):
                    code = "SlowDown" if rule.action == "503" else "InternalError"
                    self.reply(int(rule.action), {"Content-Type": "application/xml"}, ERROR_BODY.format(code=code).encode())
                    return
                if rule and rule.action == "delay":
                    time.sleep(rule.delay)
                if rule and rule.action == "acceptbaddigest":
                    sent = {k.lower(): v for k, v in self.headers.items()}.get("content-md5")
                    digest = hashlib.md5(body).digest()
                    if sent and sent != base64.b64encode(digest).decode():
                        self.reply(200, {"ETag": f'"{digest.hex()}"'}, b"")
                        return
                if rule and rule.action == "corrupt" and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]  # a bit flip in transit
                if rule and rule.action == "droppart":
                    # blanked out, so the (signed) Content-Length still holds
                    body = re.sub(rb"<Part>(?:(?!<Part>).)*</Part>(?=</CompleteMultipartUpload>)",
                                  lambda m: b" " * len(m.group(0)), body, flags=re.S)
                self.forward(body, rule.action if rule else None, rule)

            def forward(self, body, spoil=None, rule=None):
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    headers = {k: v for k, v in answer.getheaders()
                               if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                    if spoil in ("short200", "cutoff", "resetbody") and answer.status in (200, 206) and len(data) > 1:
                        self.spoil_body(spoil, headers, data, answer.status)
                        return
                    if spoil == "ignorerange" and answer.status == 206:
                        self.flood({k: v for k, v in headers.items() if k.lower() != "content-range"}, rule)
                        return
                    if spoil == "shiftrange" and answer.status == 206:
                        name = next(key for key in headers if key.lower() == "content-range")
                        first, rest = headers[name].split(" ", 1)[1].split("-", 1)
                        last, length = rest.split("/")
                        headers[name] = f"bytes {int(first) + 1}-{int(last) + 1}/{length}"
                        self.reply(206, headers, bytes([data[0] ^ 0xFF]) + data[1:])
                        return
                    self.reply(answer.status, headers, data, head=self.command == "HEAD",
                               length=answer.getheader("Content-Length"))
                finally:
                    upstream.close()

            def flood(self, headers, rule, size=256 * 1024 * 1024):
                """200 with `size` bytes of body, as long as the client reads them."""
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                chunk = b"\0" * (1024 * 1024)
                try:
                    for _ in range(size // len(chunk)):
                        self.wfile.write(chunk)
                        rule.sent += len(chunk)
                except OSError:  # the client hung up
                    pass
                self.close_connection = True

            def spoil_body(self, how, headers, data, status=200):
                """Answer 200 (206 to a ranged GET) with only 60 % of the body (the ETag kept)."""
                part = data[:len(data) * 6 // 10]
                if how == "short200":
                    self.reply(status, headers, part)
                    return
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))  # the whole length, then less
                self.end_headers()
                self.wfile.write(part)
                self.wfile.flush()
                if how == "resetbody":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    self.connection.shutdown(socket.SHUT_WR)
                self.connection.close()
                self.close_connection = True

            def reply(self, status, headers, data, head=False, length=None):
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(length if head and length else len(data)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.endpoint = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def add(self, *rules):
        with self.lock:
            self.rules.extend(rules)

    def record(self, method, path, headers, body):
        with self.lock:
            self.seen.append((method, path, headers, body))

    def match(self, method, path):
        with self.lock:
            self.requests += 1
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.fired += 1
                    return rule
        return None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
