"""Text from a checkpoint of any model family (the KV-cached engine, or the family's decode state).

    lmforge sample --checkpoint RUN [--prompt TEXT] [--num-samples N]
    lmforge generate --checkpoint RUN "prompt"     only the completion, for scripts (or stdin)
    lmforge generate ... --draft SMALL_RUN | --prompt-lookup [--speculate K] [--stats]
                                                  speculative decoding (docs/speculative.md)
    lmforge chat --checkpoint RUN [--tools]       a multi-turn chat in the terminal
    lmforge chat --checkpoint RUN --rag INDEX     ... answering from passages retrieved for each message
    lmforge score --checkpoint RUN TEXT ...       log-probabilities; ranks candidates (noisy channel)
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from lmforge.cli.common import (
    add_diffusion_args,
    add_engine_args,
    add_sampling_args,
    add_speculative_args,
    apply_engine_args,
    diffusion_text,
    is_diffusion,
    positive_int,
    print_sample,
    read_text_arg,
    sampling_kwargs,
    temperature_value,
)


def cmd_generate(args):
    """One-shot completion for scripts: prints only the generated text."""
    from lmforge.inference.engine import Engine
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model = apply_engine_args(args, load_model(args.checkpoint, device=args.device)[0])
    tok = load_checkpoint_tokenizer(args.checkpoint)
    prompt = read_text_arg(args.prompt)
    if args.chat:
        from lmforge.chat import render_messages

        ids = render_messages(tok, [{"role": "user", "content": prompt}])
    else:
        ids = [tok.bos_id] + tok.encode(prompt)
    spec = speculator(args, model, tok)
    if is_diffusion(model):
        print(diffusion_text(model, tok, ids, args, seed=args.seed))
        return
    stats = None
    if spec is not None:
        from lmforge.inference.speculative import SpecStats

        stats = SpecStats()
        pieces = spec.stream(ids, args.max_new_tokens, seed=args.seed, stop_strings=args.stop or (), stats=stats,
                             **sampling_kwargs(args))
    else:
        pieces = Engine(model, tok).stream(ids, args.max_new_tokens, seed=args.seed, stop_strings=args.stop or (),
                                           **sampling_kwargs(args))
    start = time.perf_counter()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        if stats is not None:
            print(stats.summary(), file=sys.stderr)
        else:
            print(f"no speculation: generated in {time.perf_counter() - start:.2f} s", file=sys.stderr)


def speculator(args, model, tok):
    """The Speculator that --draft / --prompt-lookup ask for, or None (the draft cast like the model)."""
    from lmforge.inference.speculative import speculator_from
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    return speculator_from(model, tok, draft_path=args.draft, prompt_lookup=args.prompt_lookup, k=args.speculate,
                           load_draft=lambda path: (load_model(path, device=args.device)[0],
                                                    load_checkpoint_tokenizer(path)),
                           dtype=getattr(args, "dtype", None))


CHAT_HELP = "commands: /reset (new conversation), /temperature X, /quit"


def fit_history(tok, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest turns (never the system prompt or the newest message) until the rendered
    conversation plus room for the reply fits in `budget` tokens."""
    from lmforge.chat import render_messages

    msgs = list(messages)
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system):]
    while len(rest) > 1 and len(render_messages(tok, system + rest)) > budget:
        rest = rest[1:]
    return system + rest


