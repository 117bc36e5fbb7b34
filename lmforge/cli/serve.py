"""`lmforge serve`: the OpenAI-compatible API and the chat page.

    lmforge serve --checkpoint runs/sft [--port 8000] [--api-key KEY | $LMFORGE_API_KEY] [--tools builtin]
                  [--rag INDEX [--rag-k K]] [--draft CHECKPOINT | --prompt-lookup] [--speculate K]
                  [--steps N]   (a masked diffusion model: passes per reply)
"""
from __future__ import annotations

import os

from lmforge.cli.common import add_speculative_args, checked, positive_int

API_KEY_ENV = "LMFORGE_API_KEY"


def cmd_serve(args):
    import ipaddress
    from pathlib import Path

    import torch
    import uvicorn

    from lmforge.common import LmforgeError
    from lmforge.serve.app import ServeConfig, create_app, load_served_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tools == "builtin":  # refuse at startup rather than fail the first request that runs Python
        from lmforge.inference.sandbox import sandbox_problem

        problem = sandbox_problem()
        if problem:
            raise LmforgeError(f"--tools builtin: {problem}")
    model, tok = load_served_model(args.checkpoint, device=args.device)
    name = args.model_name or Path(args.checkpoint).resolve().name
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    cfg = ServeConfig(model_name=name, api_key=key, max_batch=args.max_batch, max_tokens=args.max_tokens,
                      max_request_bytes=args.max_request_bytes, max_n=args.max_n, max_waiting=args.max_waiting,
                      dtype=args.dtype, compile=args.compile, tools=args.tools, rag_index=args.rag, rag_k=args.rag_k,
                      draft=args.draft, prompt_lookup=args.prompt_lookup, speculate=args.speculate,
                      diffusion_steps=args.steps)
    app = create_app(model, tok, cfg)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not key:
        also = " and run Python in the tool sandbox (--tools builtin)" if args.tools == "builtin" else ""
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can "
              f"use the model{also} (set --api-key or ${API_KEY_ENV})", flush=True)
    if args.tools == "none" and _fine_tuned_for_tools(args.checkpoint):
        print("note: this model was fine-tuned to call tools; `--tools builtin` lets the server run them "
              "(calculator, python) for chat requests that bring no tools of their own", flush=True)
    context = f"{model.context_limit}-token context" if model.context_limit else "no context limit"
    if args.rag:
        context += f", {args.rag_k} passages per chat request from {args.rag}"
    if getattr(model, "generation", None) == "diffusion":
        context += f", each reply written whole in {f'{args.steps} passes' if args.steps else 'one pass per token'}"
    if args.draft or args.prompt_lookup:
        # speculation: every request at batch 1 through its own session (lmforge/inference/scheduler.py)
        how = f"draft model {args.draft}" if args.draft else "prompt lookup"
        context += f", speculative decoding with {how} (k={args.speculate}), each request at batch 1"
    print(f"serving '{name}' ({model.family}, {context}, batches of up to {args.max_batch}) "
          f"on http://{args.host}:{args.port}/  (chat page at /, OpenAI API at /v1"
          f"{', API key required' if key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _fine_tuned_for_tools(path) -> bool:
    from lmforge.common import LmforgeError
    from lmforge.train.checkpoint import trained_with_tools

    try:
        return trained_with_tools(path)
    except LmforgeError:  # a Hugging Face folder: no lmforge training record
        return False


def add_commands(sub) -> None:
    port_number = checked(int, lambda v: 0 < v < 65536, "a TCP port number in 1..65535")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web chat page for a model")
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or Hugging Face model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--api-key", default=None, help=f"require this key on /v1 routes (default: ${API_KEY_ENV})")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the folder name)")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="most sequences decoded together (1 = one request at a time)")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-request-bytes", type=positive_int, default=1_000_000)
    p.add_argument("--max-n", type=positive_int, default=8, help="most choices (n) per request")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="queued sequences beyond the batch before new requests get 429")
    p.add_argument("--tools", choices=["none", "builtin"], default="none",
                   help="builtin: run lmforge's calculator and python tools on the server when the model calls "
                        "them in a chat request without tools of its own (default: none)")
    p.add_argument("--rag", default=None, metavar="INDEX",
                   help="retrieve passages from this index for each chat request's last user message, put them "
                        "into the prompt and return them in the response field lmforge_rag (docs/rag.md); a request "
                        "opts out with \"rag\": false")
    p.add_argument("--rag-k", type=positive_int, default=5, help="passages retrieved per chat request (default 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="store the weights in this dtype, cast once at start (bf16: half the bytes read per "
                        "token); default: as the checkpoint stores them")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster per token after a one-time compile")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    add_speculative_args(p)
    p.add_argument("--steps", type=positive_int, default=None,
                   help="a masked diffusion model: passes per reply, which it writes whole (default: one per token)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
