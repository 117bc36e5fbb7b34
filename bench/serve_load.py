"""Load and fault test of `lmforge serve`: N concurrent streaming chat clients against a server on
loopback, continuous batching vs one request at a time.

    python bench/serve_load.py                       # random-init `cpu`-preset model, byte-level tokenizer
    python bench/serve_load.py --checkpoint runs/sft # a real checkpoint

For N = 1, 4, 16 clients (each sends --requests-per-client streaming requests, one after another),
it reports requests/s, generated tokens/s, time to first token, p50/p99 latency and errors. During
the N = 16 run, extra clients disconnect mid-stream and send malformed requests (each must get a
4xx); afterwards /health must be ok with an empty batch. The N = 16 workload is then repeated
against a server started with --max-batch 1 (one request at a time) for the speed-up.

Every request has its own seed, so both servers generate the same tokens: the comparison is of the
same work. Results go to bench/out/serve_load.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Tell me a story about a fox.", "What is the capital of France?", "Write a haiku about rain.",
           "Explain recursion briefly.", "List three fruits.", "Hi!", "Summarise the plot of Hamlet.",
           "How do I sort a list in Python?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(out: Path) -> Path:
    """A random-init model of the `cpu` preset shape with the byte-level tokenizer (no training needed:
    serving speed does not depend on what the weights say)."""
    import torch

    from lmforge.models.transformer import GPT, get_config
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import save_checkpoint

    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = GPT(get_config("cpu", vocab_size=tok.vocab_size))
    tok_path = tok.save(out / "tokenizer.json")
    save_checkpoint(out / "model" / "checkpoints", 0, model, state={"tokenizer_fingerprint": tok.fingerprint},
                    files={"tokenizer.json": tok_path.read_bytes()})
    return out / "model"


class Server:
    def __init__(self, checkpoint: Path, max_batch: int, threads: int | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--checkpoint", str(checkpoint), "--port",
               str(self.port), "--max-batch", str(max_batch), "--model-name", "bench", "--log-level", "warning"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def one_request(http: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"error": f"status {resp.status_code}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
    if not done:
        return {"error": "stream ended without [DONE]"}
    return {"latency": time.perf_counter() - start, "ttft": ttft if ttft is not None else float("nan"),
            "tokens": tokens}


async def disconnecting_client(http: httpx.AsyncClient, i: int) -> str | None:
    """Open a long stream, read a few chunks, hang up."""
    body = {"model": "bench", "messages": [{"role": "user", "content": "Talk for a long time."}],
            "max_tokens": 200, "temperature": 1.0, "seed": 10_000 + i, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return f"disconnecting client got {resp.status_code}"
        n = 0
        async for line in resp.aiter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                break
    return None


MALFORMED = [
    (b'{"model": "bench", "messages": [', 400),
    (json.dumps({"model": "bench", "messages": []}).encode(), 400),
    (json.dumps({"model": "bench", "messages": [{"role": "user", "content": "x"}],
                 "temperature": "hot"}).encode(), 400),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404),
    (json.dumps({"model": "bench", "messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode(), 413),
    (json.dumps({"model": "bench", "messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 400),
]


async def malformed_client(http: httpx.AsyncClient, i: int) -> str | None:
    payload, want = MALFORMED[i % len(MALFORMED)]
    resp = await http.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
    if resp.status_code != want or "error" not in resp.json():
        return f"malformed request {i}: got {resp.status_code} {resp.text[:100]}, wanted {want}"
    return None


async def run_load(url: str, n_clients: int, per_client: int, max_tokens: int, faults: int, timeout: float) -> dict:
    limits = httpx.Limits(max_connections=n_clients + 2 * faults + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def client(c):
            return [await one_request(http, c * per_client + k, max_tokens) for k in range(per_client)]

        start = time.perf_counter()
        tasks = [client(c) for c in range(n_clients)]
        tasks += [disconnecting_client(http, i) for i in range(faults)]
        tasks += [malformed_client(http, i) for i in range(faults)]
        out = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)
        wall = time.perf_counter() - start
    results, fault_errors = [], []
    for r in out[:n_clients]:
        if isinstance(r, BaseException):
            results.append({"error": repr(r)})
        else:
            results += r
    for r in out[n_clients:]:
        if r is not None:
            fault_errors.append(repr(r) if isinstance(r, BaseException) else r)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r] + fault_errors
    lat = sorted(r["latency"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"clients": n_clients, "requests": len(results), "wall_s": wall, "requests_per_s": len(ok) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(r["ttft"] for r in ok) if ok else float("nan"),
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
            "errors": len(errors), "error_samples": errors[:5], "disconnecting_clients": faults,
            "malformed_requests": faults}


def check_health(server: Server) -> dict:
    deadline = time.monotonic() + 30
    while True:  # cancelled rows leave the batch at the next step
        h = server.health()
        s = h["scheduler"]
        if h["status"] == "ok" and s["running"] == 0 and s["waiting"] == 0:
            return h
        if time.monotonic() > deadline:
            raise SystemExit(f"server not idle and healthy after the load: {h}")
        time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: a random-init cpu-preset model")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--faults", type=int, default=6, help="disconnecting + malformed clients in the largest run")
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run before giving up")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "serve_load.json"))
    args = ap.parse_args()
    ns = [int(x) for x in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_model(Path(tmp))
        runs = []
        server = Server(ckpt, max_batch=16, threads=args.threads)
        try:
            asyncio.run(run_load(server.url, 2, 1, 8, 0, args.timeout))  # warm-up
            for n in ns:
                faults = args.faults if n == max(ns) else 0
                r = asyncio.run(run_load(server.url, n, args.requests_per_client, args.max_tokens, faults,
                                         args.timeout))
                r["mode"] = "batched (--max-batch 16)"
                runs.append(r)
                print(json.dumps(r), flush=True)
            health = check_health(server)
            batched_stats = health["scheduler"]
        finally:
            server.close()
        server = Server(ckpt, max_batch=1, threads=args.threads)
        try:
            asyncio.run(run_load(server.url, 2, 1, 8, 0, args.timeout))
            r = asyncio.run(run_load(server.url, max(ns), args.requests_per_client, args.max_tokens, 0, args.timeout))
            r["mode"] = "one at a time (--max-batch 1)"
            runs.append(r)
            print(json.dumps(r), flush=True)
            check_health(server)
        finally:
            server.close()

    big = [r for r in runs if r["clients"] == max(ns)]
    speedup = big[0]["tokens_per_s"] / big[1]["tokens_per_s"]
    result = {"checkpoint": args.checkpoint or "random-init cpu preset (4 layers, width 256), byte-level tokenizer",
              "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
              "torch_threads": args.threads or os.cpu_count(), "runs": runs,
              "speedup_tokens_per_s_at_max_clients": speedup, "batched_server_stats": batched_stats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| server | clients | requests | req/s | gen tok/s | TTFT p50 | latency p50 | latency p99 | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        extra = f" (+{r['disconnecting_clients']} disconnecting, +{r['malformed_requests']} malformed)" \
            if r["disconnecting_clients"] else ""
        print(f"| {r['mode']} | {r['clients']}{extra} | {r['requests']} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['ttft_p50_s'] * 1000:.0f} ms | {r['latency_p50_s']:.2f} s | "
              f"{r['latency_p99_s']:.2f} s | {r['errors']} |")
    print(f"\nspeed-up of batched over one-at-a-time serving at {max(ns)} clients: {speedup:.1f}x aggregate tokens/s")
    s = batched_stats
    print(f"batched server: {s['decode_steps']} decode steps, up to {s['max_rows']} rows per step, "
          f"{s['joined_running']} requests joined a running batch, {s['cancelled']} cancelled, {s['errors']} errors")
    total_errors = sum(r["errors"] for r in runs)
    if total_errors:
        raise SystemExit(f"{total_errors} errors")


if __name__ == "__main__":
    main()
