"""An open-weight model in, and everything downstream on it: a Qwen2-shaped model with a ChatML
tokenizer and chat template (built here with `transformers` and `tokenizers`, saved as a hub folder in
bf16 shards with an index) is imported with `lmforge import`, then chatted with, served, evaluated,
fine-tuned (SFT with LoRA, DPO, GRPO), quantized and exported back, each checked against
`transformers` where it has an answer."""
from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from test_hub_tokenizer import CHATML, byte_level_tokenizer, corpus, write_folder  # noqa: E402

from lmforge.chat import render_messages  # noqa: E402
from lmforge.hub_tokenizer import HubTokenizer  # noqa: E402
from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model  # noqa: E402

# Qwen2's split (single digits, GPT-4-like otherwise). transformers 5 rebuilds a Qwen2 tokenizer with this
# pattern whatever tokenizer.json says, so the test's tokenizer.json has it too, as real Qwen files do.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the weather in Paris?"}]


def ok(result):
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(hub folder, the transformers model, its tokenizer): a random Qwen2ForCausalLM in bf16 shards."""
    root = tmp_path_factory.mktemp("open_weights")
    bl = byte_level_tokenizer(corpus(), QWEN2_SPLIT)
    end, eot = bl.token_to_id("<|im_end|>"), bl.token_to_id("<|endoftext|>")
    folder = write_folder(root / "hf", bl, {"bos_token": None, "eos_token": "<|im_end|>",
                                            "pad_token": "<|endoftext|>", "chat_template": CHATML},
                          eos_ids=[end, eot])
    config = transformers.Qwen2Config(vocab_size=bl.get_vocab_size() + 3, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, eos_token_id=[end, eot], pad_token_id=eot)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, max_shard_size="100KB")  # several shards and an index
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder, model, tok


@pytest.fixture(scope="module")
def imported(hub, tmp_path_factory):
    run = tmp_path_factory.mktemp("imported")
    out = ok(run_cli("import", hub[0], "--out", run))
    assert "Qwen2ForCausalLM" in out
    return run


def test_import_keeps_bf16_and_brings_the_chat_template(hub, imported):
    folder, theirs, hf_tok = hub
    model, _ = load_model(imported)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tok = load_checkpoint_tokenizer(imported)
    assert isinstance(tok, HubTokenizer)
    want = hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert render_messages(tok, CHAT) == list(want)
    ids = torch.tensor([render_messages(tok, CHAT)])
    with torch.no_grad():
        # the same bf16 weights; the libraries round differently inside, so compare as bf16 outputs do
        torch.testing.assert_close(model(ids), theirs(ids).logits.float(), rtol=0, atol=0.05)


def test_chat_and_serve(hub, imported, monkeypatch):
    from fastapi.testclient import TestClient

    from lmforge.inference.engine import Engine
    from lmforge.serve.app import ServeConfig, create_app

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nhow are you\n/quit\n"))
    ok(run_cli("chat", "--checkpoint", imported, "--max-new-tokens", "8", "--temperature", "0"))

    model, _ = load_model(imported)
    tok = load_checkpoint_tokenizer(imported)
    with TestClient(create_app(model, tok, ServeConfig(api_key="k"))) as client:
        auth = {"Authorization": "Bearer k"}
        name = client.get("/v1/models", headers=auth).json()["data"][0]["id"]
        r = client.post("/v1/chat/completions", headers=auth,
                        json={"model": name, "messages": CHAT, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        prompt = render_messages(tok, CHAT)
        assert body["usage"]["prompt_tokens"] == len(prompt)  # the model's own template
        [ref] = Engine(model, tok).generate([prompt], 12, temperature=0)
        assert body["choices"][0]["message"]["content"] == ref.text
        # tools go to the template, which lists them in the system turn
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        r = client.post("/v1/chat/completions", headers=auth,
                        json={"model": name, "messages": CHAT, "max_tokens": 4, "temperature": 0, "tools": tools})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(render_messages(tok, CHAT, tools=tools)) > len(prompt)


def test_eval_counts_the_bytes_with_the_models_tokenizer(hub, imported, tmp_path):
    folder, theirs, hf_tok = hub
    text = "The quick brown fox jumps over the lazy dog. Naïve café, 21 °C!\n" * 4
    (tmp_path / "t.txt").write_text(text)
    ok(run_cli("eval", "--checkpoint", imported, "--text", tmp_path / "t.txt", "--out", tmp_path / "r.json",
               "--no-progress"))
    metrics = next(v["metrics"] for v in json.loads((tmp_path / "r.json").read_text())["tasks"].values())
    assert metrics["bytes"] == len(text.encode())
    # the same number from transformers: the text's tokens after the document prefix (the eos token, as
    # lm-evaluation-harness does for a model without a bos token), in nats, over the UTF-8 bytes
    ids = [hf_tok.eos_token_id] + hf_tok(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(theirs(x).logits.float()[0, :-1], -1).gather(1, x[0, 1:, None]).sum()
    assert metrics["bits_per_byte"] == pytest.approx(-logp.item() / math.log(2) / len(text.encode()), rel=0.01)


def test_sft_lora_dpo_grpo_quantize_and_export_back(hub, imported, tmp_path):
    folder, theirs, hf_tok = hub
    common = ["--no-progress", "--device", "cpu", "--dtype", "fp32"]
    sft = tmp_path / "sft"
    uniform = math.log(load_model(imported)[0].vocab_size)  # a random model's loss: ~ln(vocab)
    # The replies are learned through the model's own template: the full model memorises them; LoRA
    # adapters on every matrix of this tiny random model move more slowly, but move.
    for run, extra, below in ((sft, [], 2.0), (tmp_path / "lora", ["--lora-rank", 16, "--lora-targets", "all"],
                                                                   uniform - 0.3)):
        out = ok(run_cli("sft", "--checkpoint", imported, "--data", "synthetic:identity:64", "--out", run,
                         "--max-steps", 30, "--batch-size", 8, "--lr", "3e-2" if extra else "1e-2", *extra,
                         "--compile", "off", "--eval-every", 30, *common))
        result = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]
        assert result["val_loss"] < below, (extra, result)
    assert isinstance(load_checkpoint_tokenizer(sft), HubTokenizer)  # the tokenizer travels on

    ok(run_cli("dpo", "--checkpoint", imported, "--data", "synthetic:arithmetic:24", "--out", tmp_path / "dpo",
               "--max-steps", 2, "--batch-size", 4, "--eval-every", 0, *common))
    ok(run_cli("grpo", "--checkpoint", imported, "--task", "arithmetic", "--out", tmp_path / "grpo",
               "--max-steps", 2, "--group-size", 2, "--prompts-per-step", 2, "--max-new-tokens", 6,
               "--eval-n", 4, "--eval-every", 0, *common))

    ok(run_cli("quantize", "--checkpoint", imported, "--out", tmp_path / "int8"))
    qtok = load_checkpoint_tokenizer(tmp_path / "int8")
    assert isinstance(qtok, HubTokenizer)
    generated = ok(run_cli("generate", "--checkpoint", tmp_path / "int8", "Paris", "--max-new-tokens", 6,
                           "--temperature", "0"))
    assert generated.strip()

    # export back: transformers loads the same model and the same tokenizer (bf16 kept by default)
    ok(run_cli("export", "--checkpoint", imported, tmp_path / "back"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert next(back.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([back_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True,
                                                     return_dict=False)])
    assert ids[0].tolist() == hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True,
                                                         return_dict=False)
    # the very same tensors, bit for bit
    mine, original = back.state_dict(), theirs.state_dict()
    assert mine.keys() == original.keys() and all(torch.equal(mine[k], original[k]) for k in mine)


def test_tool_calls_through_the_models_own_template(imported):
    """A scripted model with the imported ChatML tokenizer: the server puts the tools into the model's
    template, reads the call between its <tool_call> tokens, and renders the tool result the template's
    way for the answer."""
    from fastapi.testclient import TestClient
    from test_serve import say, scripted_model

    from lmforge.serve.app import ServeConfig, create_app

    tok = load_checkpoint_tokenizer(imported)
    start, end = tok.tool_call_ids
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                               "parameters": {"type": "object", "properties": {
                                                   "expression": {"type": "string"}}}}}]
    question = {"role": "user", "content": "What is 12*7?"}
    call = {"name": "calculator", "arguments": {"expression": "12*7"}}
    first = render_messages(tok, [question], tools=tools)
    reply1 = [start] + tok.encode("\n" + json.dumps(call) + "\n") + [end]
    made_call = {"id": "c1", "type": "function",
                 "function": {"name": "calculator", "arguments": json.dumps(call["arguments"])}}
    answer_prompt = render_messages(tok, [question, {"role": "assistant", "content": None, "tool_calls": [made_call]},
                                          {"role": "tool", "tool_call_id": "c1", "content": "84"}], tools=tools)
    reply2 = tok.encode("It is 84.") + [tok.end_of_turn_id]
    script = say(say({}, len(first), reply1), len(answer_prompt), reply2)
    model = scripted_model(tok, script, fill=tok.encode("a")[0], block_size=len(answer_prompt) + len(reply2) + 8)
    with TestClient(create_app(model, tok, ServeConfig(model_name="m"))) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [question], "tools": tools,
                                                      "temperature": 0, "max_tokens": 60})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        [made] = choice["message"]["tool_calls"]
        assert made["function"]["name"] == "calculator"
        assert json.loads(made["function"]["arguments"]) == call["arguments"]
        messages = [question, {**choice["message"], "tool_calls": [{**made, "id": "c1"}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "84"}]
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "tools": tools,
                                                      "temperature": 0, "max_tokens": 60})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "It is 84."
        assert r.json()["choices"][0]["finish_reason"] == "stop"
