"""Latency and throughput of a running chat server, measured over HTTP as a client sees them.

    python -m earthgpt_jax.serve.bench --url=http://127.0.0.1:8000/ --image=scene.png \
        [--question="Please detect all objects in this image."] [--max_new_tokens=64]
        [--concurrency=1,4,8] [--rounds=3]

For each concurrency level, that many clients each open a conversation and ask at the same
moment, `--rounds` times. Reports the median time to first token (client clock: request sent
-> first token event), the median per-request decode speed (tokens/s after the first token)
and the aggregate tokens/s of all clients. One extra round per level runs first and is not
scored: it compiles that level's batch shapes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import statistics
import threading
import time
import urllib.parse
import urllib.request


def _post(url: str, data: bytes, content_type: str):
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": content_type})
    return urllib.request.urlopen(request, timeout=600)


def open_conversation(base: str, image: bytes) -> str:
    with _post(urllib.parse.urljoin(base, "api/conversations?name=bench"), image,
               "application/octet-stream") as response:
        return json.load(response)["id"]


def timed_answer(base: str, cid: str, question: str, max_new_tokens: int) -> dict:
    """Client-side timings of one streamed answer."""
    body = json.dumps({"question": question, "max_new_tokens": max_new_tokens}).encode()
    start, first, done = time.perf_counter(), None, {}
    with _post(urllib.parse.urljoin(base, f"api/conversations/{cid}/messages"), body,
               "application/json") as response:
        event = None
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "token" and first is None:
                    first = time.perf_counter()
                if event in ("done", "error"):
                    done = dict(json.loads(line[6:]), event=event)
    end = time.perf_counter()
    tokens = done.get("tokens", 0)
    first = first or end
    return {"ttft_s": first - start, "total_s": end - start, "tokens": tokens,
            "decode_tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 and end > first
            else None, "event": done.get("event")}


def run_level(base: str, image: bytes, question: str, max_new_tokens: int, clients: int,
              rounds: int) -> dict:
    ids = [open_conversation(base, image) for _ in range(clients)]
    results, wall = [], []
    for round_index in range(rounds + 1):  # round 0 compiles this level's batch shapes: unscored
        barrier = threading.Barrier(clients)

        def one(cid):
            barrier.wait()
            return timed_answer(base, cid, question, max_new_tokens)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(one, ids))
        if round_index:
            wall.append(time.perf_counter() - start)
            results += out
        for cid in ids:  # each round asks afresh (same prompt length every round)
            _post(urllib.parse.urljoin(base, f"api/conversations/{cid}/reset"), b"",
                  "application/json").close()
    speeds = [r["decode_tokens_per_s"] for r in results if r["decode_tokens_per_s"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results),
            "failed": sum(r["event"] != "done" for r in results),
            "median_ttft_s": round(statistics.median(r["ttft_s"] for r in results), 4),
            "median_decode_tokens_per_s": round(statistics.median(speeds), 2) if speeds else None,
            "aggregate_tokens_per_s": round(tokens / sum(wall), 2),
            "mean_tokens_per_answer": round(tokens / len(results), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m earthgpt_jax.serve.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", default="Please detect all objects in this image.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    image = pathlib.Path(args.image).read_bytes()
    base = args.url if args.url.endswith("/") else args.url + "/"
    for clients in (int(c) for c in args.concurrency.split(",")):
        print(json.dumps(run_level(base, image, args.question, args.max_new_tokens, clients,
                                   args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
