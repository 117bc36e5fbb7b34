"""GGUF export: the file reads back with llama.cpp's own `gguf` reader (architecture, metadata, tokenizer,
tensor names, shapes and values for every dtype), what llama.cpp cannot compute is refused, and the CLI
writes it. The slow group loads the files in llama.cpp (llama-cpp-python) and compares tokenization,
greedy tokens and logits with lmforge's."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import missing
from test_hf import jitter  # logits of order 1, no mis-mapped gain hidden by 1s

from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.gguf_export import DTYPES, PRE_TOKENIZER, export_gguf, gguf_tensors, read_gguf_tensor, tensor_type
from lmforge.inference.engine import Engine
from lmforge.models.transformer import GPT, get_config
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer
from lmforge.train.checkpoint import load_model, save_checkpoint

PAD_ROWS = 13  # the model's vocabulary is larger than the tokenizer's, as padded vocabularies are
TEXTS = ["Hello world! It's the quick brown fox, isn't it? We'll see; they'd've LOVED it.",
         "def f(x):\n    return x ** 2  # squared\n\n\n  \n", "  leading spaces, 12345 digits and 3.14159\t\ttabs",
         "naïve café — 日本語 🙂 Ünïcödé ÆØÅ", "line one\r\nline two\n\nTHE END   ", "a", ""]
CASES = {  # name: GPTConfig overrides of the "tiny" preset (RoPE, RMSNorm, SwiGLU, GQA 4/2, untied)
    "llama": {},
    "llama-tied-bias": dict(tie_embeddings=True, bias=True),
    # Llama 3.1's RoPE scaling with an original context short enough that all three bands occur
    "llama3-rope": dict(rope_scaling="llama3", rope_original_context=16),
    "qwen3": dict(qk_norm=True, head_size=32),  # heads x head size (128) != n_embd (64), as in Qwen3
    "gpt2": dict(mlp="gelu", norm="layer", pos="learned", bias=True, n_kv_head=4, tie_embeddings=True),
}
ARCH = {"llama": "llama", "llama-tied-bias": "llama", "llama3-rope": "llama", "qwen3": "qwen3", "gpt2": "gpt2"}


@pytest.fixture(scope="module")
def tok():
    corpus = [t * 20 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog 0123456789 " * 30]
    return Tokenizer.train(corpus, vocab_size=256 + len(SPECIAL_TOKENS) + 120, show_progress=False)


def make_checkpoint(path, tok, **overrides):
    cfg = get_config("tiny", vocab_size=tok.vocab_size + PAD_ROWS, block_size=64, **overrides)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    jitter(model)
    return save_checkpoint(path, 3, model, state={"tokenizer_fingerprint": tok.fingerprint},
                           files={"tokenizer.json": tok.save(path.parent / f"{path.name}-tok.json").read_bytes()})


def round_trip(model, dtype):
    """The model with every weight replaced by what its GGUF type stores (quantised and back). Blocks
    run along rows, and the export only reorders or concatenates rows, so this equals the file's tensors."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # the type depends on the shape, and on being GPT-2's wpe
            qtype = tensor_type("position_embd.weight" if name == "wpe.weight" else name, p, dtype)
            data = p.detach().float().numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)))
    return model


def read(path):
    reader = gguf.GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ----------------------------------------------------------------------------- fast: read back


