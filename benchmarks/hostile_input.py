"""Issue 21's hostile requests against one ``harmaug serve`` on loopback: status, time and memory.

Each reproduction of the review, sent as a hostile client would, against a server with the default
limits; the server's RSS is read before the first and after every request, so growth that is never
given back shows. Reproductions: 20 rows of 100k + 100k characters to ``/v1/classify`` (the request
that once drove the server to 23 GB), one row of 8,000 words each, 100k of one character and 100k
emoji (once one unknown token each), a lone surrogate among 31 valid concurrent requests, the largest
allowed request with a one-row request 0.3 s behind it, a body that stops short of its
Content-Length and headers never finished (the server must close them), and a string threshold.

    python -m benchmarks.hostile_input [--student runs/cpu_tiny/student] [--repeats 5]

Every reproduction is also a test (tests/test_serve*.py); this gives its numbers on a real guard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx2

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, process_rss_mib, write_results
from benchmarks.serving import Server, fairness

NAME = "hostile_input"
STUDENT = "runs/cpu_tiny/student"


async def timed(http: httpx2.AsyncClient, path: str, **kwargs: Any) -> tuple[int, float, dict[str, Any]]:
    started = time.perf_counter()
    reply = await http.post(path, **kwargs)
    return reply.status_code, time.perf_counter() - started, reply.json()


def stalled(port: int, payload: bytes) -> float:
    """Seconds until the server closes a connection that sent ``payload`` and then nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
        conn.sendall(payload)
        started = time.perf_counter()
        while conn.recv(65536):
            pass
        return time.perf_counter() - started


async def reproductions(server: Server, repeats: int) -> list[dict[str, Any]]:
    pid = server.process.pid
    rows: list[dict[str, Any]] = []

    def record(what: str, status: int | str, seconds: float, start_mib: float, note: str = "") -> None:
        rows.append(
            {
                "request": what,
                "status": status,
                "seconds": round(seconds, 2),
                "rss_growth_mib": round(process_rss_mib(pid) - start_mib, 1),
                "note": note,
            }
        )

    async with httpx2.AsyncClient(base_url=server.url, timeout=300) as http:
        await http.post("/v1/moderations", json={"input": "warm up"})
        start = process_rss_mib(pid)
        huge = [{"prompt": "a " * 50_000, "response": "b " * 50_000}] * 20
        for repeat in range(repeats):
            status, seconds, body = await timed(http, "/v1/classify", json={"rows": huge})
            truncated = all(row["truncated"] for row in body.get("results", [{}]))
            record(
                f"20 x (100k + 100k chars) /v1/classify #{repeat + 1}",
                status,
                seconds,
                start,
                f"truncated={truncated}",
            )
        words = " ".join(["word"] * 8000)
        status, seconds, _ = await timed(
            http, "/v1/classify", json={"rows": [{"prompt": words, "response": words}]}
        )
        record("1 row of 8,000 + 8,000 words", status, seconds, start)
        scores = {}
        for name, text in (("'y' x 100k", "y" * 100_000), ("emoji x 100k", "\U0001f600" * 100_000)):
            status, seconds, body = await timed(http, "/v1/moderations", json={"input": text})
            result = body["results"][0]
            scores[name] = result["category_scores"]["unsafe"]
            record(name, status, seconds, start, f"truncated={result['truncated']} unsafe={scores[name]:.4f}")
        surrogate = json.dumps({"input": "\ud800"}).encode()
        for repeat in range(3):
            sent = [http.post("/v1/moderations", json={"input": f"hello {i}"}) for i in range(31)]
            started = time.perf_counter()
            sent.append(
                http.post("/v1/moderations", content=surrogate, headers={"content-type": "application/json"})
            )
            replies = await asyncio.gather(*sent)
            ok = sum(reply.status_code == 200 for reply in replies[:31])
            record(
                f"lone surrogate + 31 valid, concurrent #{repeat + 1}",
                replies[31].status_code,
                time.perf_counter() - started,
                start,
                f"valid 200s {ok}/31; error type {replies[31].json()['error']['type']}",
            )
        status, seconds, body = await timed(
            http, "/v1/classify", json={"rows": [{"prompt": "hi"}], "threshold": "0.5"}
        )
        record('threshold "0.5"', status, seconds, start, body.get("error", {}).get("type", ""))
    for repeat in range(repeats):
        result = await fairness(server.url)
        record(
            f"{result['large_rows']} x 100k chars, one row 0.3 s behind #{repeat + 1}",
            "/".join(map(str, result["statuses"])),
            result["one_row_s"],
            start,
            f"one-row request {result['one_row_s']:.2f} s; large request {result['large_s']:.2f} s",
        )
    headers = b"POST /v1/moderations HTTP/1.1\r\nHost: x\r\n"
    short_body = headers + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    record("body stops short of its Content-Length", "closed", stalled(server.port, short_body), start)
    record(
        "headers never finished",
        "closed",
        stalled(server.port, headers),
        start,
    )
    alive = httpx2.get(f"{server.url}/ready", timeout=30).status_code
    record(
        "server alive afterwards (/ready)", alive, 0.0, start, f"RSS before the first request {start:.0f} MiB"
    )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", default=STUDENT, help="an exported guard folder")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the memory and fairness requests")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument(
        "--read-timeout-s", type=float, help="the server's --read_timeout_s (default: its own)"
    )
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    student = Path(args.student)
    if not (student / "config.json").is_file():
        raise SystemExit(f"{student}: no exported guard there (run `harmaug fit --config cpu_tiny` first)")
    limits = [] if args.read_timeout_s is None else ["--read_timeout_s", str(args.read_timeout_s)]
    with Server(student, args.threads, limits) as server:
        rows = asyncio.run(reproductions(server, args.repeats))
    data = {"machine": machine_info(), "student": str(student), "repeats": args.repeats, "rows": rows}
    headers = ["request", "status", "seconds", "RSS growth (MiB)", "note"]
    table = markdown_table(headers, [list(row.values()) for row in rows])
    markdown = f"# Hostile input against harmaug serve ({student})\n\n{table}\n"
    write_results(NAME, data, markdown, args.out_dir)
    return data


if __name__ == "__main__":
    main()
