#!/usr/bin/env python3
"""A stand-in coordinator for bench/idle-sync.sh, and the load driver that
plays a fleet against it. Standard library only (asyncio), loopback only.

  serve PORT ECHO DOCUMENT STATS
      Answers POST /v1/nodes/{id}/sync the way a coordinator that keeps node
      status would: a body is parsed as JSON and stored per node with its
      Fleet-Status-Digest; the answer is 304 when If-None-Match is the
      document's ETag, else 200 with DOCUMENT. With ECHO=1 every answer carries
      Fleet-Status-Digest naming the status it holds for that node (the node
      then omits unchanged bodies); with ECHO=0 it never does (a coordinator
      from before the digest). On SIGUSR1 and SIGTERM writes STATS (JSON: requests, bytes
      received, bodies parsed, the last whole body).

  drive PORT RATE SECONDS NODES CONNECTIONS BODY MODE
      Sends RATE syncs per second for SECONDS, round-robin over NODES node
      ids, on CONNECTIONS keep-alive connections, each with If-None-Match of
      the document: MODE=full sends BODY (a real node's report) every time,
      MODE=digest sends the digest header only (what an idle node sends once
      the coordinator echoed it). Prints JSON: sent, answered, achieved rate,
      p50/p99 latency in ms.
"""
import asyncio
import json
import signal
import sys
import time

ETAG = '"bench-doc-1"'


def serve(port, echo, document_path, stats_path):
    document = open(document_path, "rb").read()
    held = {}
    stats = {"requests": 0, "bytes_received": 0, "bodies_parsed": 0, "last_body": None}

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                stats["requests"] += 1
                stats["bytes_received"] += len(head) + len(body)
                node = path.removeprefix("/v1/nodes/").removesuffix("/sync")
                if body:
                    report = json.loads(body)
                    held[node] = (headers.get("fleet-status-digest"), report)
                    stats["bodies_parsed"] += 1
                    stats["last_body"] = body.decode()
                extra = ""
                if echo and node in held and held[node][0]:
                    extra = f"Fleet-Status-Digest: {held[node][0]}\r\n"
                if headers.get("if-none-match") == ETAG:
                    out = f"HTTP/1.1 304 Not Modified\r\nETag: {ETAG}\r\n{extra}\r\n".encode()
                else:
                    out = (
                        f"HTTP/1.1 200 OK\r\nETag: {ETAG}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(document)}\r\n{extra}\r\n"
                    ).encode() + document
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)

        def snapshot():
            with open(stats_path, "w") as f:
                json.dump(stats, f)

        # SIGUSR1: write the figures so far (a measuring window's start/end).
        loop.add_signal_handler(signal.SIGUSR1, snapshot)
        async with server:
            await stop.wait()
        with open(stats_path, "w") as f:
            json.dump(stats, f)

    asyncio.run(main())


def drive(port, rate, seconds, nodes, connections, body_path, mode):
    body = open(body_path, "rb").read()
    latencies = []
    total = int(rate * seconds)
    answered = 0

    async def one_connection(index):
        nonlocal answered
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        k = index
        while k < total:
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            node = f"bench-node-{k % nodes}"
            head = (
                f"POST /v1/nodes/{node}/sync HTTP/1.1\r\nHost: coordinator\r\n"
                f"If-None-Match: {ETAG}\r\nFleet-Status-Digest: \"0123456789abcdef0123456789abcdef\"\r\n"
            )
            if mode == "full":
                request = (head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            else:
                request = (head + "Content-Length: 0\r\n\r\n").encode()
            sent = time.monotonic()
            writer.write(request)
            await writer.drain()
            response = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in response.decode("latin-1").split("\r\n"):
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            if length:
                await reader.readexactly(length)
            latencies.append(time.monotonic() - sent)
            answered += 1
            k += connections
        writer.close()

    async def main():
        started = time.monotonic()
        await asyncio.gather(*(one_connection(i) for i in range(connections)))
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    latencies.sort()
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2) if latencies else None
    print(json.dumps({
        "sent": total,
        "answered": answered,
        "elapsed_s": round(elapsed, 2),
        "rate": round(answered / elapsed, 1),
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
    }))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "serve":
        serve(int(args[0]), args[1] == "1", args[2], args[3])
    elif command == "drive":
        drive(int(args[0]), float(args[1]), float(args[2]), int(args[3]), int(args[4]), args[5], args[6])
    else:
        sys.exit(f"unknown command {command}")
