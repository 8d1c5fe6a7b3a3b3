"""Benchmark for serve.py: N concurrent streaming clients against a direct ONNX Runtime decode loop.

    python bench/bench_serve.py [--data data] [--clients 1 4 16] [--requests 48] [--max-tokens 32]
                                [--graph int8] [--threads 1]

The server runs as a user runs it, `serve.py --port 0` in its own process. For each client count,
that many client threads share --requests streamed requests (each takes the next until none is
left), and over all requests it reports: the time to the first token (request sent -> first
chunk with text), the time per token after it (p50 and p99 of each), and tokens/s over the
whole run. The reference, in the same run: serve.decode itself (08's loop: no HTTP, no JSON,
one stream at a time) on the same graph with the same threads, over the same prompts. Every
request is greedy without stop strings, so each one makes the same tokens every time.
On a shared machine the figures are noisy: compare the ratios, not the milliseconds.
"""
import argparse
import http.client
import importlib
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
serve = importlib.import_module("serve")

PROMPTS = ["The history of", "In 1905, Albert Einstein", "Python is a programming language that",
           "The river flows through"]


def timed_request(port, prompt, max_tokens):
    """One streamed completion: (seconds to the first text, seconds per later token, tokens)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    first = None
    for line in r:   # server-sent events, one line each, as they arrive
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"][0]["text"]:
            first = time.perf_counter()
        if "usage" in chunk:
            end, n = time.perf_counter(), chunk["usage"]["completion_tokens"]
    c.close()
    first = first or end
    return first - t0, (end - first) / max(1, n - 1), n


def direct(model, prompts, max_tokens):
    """The reference: serve.decode on its own, the same measurements without the server."""
    rows = []
    for prompt in prompts:
        t0 = time.perf_counter()
        gen = serve.decode(model, model["enc"].encode_ordinary(prompt), max_tokens)
        next(gen)
        first = time.perf_counter()
        n = 1 + sum(1 for _ in gen)
        rows.append((first - t0, (time.perf_counter() - first) / max(1, n - 1), n))
    return rows


def served(port, prompts, clients, max_tokens):
    """--requests requests over `clients` threads; returns their rows and the wall time."""
    todo, rows = queue.Queue(), []
    for p in prompts:
        todo.put(p)

    def client():
        while True:
            try:
                prompt = todo.get_nowait()
            except queue.Empty:
                return
            rows.append(timed_request(port, prompt, max_tokens))   # list.append is thread-safe

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rows, time.perf_counter() - t0


def line(name, rows, seconds, ref_tok_s=None):
    first, per, n = map(np.array, zip(*rows))
    first, per = first * 1000, per * 1000
    tok_s = n.sum() / seconds
    vs = f"{tok_s / ref_tok_s:>9.2f}x" if ref_tok_s else f"{'1.00x':>10}"
    print(f"{name:<22}{np.percentile(first, 50):>9.2f}{np.percentile(first, 99):>9.2f}"
          f"{np.percentile(per, 50):>10.3f}{np.percentile(per, 99):>9.3f}{tok_s:>10.0f}{vs}")
    return tok_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data", help="data folder with 02_tokenize/ and 08_export/")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=48, help="requests per client count")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--graph", default="int8", choices=sorted(serve.GRAPHS))
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads, server and reference alike")
    args = ap.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]

    model = serve.load_model(args.data, args.graph, args.threads)
    cmd = [sys.executable, str(ROOT / "serve.py"), "--data", args.data, "--graph", args.graph,
           "--threads", str(args.threads), "--port", "0"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = server.stdout.readline()
        if not ready.startswith("serving"):
            sys.exit(f"serve.py did not start: {ready!r}")
        port = int(ready.split(":")[2].split("/")[0])
        timed_request(port, PROMPTS[0], 4), direct(model, PROMPTS[:1], 4)   # warm-up: first calls allocate
        cfg = model["cfg"]
        print(f"model: {cfg['n_layer']} layers x {cfg['n_embd']}, context {cfg['block_size']}, {model['name']}, "
              f"{args.threads} ONNX Runtime thread(s); {args.requests} greedy requests of {args.max_tokens} tokens")
        print(f"\n{'':<22}{'first token ms':>18}{'ms per token':>19}{'':>10}")
        print(f"{'':<22}{'p50':>9}{'p99':>9}{'p50':>10}{'p99':>9}{'tokens/s':>10}{'vs direct':>10}")
        t0 = time.perf_counter()
        rows = direct(model, prompts, args.max_tokens)
        ref = line("direct decode loop", rows, time.perf_counter() - t0)
        for n in args.clients:
            line(f"server, {n} client{'s' * (n > 1)}", *served(port, prompts, n, args.max_tokens), ref)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
