"""An HTTP/1.1 proxy in front of the local S3 endpoint that behaves like a remote object store's
per-connection limits: each client connection moves at most ``rate`` bytes/s each way, and every
response waits ``latency`` seconds before its first byte. On loopback a single GET is as fast as a
concurrent batch; through this proxy only parallel connections buy throughput, so the benchmarks
and tests can see whether reads and uploads really run concurrently. It counts requests, body bytes
each way and the peak number of requests in flight."""

from __future__ import annotations

import http.client
import select
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


# Bodies move in chunks of this size; smaller ones cost more GIL hand-offs per byte (with 16
# connections, moto and the client in one process on 2 cores, 64 KiB gives ~130 MB/s in all, 256 KiB ~170).
CHUNK = 256 * 1024
SLACK = 0.01
# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade"}


class _Pacer:
    """A token bucket: lets ``rate`` bytes/s through, with credit for at most ``SLACK`` seconds, so a
    chunk sent late (a busy GIL) is made up but an idle connection does not save up a burst."""

    def __init__(self, rate: float) -> None:
        self.rate, self.due = rate, 0.0

    def take(self, n: int) -> None:
        now = time.monotonic()
        self.due = max(self.due, now - SLACK) + n / self.rate
        if self.due > now:
            time.sleep(self.due - now)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops SYNs when a pool opens many connections at once


class ThrottleProxy:
    """Forwards to ``upstream`` at ``rate`` bytes/s per client connection in each direction, with
    ``latency`` seconds before each response. Counters: ``requests``, ``received`` (request body
    bytes by method), ``sent`` (response body bytes), ``in_flight`` and ``peak_in_flight``.

    ``drop`` names request headers never forwarded: a store behind it then behaves like one that
    ignores them (``if-none-match`` and ``if-match``: a store without conditional writes;
    ``x-amz-copy-source-range``: one that copies whole objects into a part). Only an upstream that
    does not check signatures (moto) accepts such requests."""

    def __init__(self, upstream: str, rate: float = 20e6, latency: float = 0.02, drop: tuple[str, ...] = ()) -> None:
        self.upstream = urlparse(upstream)
        self.rate, self.latency = rate, latency
        self.drop = {h.lower() for h in drop}
        self.lock = threading.Lock()
        self.in_flight = 0
        self.reset()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Zero the counters; the peak restarts from the requests in flight now."""
        with self.lock:
            self.requests = self.sent = 0
            self.received: Counter[str] = Counter()
            self.peak_in_flight = self.in_flight

    def _begin(self) -> None:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _end(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def _received(self, method: str, n: int) -> None:
        with self.lock:
            self.received[method] += n

    def _sent(self, n: int) -> None:
        with self.lock:
            self.sent += n

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self
        host, port = self.upstream.hostname, self.upstream.port

        class _Handler(BaseHTTPRequestHandler):
            # One instance serves one client connection for its whole keep-alive life. For
            # "Expect: 100-continue" BaseHTTPRequestHandler sends "100 Continue" itself before
            # do_*, so the header is stripped upstream (http.client cannot wait for a 100).
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.upstream = http.client.HTTPConnection(host, port, timeout=60)
                self.pace_in, self.pace_out = _Pacer(proxy.rate), _Pacer(proxy.rate)

            def finish(self) -> None:
                self.upstream.close()
                super().finish()

            def _handle(self) -> None:
                proxy._begin()
                try:
                    self._forward()
                except (OSError, http.client.HTTPException):
                    # Either side failed mid-exchange: neither connection can be reused, so both
                    # are closed; the client sees a dropped connection and retries.
                    self.upstream.close()
                    self.close_connection = True
                finally:
                    proxy._end()

            def _forward(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    self.send_error(411, "Send Content-Length")  # botocore always does
                    return
                up = self.upstream
                if up.sock is not None and select.select([up.sock], [], [], 0)[0]:
                    up.close()  # an idle connection that reads as ready was closed upstream; reopen
                named = {h.strip().lower() for h in self.headers.get("Connection", "").split(",")}
                # Host goes through as the client sent it: S3 signatures (SigV4) cover it.
                drop = HOP_BY_HOP | named | {"host", "expect"} | proxy.drop
                up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                up.putheader("Host", self.headers.get("Host", f"{host}:{port}"))
                for k, v in self.headers.items():
                    if k.lower() not in drop:
                        up.putheader(k, v)
                up.endheaders()
                left = int(self.headers.get("Content-Length", 0) or 0)
                while left:
                    chunk = self.rfile.read(min(CHUNK, left))
                    if not chunk:
                        raise ConnectionError("client closed the connection mid-body")
                    self.pace_in.take(len(chunk))
                    proxy._received(self.command, len(chunk))
                    up.send(chunk)
                    left -= len(chunk)

                resp = up.getresponse()
                time.sleep(proxy.latency)
                has_body = self.command != "HEAD" and resp.status >= 200 and resp.status not in (204, 304)
                chunked = has_body and resp.getheader("Content-Length") is None
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := resp.read(CHUNK):
                    self.pace_out.take(len(chunk))
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                    proxy._sent(len(chunk))
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return _Handler

    def __enter__(self) -> "ThrottleProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
