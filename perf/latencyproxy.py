"""A TCP proxy on 127.0.0.1 that adds round-trip time, like `tc netem delay`.

    python perf/latencyproxy.py UPSTREAM_HOST:PORT --rtt-ms 20

Every chunk of bytes is forwarded half the added round-trip time after it
arrived, in each direction, so a request and its answer take `--rtt-ms`
longer while the bytes of one connection still stream (a large PUT is not
held back a round trip per chunk). The bytes are not parsed or changed, so
SigV4 signatures and Content-MD5 stay valid. It prints `listening PORT` on
stdout once it accepts connections, and runs until stopped (SIGTERM).
bench.py starts it as a subprocess and stops it by its handle.
"""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from urllib.parse import urlsplit

CHUNK = 256 * 1024


class LatencyProxy:
    """This proxy, started as a subprocess in front of an http:// endpoint;
    `endpoint` is its URL. stop() ends it by its process handle."""

    def __init__(self, upstream_url, rtt_ms):
        parts = urlsplit(upstream_url)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"{parts.hostname}:{parts.port}", "--rtt-ms", str(rtt_ms)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the latency proxy did not start: {line.strip() or 'no output'}")
        self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


async def pump(reader, writer, delay):
    """Copy reader to writer, each chunk `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def send():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
        raise


async def handle(client_reader, client_writer, upstream, delay):
    host, port = upstream
    try:
        server_reader, server_writer = await asyncio.open_connection(host, port)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(pump(client_reader, server_writer, delay), pump(server_reader, client_writer, delay))
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass  # one side went away, or the proxy is stopping: drop both
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


async def serve(upstream, rtt_ms, port):
    delay = rtt_ms / 2000  # half the added round trip each way
    server = await asyncio.start_server(lambda r, w: handle(r, w, upstream, delay), "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("upstream", metavar="HOST:PORT")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time to add (default 20)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve((host, int(port)), args.rtt_ms, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
