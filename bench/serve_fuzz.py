"""Fuzz `lmforge serve` from its own OpenAPI schema with schemathesis: no request may get a 5xx.

    python bench/serve_fuzz.py                        # 300 requests at most, 100 s at most
    python bench/serve_fuzz.py --max-requests 1000 --time-limit 300

A server with a random `tiny` model (byte-level tokenizer, small limits so that valid requests are
cheap) runs on a free loopback port (127.0.0.1 only). schemathesis reads /openapi.json; for every
operation it generates requests that fit the schema (valid bodies, which generate text) and
requests that break it (wrong types, missing fields, out-of-range numbers: each must be a 4xx),
spread evenly over operations and modes, until the request or time budget is spent. Every
response under 500 passes; afterwards /health must be ok with an empty batch and a plain request
must still work. The summary (requests tried, statuses seen, failures with a curl command to
replay each) is printed as JSON; `tests/test_serve.py::test_schema_fuzz` runs the same function.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def fuzz(base_url: str, *, max_requests: int = 300, time_limit: float = 100.0, seed: int = 0) -> dict:
    """Fuzz the server at base_url (loopback) from its schema; returns the summary."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    if not base_url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise ValueError(f"fuzz only a loopback server, not {base_url}")
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    modes = list(schemathesis.GenerationMode)
    deadline = time.monotonic() + time_limit
    statuses: Counter = Counter()
    failures: list[dict] = []
    skipped: set[str] = set()
    tried = 0

    def run(op, mode, examples: int, run_seed: int) -> None:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def one(case):
            nonlocal tried
            if time.monotonic() > deadline or tried >= max_requests:
                return
            tried += 1
            try:
                resp = case.call(base_url=base_url, timeout=60)
            except Exception as e:  # the connection broke: as bad as a 5xx
                failures.append({"operation": op.label, "mode": mode.value, "error": repr(e),
                                 "curl": case.as_curl_command()})
                return
            statuses[resp.status_code] += 1
            if resp.status_code >= 500:
                failures.append({"operation": op.label, "mode": mode.value, "status": resp.status_code,
                                 "body": resp.text[:300], "curl": case.as_curl_command()})

        try:
            hypothesis.seed(run_seed)(one)()
        except hypothesis.errors.Unsatisfiable:  # nothing to break (e.g. GET /health has no inputs)
            skipped.add(f"{op.label} {mode.value}")

    # A route without inputs runs out of new requests after a few; the bodies get the rest, in
    # rounds over operations and modes (a new seed each round) until the budget is spent.
    for op in operations:
        for mode in modes:
            run(op, mode, 5, seed)
    with_body = [op for op in operations if op.method.upper() == "POST"]
    rnd = 0
    while with_body and tried < max_requests and time.monotonic() < deadline:
        rnd += 1
        before = tried
        for op in with_body:
            for mode in modes:
                run(op, mode, 25, seed + rnd)
        if tried == before:
            break
    health = httpx.get(base_url + "/health", timeout=30)
    after = httpx.post(base_url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "a", "max_tokens": 3, "temperature": 0})
    return {"requests": tried, "operations": [op.label for op in operations],
            "statuses": dict(sorted(statuses.items())),
            "skipped": sorted(skipped),
            "failures": failures, "health": health.json(), "health_status": health.status_code,
            "after_status": after.status_code}


def serve_tiny(block_size: int = 64):
    """(app, server thread) for a random tiny model with small limits, on a free loopback port."""
    import torch
    import uvicorn

    from lmforge.models.transformer import GPT, get_config
    from lmforge.serve.app import ServeConfig, create_app
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=block_size)).eval()
    app = create_app(model, tok, ServeConfig(model_name="tiny", max_tokens=8, max_n=2, max_request_bytes=20_000))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fuzz target server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-requests", type=int, default=300)
    ap.add_argument("--time-limit", type=float, default=100.0, help="seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    server, thread, url = serve_tiny()
    t0 = time.perf_counter()
    try:
        result = fuzz(url, max_requests=args.max_requests, time_limit=args.time_limit, seed=args.seed)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    ok = not result["failures"] and result["health_status"] == 200 and result["after_status"] == 200
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