def cmd_chat(args):
    """A multi-turn chat in the terminal, streamed through the chat template (a masked diffusion model,
    fine-tuned by `lmforge sft`, writes each reply whole in --steps passes). With tools (the default
    for a model fine-tuned to call them), each reply runs through the tool loop and shows the calls
    the model makes and their results. With --rag INDEX, each message brings the passages retrieved
    for it into the conversation (lmforge/rag.py) and each reply is followed by their sources."""
    from lmforge.chat import render_messages
    from lmforge.inference.engine import Engine
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model, trained_with_tools

    model = apply_engine_args(args, load_model(args.checkpoint, device=args.device)[0])
    tok = load_checkpoint_tokenizer(args.checkpoint)
    diffusion = is_diffusion(model)  # each reply filled in --steps passes (fine-tuned by `lmforge sft`)
    use_tools = (not diffusion and trained_with_tools(args.checkpoint)) if args.tools is None else args.tools
    retriever = _load_retriever(args.rag)
    if diffusion and (args.tools or args.draft or args.prompt_lookup):
        from lmforge.common import LmforgeError

        raise LmforgeError("a masked diffusion model writes a whole reply at once: tool calls and speculative "
                           "decoding need token-by-token decoding (drop --tools / --draft / --prompt-lookup)")
    engine = None if diffusion else Engine(model, tok)
    spec = None if diffusion else speculator(args, model, tok)
    from lmforge.models.protocol import tokens_left

    window = tokens_left(model, 0)  # the context window (unbounded for an LSTM or an n-gram)
    reply_room = min(args.max_new_tokens, window // 2)
    context = f"{window}-token context" if model.context_limit else "no context limit"
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    sampling = sampling_kwargs(args)
    interactive = sys.stdin.isatty()
    helps = CHAT_HELP + (", /sources (of the last reply)" if retriever else "")
    extras = (", tools run" if use_tools else "") + (f", {args.rag_k} passages from {args.rag}" if retriever else "")
    print(f"lmforge chat ({context}{extras}). {helps}", file=sys.stderr)
    if spec is not None and use_tools:
        # the tool loop generates through Engine (lmforge/inference/tools.py), batched across calls
        print("(speculative decoding applies to plain replies; replies through the tool loop decode without it)",
              file=sys.stderr)
    sources = None  # the last reply's sources (with --rag)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/quit":
                break
            if cmd == "/reset":
                history = list(system)
                print("(new conversation)", file=sys.stderr)
            elif cmd == "/sources" and retriever:
                print(sources or "(no reply yet)", flush=True)
            elif cmd == "/temperature":
                try:
                    sampling["temperature"] = temperature_value(arg.strip())
                    print(f"(temperature {sampling['temperature']})", file=sys.stderr)
                except argparse.ArgumentTypeError as e:
                    print(f"(error: {e})", file=sys.stderr)
            else:
                print(f"(unknown command {cmd}; {helps})", file=sys.stderr)
            continue
        before, passages = history, None
        if retriever is None:
            history = fit_history(tok, history + [{"role": "user", "content": text}], window - reply_room)
        else:
            history, passages = _rag_turn(tok, retriever, history, text, args.rag_k, window - reply_room)
        ids = render_messages(tok, history)
        if len(ids) >= window:
            print(f"(error: that message is {len(ids)} tokens; the context window is {window})", file=sys.stderr)
            history = before
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        if diffusion:
            answer = diffusion_text(model, tok, ids, args, seed=args.seed, length=reply_room,
                                    temperature=sampling["temperature"])
            print(answer, flush=True)
            history.append({"role": "assistant", "content": answer})
        elif use_tools:
            reply = _chat_reply_with_tools(engine, history, reply_room, args.seed, sampling)
            history += reply
            answer = " ".join(m["content"] or "" for m in reply if m["role"] == "assistant")
        else:
            pieces = []
            for piece in (spec or engine).stream(ids, reply_room, seed=args.seed, **sampling):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print()
            answer = "".join(pieces)
            history.append({"role": "assistant", "content": answer})
        if passages is not None:
            from lmforge.rag import format_sources

            sources = format_sources(passages, answer)
            print(sources, flush=True)


def _load_retriever(path):
    """The index of `--rag INDEX` (None without it)."""
    if path is None:
        return None
    from lmforge.rag import load_index

    return load_index(path)


def _rag_turn(tok, retriever, history: list[dict], text: str, k: int, budget: int):
    """(history with the user's turn and the passages retrieved for it, the passages shown)."""
    from lmforge.rag import fit_rag_turn

    return fit_rag_turn(tok, history, text, retriever.search(text, k), budget)


def _chat_reply_with_tools(engine, history: list[dict], max_new_tokens: int, seed, sampling: dict) -> list[dict]:
    """One reply through the tool loop, printed as it went: content, each call and its result, the
    answer. Returns the reply's messages (assistant turns with their calls, tool results)."""
    from lmforge.inference.tools import generate_with_tools

    result = generate_with_tools(engine, history, max_new_tokens=max_new_tokens, seed=seed, **sampling)
    for m in result.messages:
        if m["role"] == "tool":
            print(f"[tool result] {m['content']}", flush=True)
            continue
        if m.get("content"):
            print(m["content"], flush=True)
        for call in m.get("tool_calls") or []:
            print(f"[tool call] {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}", flush=True)
    if not result.messages or result.messages[-1]["role"] != "assistant" or not result.messages[-1]["content"]:
        print(flush=True)  # every reply ends its line, even an empty one
    if result.finish_reason == "max_calls":
        print("(the reply stopped: too many tool calls in one turn)", file=sys.stderr)
    return result.messages


def cmd_sample(args):
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model = apply_engine_args(args, load_model(args.checkpoint, device=args.device)[0])
    tok = load_checkpoint_tokenizer(args.checkpoint)
    prompt = args.prompt if args.prompt is not None else ""
    print_sample(model, tok, prompt, args, args.num_samples, seed=args.seed)


def cmd_score(args):
    from lmforge.inference.sampling import rank_texts
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model, _ = load_model(args.checkpoint, device=args.device)
    tok = load_checkpoint_tokenizer(args.checkpoint)
    texts = args.texts or [read_text_arg(None)]
    ranked = rank_texts(model, tok, texts)
    if args.json:
        print(json.dumps([{"text": s.text, "logprob": s.logprob, "perplexity": s.perplexity,
                           "tokens": [{"token": t, "logprob": lp} for t, lp in s.token_logprobs]}
                          for s in ranked], indent=2))
        return
    if len(ranked) == 1 or args.verbose:
        for s in ranked:
            print(f"{s.text!r}")
            for piece, lp in s.token_logprobs:
                print(f"  {piece!r:>20} {lp:9.4f}")
    print(f"{'rank':>4}  {'log p':>10}  {'ppl':>9}  text")
    for i, s in enumerate(ranked, 1):
        print(f"{i:>4}  {s.logprob:10.3f}  {s.perplexity:9.2f}  {s.text}")


def add_commands(sub) -> None:
    # sample
    sa = sub.add_parser("sample", help="generate text from a checkpoint")
    sa.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    sa.add_argument("--prompt", default=None)
    sa.add_argument("--num-samples", type=positive_int, default=1)
    sa.add_argument("--device", default="cpu")
    add_sampling_args(sa)
    add_engine_args(sa)
    add_diffusion_args(sa)
    sa.set_defaults(func=cmd_sample)

    # generate
    ge = sub.add_parser("generate", help="one-shot completion for scripts (prompt as argument or stdin)")
    ge.add_argument("--checkpoint", required=True)
    ge.add_argument("prompt", nargs="?")
    ge.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    ge.add_argument("--stop", action="append", help="stop string (repeatable)")
    ge.add_argument("--device", default="cpu")
    ge.add_argument("--stats", action="store_true",
                    help="print speculation's acceptance rate and tokens/s (or the time taken) to stderr")
    add_sampling_args(ge)
    add_engine_args(ge)
    add_speculative_args(ge)
    add_diffusion_args(ge)
    ge.set_defaults(func=cmd_generate)

    # chat
    ch = sub.add_parser("chat", help="talk to a model in the terminal")
    ch.add_argument("--checkpoint", required=True)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--device", default="cpu")
    ch.add_argument("--tools", action=argparse.BooleanOptionalAction, default=None,
                    help="run the tools the model calls (calculator, python) and show each call and result; "
                         "default: on for a model fine-tuned with tool calls")
    ch.add_argument("--rag", default=None, metavar="INDEX",
                    help="retrieve passages from this index for each message, put them into the prompt and "
                         "print their sources after each reply (docs/rag.md)")
    ch.add_argument("--rag-k", type=positive_int, default=5, help="passages retrieved per message (default 5)")
    add_sampling_args(ch)
    add_engine_args(ch)
    add_speculative_args(ch)
    add_diffusion_args(ch)
    ch.set_defaults(func=cmd_chat)

    # score
    sc = sub.add_parser("score", help="log-probability and perplexity of texts; ranks several candidates")
    sc.add_argument("--checkpoint", required=True)
    sc.add_argument("texts", nargs="*")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--json", action="store_true")
    sc.add_argument("-v", "--verbose", action="store_true", help="per-token log-probs for every text")
    sc.set_defaults(func=cmd_score)
