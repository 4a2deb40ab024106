"""
Load benchmark of a running chat_web server: C concurrent clients, each sending streaming chat completions one
after another, for every C in --concurrency. Bounded in count (--requests_per_client) and time (--time_limit per
level, --request_timeout per request).

    python -m scripts.chat_web -i sft &                    # the server under test, on loopback
    python -m bench.serve_load                             # C = 1, 4, 16 against http://127.0.0.1:8000
    python -m bench.serve_load --concurrency 1,8 --max_tokens 128 --api_key KEY

Prints per level: requests completed, requests/s, time to first token (first content chunk) p50 / p95,
generated tokens/s (the server's usage counts over the level's wall time), and errors (HTTP errors, timeouts,
streams that do not end with `data: [DONE]`).
"""

import argparse
import json
import threading
import time

import requests

PROMPTS = ["Why is the sky blue?", "Write a short poem about the sea.", "What is 12 * 34?",
           "Tell me about the history of Rome.", "Give me three tips for learning to code."]


def percentile(values, q):
    """The q-quantile (0..1) of values by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def one_request(url, headers, prompt, max_tokens, temperature, timeout):
    """-> (ttft seconds or None, completion tokens, error text or None) for one streamed completion."""
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": max_tokens,
            "temperature": temperature, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True,
                           timeout=timeout) as r:
            if r.status_code != 200:
                return None, 0, f"HTTP {r.status_code}"
            for line in r.iter_lines(decode_unicode=True):
                if time.perf_counter() - t0 > timeout:
                    return ttft, tokens, "timeout"
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return ttft, tokens, "error chunk"
                if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except requests.RequestException as e:
        return ttft, tokens, type(e).__name__
    return ttft, tokens, None if done else "no [DONE]"


def run_level(url, headers, concurrency, num_requests, max_tokens, temperature, time_limit, request_timeout):
    results, lock = [], threading.Lock()
    next_index = [0]
    deadline = time.perf_counter() + time_limit

    def client():
        while time.perf_counter() < deadline:
            with lock:
                if next_index[0] >= num_requests:
                    return
                i = next_index[0]
                next_index[0] += 1
            result = one_request(url, headers, PROMPTS[i % len(PROMPTS)], max_tokens, temperature,
                                 min(request_timeout, max(deadline - time.perf_counter(), 1.0)))
            with lock:
                results.append(result)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[2] is None]
    ttfts = [r[0] for r in ok if r[0] is not None]
    errors = {}
    for r in results:
        if r[2] is not None:
            errors[r[2]] = errors.get(r[2], 0) + 1
    return {"concurrency": concurrency, "completed": len(ok), "wall_s": wall, "requests_per_s": len(ok) / wall,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
            "tokens_per_s": sum(r[1] for r in ok) / wall, "errors": errors}


def main(argv=None):
    parser = argparse.ArgumentParser(description="streaming load benchmark of a running chat_web server")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests_per_client", type=int, default=4, help="requests per client per level")
    parser.add_argument("--max_tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--time_limit", type=float, default=120.0, help="seconds per level; no new requests after")
    parser.add_argument("--request_timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--api_key", default=None, help="sent as `Authorization: Bearer KEY`")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.requests_per_client < 1:
        raise SystemExit("--concurrency needs positive integers and --requests_per_client >= 1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    try:
        health = requests.get(args.url + "/health", timeout=10).json()
    except requests.RequestException as e:
        raise SystemExit(f"no server at {args.url} ({type(e).__name__}): start it with python -m scripts.chat_web")
    print(f"server {args.url}: model {health.get('model')}, {health.get('workers')} worker(s); "
          f"max_tokens {args.max_tokens}, {args.requests_per_client} requests per client")
    one_request(args.url, headers, "warm up", 4, args.temperature, args.request_timeout)
    print(f"{'clients':>7} {'done':>5} {'wall s':>7} {'req/s':>7} {'TTFT p50 ms':>11} {'TTFT p95 ms':>11} "
          f"{'tokens/s':>9}  errors")
    for c in levels:
        r = run_level(args.url, headers, c, c * args.requests_per_client, args.max_tokens, args.temperature,
                      args.time_limit, args.request_timeout)
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        print(f"{c:>7} {r['completed']:>5} {r['wall_s']:>7.2f} {r['requests_per_s']:>7.2f} "
              f"{r['ttft_p50_s'] * 1000:>11.1f} {r['ttft_p95_s'] * 1000:>11.1f} {r['tokens_per_s']:>9.1f}  {errors}",
              flush=True)


if __name__ == "__main__":
    main()