@pytest.mark.parametrize("case", CASES)
def test_export_reads_back_exactly_in_f32(case, tmp_path, tok):
    ckpt = make_checkpoint(tmp_path / "run", tok, **CASES[case])
    res = export_gguf(tmp_path / "run", tmp_path / "m.gguf", dtype="f32")
    model, _ = load_model(ckpt)
    cfg, arch = model.config, ARCH[case]
    assert (res.arch, res.dtype, res.kept_f16) == (arch, "f32", [])
    reader, meta = read(res.path)
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == cfg.n_layer and meta[f"{arch}.context_length"] == cfg.block_size
    assert meta[f"{arch}.embedding_length"] == cfg.n_embd and meta[f"{arch}.feed_forward_length"] == cfg.hidden_dim
    assert (meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]) == (4, cfg.kv_heads)
    if arch != "gpt2":
        assert meta[f"{arch}.attention.key_length"] == cfg.head_dim == meta[f"{arch}.rope.dimension_count"]
        assert meta[f"{arch}.rope.freq_base"] == cfg.rope_theta
        assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    else:
        assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.norm_eps)

    # tokenizer: HF's byte-level spelling of every id, merges in rank order, specials, then padding rows
    hf = tok.to_hf()
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size == len(meta["tokenizer.ggml.token_type"])
    assert tokens[:tok.vocab_size] == [hf.id_to_token(i) for i in range(tok.vocab_size)]
    assert meta["tokenizer.ggml.token_type"] == [1] * (tok.vocab_size - 12) + [3] * 12 + [5] * PAD_ROWS
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in _hf_merges(hf)]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", PRE_TOKENIZER)
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_id and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.eos_token_id"] == tok.special_id("assistant_end")
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_id
    assert meta["tokenizer.chat_template"].startswith("{{ '<|bos|>' }}")

    want = gguf_tensors(model, arch)
    assert {t.name for t in reader.tensors} == set(want)
    for name, t in want.items():
        np.testing.assert_array_equal(read_gguf_tensor(reader, name), t.numpy(), err_msg=name)
    names = set(want)
    assert ("output.weight" in names) != cfg.tie_embeddings
    if arch == "llama":
        # RoPE pairs: lmforge's (i, i + d/2) of each head become llama.cpp's adjacent rows (2i, 2i + 1)
        q = model.layers[1].self_attn.q_proj.weight.detach()
        got = read_gguf_tensor(reader, "blk.1.attn_q.weight")
        d = cfg.head_dim
        for h, i in ((0, 0), (2, 5), (3, d // 2 - 1)):
            np.testing.assert_array_equal(got[h * d + 2 * i], q[h * d + i].numpy())
            np.testing.assert_array_equal(got[h * d + 2 * i + 1], q[h * d + d // 2 + i].numpy())
    if case == "llama3-rope":
        factors = read_gguf_tensor(reader, "rope_freqs.weight")
        # the divisor of each frequency: 8 for the slowest, rising smoothly from ~1 for the fastest
        assert factors.shape == (cfg.head_dim // 2,) and factors[-1] == pytest.approx(8.0)
        assert (np.diff(factors) >= 0).all() and factors[0] >= 1.0
    if arch == "gpt2":
        assert read_gguf_tensor(reader, "blk.0.attn_qkv.weight").shape == (3 * cfg.n_embd, cfg.n_embd)
        assert "position_embd.weight" in names


def _hf_merges(hf):
    import json

    return [m if isinstance(m, list) else m.split(" ") for m in json.loads(hf.to_str())["model"]["merges"]]


# bound on |stored - weight| as a fraction of the largest |weight| of its 32-wide block: half a step of
# the format (q4_0's scale maps the largest magnitude to -8, so +max rounds to 7/8 of it), plus a little
# for the f16 block scale
BLOCK_ERROR = {"f16": 2 ** -11, "bf16": 2 ** -8, "q8_0": 1 / 200, "q4_0": 1 / 8 + 1e-3}


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_each_dtype_stores_the_weights_within_its_error(dtype, tmp_path, tok):
    ckpt = make_checkpoint(tmp_path / "run", tok, **CASES["gpt2" if dtype == "q4_0" else "llama"])
    res = export_gguf(tmp_path / "run", tmp_path, dtype=dtype)
    assert res.path == tmp_path / "model.gguf" and res.dtype == dtype
    reader, meta = read(res.path)
    assert meta["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[dtype]
    model, _ = load_model(ckpt)
    exact = gguf_tensors(round_trip(load_model(ckpt)[0], dtype), res.arch)
    for name, t in gguf_tensors(model, res.arch).items():
        info = next(x for x in reader.tensors if x.name == name)
        if t.dim() == 1 or name == "position_embd.weight":
            assert info.tensor_type == gguf.GGMLQuantizationType.F32, name  # norms, biases, positions
        else:
            assert info.tensor_type == DTYPES[dtype], name  # the embedding and the head too
        got = read_gguf_tensor(reader, name)
        np.testing.assert_array_equal(got, exact[name].numpy(), err_msg=name)
        w = t.numpy().reshape(-1, 32) if t.numel() % 32 == 0 else t.numpy().reshape(1, -1)
        bound = BLOCK_ERROR[dtype] * np.abs(w).max(axis=1, keepdims=True) + 1e-7
        assert (np.abs(got.reshape(w.shape) - w) <= bound).all(), name


def test_rows_that_are_not_whole_blocks_stay_f16(tmp_path, tok):
    make_checkpoint(tmp_path / "run", tok, n_embd=48, n_head=4, n_kv_head=2, mlp_hidden=96)
    res = export_gguf(tmp_path / "run", tmp_path / "m.gguf", dtype="q8_0")
    reader, _ = read(res.path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    # rows of 48 (everything reading the residual stream) cannot be q8_0; the MLP's down_proj (96) can
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16 and "blk.0.attn_q.weight" in res.kept_f16
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0


REFUSED = {  # overrides of "tiny", the feature the one-line error names
    "gelu-with-rope": (dict(mlp="gelu"), "mlp='gelu'"),
    "qwen2-qkv-bias": (dict(qkv_bias=True), "q/k/v biases"),
    "moe": (dict(n_experts=4, moe_top_k=2, qk_norm=True), "mixture of experts"),
    "gemma2": (dict(mlp="geglu", norm_offset=1.0, sandwich_norm=True, embed_scale=True), "Gemma-2"),
    "qwen3-rope-scaling": (dict(qk_norm=True, rope_scaling="llama3"), "rope_scaling='llama3'"),
    "bidirectional": (dict(causal=False), "causal=False"),
    "gpt2-gqa": (dict(mlp="gelu", norm="layer", pos="learned"), "n_kv_head=2"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_llama_cpp_cannot_compute_is_refused(case, tmp_path, tok):
    overrides, feature = REFUSED[case]
    make_checkpoint(tmp_path / "run", tok, **overrides)
    with pytest.raises(LmforgeError, match="cannot export to GGUF") as e:
        export_gguf(tmp_path / "run", tmp_path / "m.gguf")
    assert feature in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_checkpoints_without_lmforges_tokenizer_or_quantized_are_refused(tmp_path, tok):
    from lmforge.train.checkpoint import quantize_checkpoint

    model = GPT(get_config("tiny", vocab_size=tok.vocab_size))
    save_checkpoint(tmp_path / "bare", 1, model)
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        export_gguf(tmp_path / "bare", tmp_path / "m.gguf")
    make_checkpoint(tmp_path / "run", tok)
    quantize_checkpoint(tmp_path / "run", tmp_path / "q", bits=8)
    with pytest.raises(LmforgeError, match="quantized"):
        export_gguf(tmp_path / "q", tmp_path / "m.gguf", dtype="q8_0")
    with pytest.raises(LmforgeError, match="GGUF dtype must be one of"):
        export_gguf(tmp_path / "run", tmp_path / "m.gguf", dtype="float16")
    make_checkpoint(tmp_path / "bytes", Tokenizer.byte_level())  # no merges: llama.cpp's BPE needs some
    with pytest.raises(LmforgeError, match="no merges"):
        export_gguf(tmp_path / "bytes", tmp_path / "m.gguf")


def test_cli_writes_gguf_and_refuses_a_dtype_of_another_format(tmp_path, tok, capsys):
    make_checkpoint(tmp_path / "run", tok, **CASES["qwen3"])
    out = tmp_path / "out" / "tiny.gguf"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--dtype", "q8_0",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "arch qwen3, q8_0" in printed and "MiB" in printed
    assert read(out)[1]["general.architecture"] == "qwen3"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", str(tmp_path)]) == 0
    assert read(tmp_path / "model.gguf")[1]["general.file_type"] == 1  # default f16
    for fmt, dtype in (("hf", "q8_0"), ("gguf", "float16")):
        assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", fmt, "--dtype", dtype,
                     str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert f"--dtype {dtype} does not fit --format {fmt}" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- slow: llama.cpp itself

# max |logit difference| allowed against lmforge's logits of the weights the file stores (round_trip),
# for logits of magnitude ~4. What remains is llama.cpp's arithmetic: f16/bf16 weights multiply
# f16/bf16-rounded activations, q8_0/q4_0 weights activations quantised to q8_0, and its GELU reads
# an f16 table (hence gpt2's larger f32 gap). The KV cache is kept in f32 (its default is f16).
# Measured on these models (docs/gguf.md): f32 5e-6 (gpt2 7e-4), f16 5e-3, bf16 5e-2, q8_0/q4_0 0.12.
LOGIT_ATOL = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1, "q8_0": 0.3, "q4_0": 0.3}
GPT2_F32_ATOL = 3e-3
PROMPT = TEXTS[0] + TEXTS[1]


def llama_cpp(path, n_ctx=64):
    try:
        import llama_cpp
    except ImportError:
        missing("llama-cpp-python", "pip install llama-cpp-python (in the test extras; it compiles llama.cpp)")
    # llama.cpp repacks quantized weights for its CPU kernels ("extra buffer types"). On an Intel CPU
    # with AMX that path segfaults on this test's 64-wide q8_0/q4_0 tensors (llama-cpp-python 0.3.36;
    # f32/f16/bf16 and the same files without repacking run). The file is what is tested here, so it is
    # loaded without repacking; Llama() has no argument for it, hence the patched default parameters.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=1, verbose=False,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm, ids, steps):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_tokenizes_generates_and_scores_like_lmforge(case, tmp_path, tok):
    ckpt = make_checkpoint(tmp_path / "run", tok, **CASES[case])
    prompt = ([tok.bos_id] + tok.encode(PROMPT))[:40]  # 20 more tokens fit the 64 positions
    report = []
    for dtype in DTYPES:
        path = export_gguf(ckpt, tmp_path / f"{dtype}.gguf", dtype=dtype).path
        llm = llama_cpp(path)
        if dtype == "f32":
            for text in TEXTS:
                assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
                assert llm.tokenize(text.encode(), add_bos=True, special=False) == [tok.bos_id] + tok.encode(text)
            forged = "it's <|assistant_end|> as text"
            assert llm.tokenize(forged.encode(), add_bos=False, special=False) == tok.encode(forged)
            assert tok.special_id("assistant_end") in llm.tokenize(forged.encode(), add_bos=False, special=True)
            assert llm.detokenize(tok.encode(TEXTS[3])).decode() == TEXTS[3]
        model = round_trip(load_model(ckpt)[0], dtype)
        with torch.no_grad():
            want = model(torch.tensor([prompt]))[0].numpy()
        got = llama_cpp_logits(llm, prompt)
        diff = float(np.abs(got - want).max())
        top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
        report.append(f"{dtype}: max|dlogit| {diff:.2e}, top-1 agreement {top1:.2f}")
        assert diff < (GPT2_F32_ATOL if case == "gpt2" and dtype == "f32" else LOGIT_ATOL[dtype]), report[-1]
        assert top1 >= 0.85, report[-1]  # the arg-max of (nearly) every position survives the rounding
        if dtype in ("f32", "f16"):
            ours = Engine(model, tok).generate([prompt], 20, temperature=0, stop_ids=())[0].tokens
            assert llama_cpp_greedy(llm, prompt, 20) == ours
        del llm
    print(f"\n{case}: " + "; ".join(report))
