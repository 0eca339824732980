"""Load test for a running `serve.app`: N concurrent streaming conversations, one JSON line of results.

Loopback only (127.0.0.1 / localhost / ::1): this is for measuring your own server, not anyone else's. Each of
`--concurrency` threads keeps one streaming POST /chat/completions in flight until `--requests` have been started
in total or `--duration` seconds have passed, then stops; every socket has a timeout, so the run always ends.

    python -m serve.app -i sft &                     # or any server on loopback
    python -m serve.loadtest --url http://127.0.0.1:8000 -c 32 -r 64 --max-tokens 64

Prints e.g. {"concurrency": 32, "requests": 64, "ok": 64, "errors": 0, "ttft_p50_s": ..., "ttft_p95_s": ...,
"itl_p50_s": ..., "itl_p95_s": ..., "tokens": ..., "tokens_per_sec": ..., ...}: time to first token (request sent ->
first token event), inter-token latency (the gaps between a stream's consecutive token events, pooled over all
streams; the engine sends a chunk's tokens together, so most gaps are ~0 and the p95 shows the chunk period),
aggregate tokens/sec (token events over wall time; one event is one decoded piece, about one token), per-stream
rate, and the error count with its kinds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is 12 times 17?",
    "Tell me a short story about a robot who learns to paint. 🎨",
    "Explain gradient descent to a ten year old.",
    "Quelle est la capitale de la France ?",
]


def _one_request(host: str, port: int, body: dict, timeout: float) -> dict:
    """One streaming request; returns {"status", "ttft", "tokens", "seconds", "error"}."""
    t0 = time.perf_counter()
    out = {"status": None, "ttft": None, "tokens": 0, "seconds": None, "error": None, "gaps": []}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out["status"] = resp.status
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}"
            resp.read()
            return out
        done = False
        while True:
            line = resp.readline()  # SSE: one "data: {...}" line then a blank line per event
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            ev = json.loads(line[6:])
            if "token" in ev:
                now = time.perf_counter()
                if out["ttft"] is None:
                    out["ttft"] = now - t0
                else:
                    out["gaps"].append(now - last)
                last = now
                out["tokens"] += 1
            elif "error" in ev:
                out["error"] = ev["error"]
            elif ev.get("done"):
                done = True
        if not done and out["error"] is None:
            out["error"] = "stream ended without done event"
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
        out["seconds"] = time.perf_counter() - t0
    return out


def run_loadtest(url: str, concurrency: int = 32, num_requests: int = 64, duration: float = 120.0,
                 max_tokens: int = 64, temperature: float = 0.8, top_k: int = 50, timeout: float = 60.0,
                 warmup: int = 0) -> dict:
    """Run the load test against `url` (loopback only) and return the summary dict.

    `warmup` sequential requests go first and are not counted (they absorb the engine's jit compiles).

    Raises ValueError for a non-loopback or non-http URL, or non-positive counts.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"--url {url!r}: only http:// on loopback ({', '.join(sorted(LOOPBACK))}) is allowed")
    if concurrency < 1 or num_requests < 1 or duration <= 0:
        raise ValueError("--concurrency, --requests and --duration must be positive")
    host, port = parts.hostname, parts.port or 80
    for i in range(warmup):
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
                "temperature": temperature, "top_k": top_k}
        _one_request(host, port, body, timeout=max(timeout, 300.0))
    lock = threading.Lock()
    started = [0]
    results: list[dict] = []
    deadline = time.perf_counter() + duration

    def client(worker_id: int) -> None:
        while time.perf_counter() < deadline:
            with lock:
                if started[0] >= num_requests:
                    return
                i = started[0]
                started[0] += 1
            body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": temperature, "top_k": top_k}
            r = _one_request(host, port, body, timeout=min(timeout, max(1.0, deadline - time.perf_counter() + 5)))
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + timeout + 10)
    wall = time.perf_counter() - t0

    ok = [r for r in results if r["error"] is None]
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None])
    tokens = sum(r["tokens"] for r in results)
    rates = np.array([r["tokens"] / r["seconds"] for r in ok if r["seconds"]])
    gaps = np.array([g for r in ok for g in r["gaps"]])
    pct = lambda a, q: round(float(np.percentile(a, q)), 4) if a.size else None  # noqa: E731
    errors = Counter(r["error"] for r in results if r["error"] is not None)
    return {
        "url": url, "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "errors": sum(errors.values()), "error_kinds": dict(errors.most_common(5)),
        "status_counts": {str(k): v for k, v in Counter(r["status"] for r in results).items()},
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "itl_p50_s": pct(gaps, 50),
        "itl_p95_s": pct(gaps, 95), "tokens": tokens,
        "tokens_per_sec": round(tokens / wall, 2) if wall > 0 else None,
        "per_stream_tokens_per_sec_p50": pct(rates, 50), "max_tokens": max_tokens, "wall_s": round(wall, 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Load test a local jaxchat server (loopback only)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("-c", "--concurrency", type=int, default=32, help="simultaneous streaming conversations")
    p.add_argument("-r", "--requests", type=int, default=64, help="total conversations to run")
    p.add_argument("-d", "--duration", type=float, default=120.0, help="stop starting new ones after this many s")
    p.add_argument("-m", "--max-tokens", type=int, default=64, help="max_tokens per reply")
    p.add_argument("-t", "--temperature", type=float, default=0.8)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout per request, s")
    p.add_argument("--warmup", type=int, default=1, help="uncounted sequential requests first (jit compiles)")
    a = p.parse_args(argv)
    try:
        summary = run_loadtest(a.url, a.concurrency, a.requests, a.duration, a.max_tokens, a.temperature, a.top_k,
                               a.timeout, a.warmup)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
