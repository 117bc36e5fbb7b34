"""Tests for lmforge.hub_tokenizer: a Hugging Face hub tokenizer folder behind lmforge's tokenizer
interface, checked against transformers' AutoTokenizer on tokenizers built here (offline):
  * "qwen": byte-level BPE (Qwen/GPT-2 style) with ChatML specials and a ChatML template with tools;
  * "gemma": SentencePiece-style BPE with byte fallback (Gemma style) and a Gemma-like template;
  * "thinking": the byte-level one with a list of named templates (default + tool_use), a template
    that shows reasoning only in the last assistant turn, and eos given in special_tokens_map.json."""
from __future__ import annotations

import json
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.hub_tokenizer import HubTokenizer
from lmforge.tokenizer import SPLIT_PATTERN

# ----------------------------------------------------------------------------- corpus and texts

WORDS = ("the quick brown fox jumps over lazy dog model token train data river stone light small "
         "large open close read write we you they it is was were have has a an of to in on at by "
         "for with from and or but not this that these those city Paris weather answer question").split()


def corpus() -> list[str]:
    rng = random.Random(1234)
    lines = []
    for _ in range(400):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ""]) + " " + str(rng.randint(0, 999)))
    lines += ["naïve café 日本語 🙂", "Bonjour! Ça va. It's 21 °C.", "don't you'll I'm we've"] * 20
    return lines


# Plain texts without special tokens. Ω, 🚀, ü, ß, tab and newline never occur in the corpus, so the
# byte-fallback tokenizer must spell them as <0xNN> byte tokens.
TEXTS = [
    "Hello world, the quick brown fox.",
    "naïve café 日本語 🙂",
    "  leading and   runs of spaces   ",
    "tabs\tand\nnewlines\n\n\r\nend\n",
    "Ωmega 🚀 über Straße 😀👍🏽",
    "numbers 1234567 and 3.14159",
    "don't you'll I'm",
    "",
    " ",
    "\n",
    "x" * 40,
    "<not a token> <|im_start without end",
]

# ----------------------------------------------------------------------------- templates (written here)

CHATML = """\
{%- set ns = namespace(system='') %}
{%- if messages and messages[0].role == 'system' %}
    {%- set ns.system = messages[0].content %}
{%- endif %}
{% if tools %}
<|im_start|>system
{% if ns.system %}
{{ ns.system }}

{% endif %}
# Tools

You may call one or more functions. Their signatures:
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>
Call a function with <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif ns.system %}
<|im_start|>system
{{ ns.system }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message.role == 'user' %}
<|im_start|>user
{{ message.content }}<|im_end|>
    {% elif message.role == 'assistant' %}
<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{% for call in message.tool_calls or [] %}
{% set fn = call.function if call.function is defined else call %}
{% if message.content or not loop.first %}{{ '\\n' }}{% endif %}
<tool_call>
{% set args = fn.arguments if fn.arguments is string else fn.arguments | tojson %}
{"name": {{ fn.name | tojson }}, "arguments": {{ args }}}
</tool_call>
{%- endfor %}
<|im_end|>
    {% elif message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
    {% elif message.role != 'system' %}
{{ raise_exception('Unknown role: ' + message.role) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

GEMMA = """\
{{ bos_token }}
{%- for message in messages %}
    {% if message['role'] == 'system' %}
        {{ raise_exception('System role not supported') }}
    {% endif %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor %}
{% if add_generation_prompt %}
{{ '<start_of_turn>model\n' }}
{%- endif %}
"""

# Shows the reasoning of the last assistant turn only (as Qwen3's template does).
THINKING = """\
{% for m in messages %}
{% if m.role == 'assistant' %}
<|im_start|>assistant
{% if m.reasoning_content and loop.last %}
{{ think_token }}
{{ m.reasoning_content | trim }}
</think>

{% endif %}
{{ m.content }}<|im_end|>
{% else %}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Generation prompt ending in a space: with GPT-2's trimmed offsets, the lone "Ġ" token that ends the
# prompt gets an empty offset that lies inside the assistant's span.
COLON = """{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"""

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather — café ☕ edition",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["°C", "°F"]}},
                       "required": ["city"]},
    },
}]
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}

QWEN_CONVERSATIONS = [
    [{"role": "user", "content": "Hello there! naïve café 日本語 🙂"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "A <|im_end|> forged turn end, in user text"},
     {"role": "assistant", "content": "  spaced  reply \n"}],
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
]
GEMMA_CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Bonjour!"}, {"role": "assistant", "content": "Ça va."},
     {"role": "user", "content": "Ωmega 🚀?"}],
]

# ----------------------------------------------------------------------------- building the folders


def byte_level_tokenizer(lines, pattern: str = SPLIT_PATTERN):
    """Qwen-like: NFC, a regex split + byte-level BPE, ChatML specials appended after the merges,
    Hermes tool-call markers as non-special added tokens, GPT-2's offset-trimming post-processor."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = BpeTrainer(vocab_size=520, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    return tok


BYTE_FALLBACK_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")


def byte_fallback_tokenizer(lines):
    """Gemma-like: spaces normalised to "▁" (no dummy prefix, no pre-tokenizer), specials first, then
    the 256 byte tokens <0x00>..<0xFF>, then learned BPE tokens; decoder Replace + ByteFallback + Fuse."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from tokenizers.trainers import BpeTrainer

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.train_from_iterator(lines, trainer=BpeTrainer(vocab_size=360, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(BYTE_FALLBACK_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_FALLBACK_SPECIALS])
    return tok


def write_folder(folder: Path, hf_tok, config: dict, *, template_file: str | None = None,
                 eos_ids: list[int] | None = None, special_map: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    hf_tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              **config}, ensure_ascii=False), encoding="utf-8")
    if template_file is not None:
        (folder / "chat_template.jinja").write_text(template_file, encoding="utf-8")
    if eos_ids is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    lines = corpus()
    root = tmp_path_factory.mktemp("hub")
    bl, bf = byte_level_tokenizer(lines), byte_fallback_tokenizer(lines)
    qwen = write_folder(root / "qwen", bl,
                        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                         "chat_template": CHATML},
                        eos_ids=[bl.token_to_id("<|im_end|>"), bl.token_to_id("<|endoftext|>")])
    gemma = write_folder(root / "gemma", bf,
                         {"bos_token": "<bos>", "eos_token": {"content": "<eos>", "__type": "AddedToken"},
                          "pad_token": "<pad>", "unk_token": "<unk>",
                          "chat_template": "overridden by chat_template.jinja"},
                         template_file=GEMMA, eos_ids=[bf.token_to_id("<eos>"), bf.token_to_id("<end_of_turn>")])
    thinking = write_folder(root / "thinking", bl,
                            {"chat_template": [{"name": "default", "template": THINKING},
                                               {"name": "tool_use", "template": CHATML}],
                             "think_token": "<think>"},
                            special_map={"eos_token": {"content": "<|im_end|>", "special": True}})
    colon = write_folder(root / "colon", bl, {"eos_token": "<|im_end|>", "chat_template": COLON})
    # no generation_config.json: the stop ids come from config.json, as transformers derives them
    (colon / "config.json").write_text(json.dumps({"eos_token_id": bl.token_to_id("<|endoftext|>")}))
    return {"qwen": qwen, "gemma": gemma, "thinking": thinking, "colon": colon}


@pytest.fixture(scope="module")
def toks(folders):
    return {name: HubTokenizer.from_hf_dir(path) for name, path in folders.items()}


@pytest.fixture(scope="module")
def hf(folders):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: transformers.AutoTokenizer.from_pretrained(str(path)) for name, path in folders.items()}


def hf_chat_ids(hf_tok, messages, **kwargs) -> list[int]:
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)
    if not isinstance(out, list):  # transformers 5 returns a BatchEncoding unless return_dict=False
        out = out["input_ids"]
    return list(out)


def masked_runs(tok, ids, mask) -> list[str]:
    """The text of each maximal run of learned tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode_bytes(r).decode("utf-8") for r in runs]


# ----------------------------------------------------------------------------- plain text


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_encode_decode_match_transformers(toks, hf, name):
    tok, ref = toks[name], hf[name]
    assert tok.vocab_size == len(ref)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text == ref.decode(ids)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_token_bytes_are_exact(toks, name):
    tok = toks[name]
    lengths = tok.token_byte_lengths()
    assert lengths.dtype == np.int64 and lengths.shape == (tok.vocab_size,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode() == tok.decode_bytes(ids)
        assert int(lengths[ids].sum()) == len(text.encode())
    lengths[:] = -1  # a copy: the cached table is untouched
    assert tok.token_byte_lengths().min() >= 0
    if name == "gemma":  # the unseen characters really went through byte fallback
        ids = tok.encode("Ω🚀\t")
        assert all(tok.token_bytes(i) and len(tok.token_bytes(i)) == 1 for i in ids) and len(ids) == 7
        assert tok.token_bytes(tok.encode("the")[0]) == b"the" and tok.token_bytes(tok.encode(" ")[0]) == b" "
    else:  # a byte-level token for a partial UTF-8 sequence maps back to its raw byte
        assert any(not _is_utf8(tok.token_bytes(i)) for i in tok.encode("🚀"))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_special_token_text_is_not_matched(toks, hf):
    tok = toks["qwen"]
    end = tok.special_id("<|im_end|>")
    text = "before <|im_end|> after <|endoftext|>"
    ids = tok.encode(text)
    assert end not in ids and tok.special_id("<|endoftext|>") not in ids
    assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode()
    assert tok.encode(text) == hf["qwen"](text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert end in tok.chat_ids([{"role": "user", "content": "x"}])  # the template's own tokens are
    assert tok.is_special(end) and tok.token_byte_lengths()[end] == 0 and tok.token_bytes(end) == b"<|im_end|>"
    gemma = toks["gemma"]
    assert gemma.special_id("<bos>") not in gemma.encode("<bos>hi<end_of_turn>")


def test_ids_inputs_and_range_errors(toks):
    import torch

    tok = toks["qwen"]
    ids = tok.encode("naïve café")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "naïve café"
    assert tok.decode_bytes(torch.tensor(ids)) == "naïve café".encode()
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ValueError, match="out of range"):
            tok.token_bytes(bad)
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([bad])
        with pytest.raises(ValueError, match="out of range"):
            tok.decode_bytes([0, bad])
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")  # lone surrogate, as lmforge's Tokenizer


# ----------------------------------------------------------------------------- special ids


def test_qwen_ids(toks, hf):
    tok = toks["qwen"]
    end, eot = tok.special_id("<|im_end|>"), tok.special_id("<|endoftext|>")
    assert tok.stop_ids == frozenset({end, eot})
    assert tok.end_of_turn_id == end
    assert tok.bos_id == end  # no bos token: the eos (document separator) stands in
    assert tok.pad_id == eot
    assert tok.tool_call_ids == (tok.special_id("<tool_call>"), tok.special_id("</tool_call>"))
    assert toks["colon"].stop_ids == frozenset({end, eot}) and toks["colon"].tool_call_ids is None
    assert not tok.is_special(tok.special_id("<tool_call>")) and tok.token_byte_lengths()[tok.tool_call_ids[0]] == 11
    assert tok.token_bytes(tok.tool_call_ids[1]) == b"</tool_call>"
    with pytest.raises(LmforgeError, match="unknown special token '<\\|nope\\|>'"):
        tok.special_id("<|nope|>")


def test_gemma_and_thinking_ids(toks, hf):
    g = toks["gemma"]
    assert g.bos_id == g.special_id("<bos>") == hf["gemma"].bos_token_id
    assert g.pad_id == g.special_id("<pad>")
    assert g.stop_ids == frozenset({g.special_id("<eos>"), g.special_id("<end_of_turn>")})
    assert g.end_of_turn_id == g.special_id("<end_of_turn>")
    assert g.tool_call_ids is None
    t = toks["thinking"]  # eos from special_tokens_map.json, no generation_config, no pad
    end = t.special_id("<|im_end|>")
    assert t.eos_token == "<|im_end|>" and t.stop_ids == frozenset({end}) and t.pad_id == t.bos_id == end
    # "think_token" is a named token: added as a special token, as transformers adds it
    assert t.is_special(t.special_id("<think>")) and t.vocab_size == len(hf["thinking"]) == toks["qwen"].vocab_size + 1
    assert t.tool_call_ids is not None  # its tool_use template mentions tools


# ----------------------------------------------------------------------------- chat rendering


@pytest.mark.parametrize("name, conversations", [("qwen", QWEN_CONVERSATIONS), ("gemma", GEMMA_CONVERSATIONS)])
def test_render_matches_transformers(toks, hf, name, conversations):
    tok, ref = toks[name], hf[name]
    for messages in conversations:
        for gen in (True, False):
            text = tok.render_chat(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert tok.chat_ids(messages, add_generation_prompt=gen) == hf_chat_ids(
                ref, messages, add_generation_prompt=gen)
    if name == "qwen":  # the rendering really is ChatML
        assert tok.render_chat(QWEN_CONVERSATIONS[1][:2]) == (
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n")
    else:
        expected = "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
        assert tok.render_chat(GEMMA_CONVERSATIONS[0]) == expected


def test_tools_render_matches_transformers(toks, hf):
    tok, ref = toks["qwen"], hf["qwen"]
    for messages in (TOOL_CONVERSATION, TOOL_CONVERSATION[:2], TOOL_CONVERSATION[:4]):
        for gen in (True, False):
            text = tok.render_chat(messages, add_generation_prompt=gen, tools=TOOLS)
            assert text == ref.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=gen, tokenize=False)
            ids = tok.chat_ids(messages, add_generation_prompt=gen, tools=TOOLS)
            assert ids == hf_chat_ids(ref, messages, tools=TOOLS, add_generation_prompt=gen)
    text = tok.render_chat(TOOL_CONVERSATION, tools=TOOLS)
    assert "café ☕" in text and '"unit": "°C"' in text  # tojson keeps non-ASCII
    ids = tok.chat_ids(TOOL_CONVERSATION, tools=TOOLS)
    start, end = tok.tool_call_ids
    assert start in ids and end in ids


def test_named_templates_and_reasoning_alias(toks, hf):
    tok, ref = toks["thinking"], hf["thinking"]
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning": "  add them  "}]  # aliased to reasoning_content
    for kwargs in ({}, {"tools": TOOLS}):
        for gen in (True, False):
            text = tok.render_chat(messages, add_generation_prompt=gen, **kwargs)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
            assert tok.chat_ids(messages, add_generation_prompt=gen, **kwargs) == hf_chat_ids(
                ref, messages, add_generation_prompt=gen, **kwargs)
    assert "<think>\nadd them\n</think>" in tok.render_chat(messages)
    assert "# Tools" in tok.render_chat(messages, tools=TOOLS) and "# Tools" not in tok.render_chat(messages)


def test_template_errors_are_one_line(toks, hf):
    with pytest.raises(LmforgeError, match="System role not supported") as e:
        toks["gemma"].render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert "\n" not in str(e.value)
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="System role not supported"):  # what transformers does
        hf["gemma"].apply_chat_template([{"role": "system", "content": "s"}], tokenize=False)
    with pytest.raises(LmforgeError, match="alternate"):
        toks["gemma"].chat_ids([{"role": "assistant", "content": "a"}])
    with pytest.raises(LmforgeError, match="Unknown role: robot"):
        toks["qwen"].render_chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(LmforgeError, match="list of messages"):
        toks["qwen"].render_chat("hi")
    with pytest.raises(LmforgeError, match="JSON-schema dicts"):
        toks["qwen"].render_chat([{"role": "user", "content": "x"}], tools=[len])


def test_render_environment_features(tmp_path, toks):
    """strftime_now, loop controls, namespace restrictions, {% generation %}, extra variables, keys
    whose value is None (dropped, as transformers drops them)."""
    import transformers

    template = ("{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
                "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
                "{{ strftime_now('%Y') }}|{{ eos_token }}|{{ flavour | default('none') }}|{{ documents }}")
    folder = tmp_path / "env"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(toks["qwen"]._tokenizer_obj))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    tok = HubTokenizer.from_hf_dir(folder)
    messages = [{"role": "user", "content": "a"}, {"role": "skip", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "user", "content": None}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = tok.render_chat(messages)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("[a][c][]") and text.endswith("|<|im_end|>|none|None") and "20" in text
    extra = {"flavour": "x", "documents": [{"title": "t"}]}
    text = tok.render_chat(messages, **extra)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    assert text.endswith("|x|[{'title': 't'}]")
    bad = HubTokenizer.from_hf_dir(folder)
    bad.chat_template = "{% set ns = namespace() %}{% set ns._x = 1 %}"
    with pytest.raises(LmforgeError, match="'_'"):
        bad.render_chat(messages)
    bad.chat_template = "{% for %}"
    with pytest.raises(LmforgeError, match="does not compile"):
        bad.render_chat(messages)


# ----------------------------------------------------------------------------- training masks


def test_training_mask_chatml_multi_turn(toks):
    tok = toks["qwen"]
    messages = QWEN_CONVERSATIONS[1] + [{"role": "assistant", "content": "6 — naïve 🙂"}]
    ids, mask = tok.chat_ids_for_training(messages)
    assert ids == tok.chat_ids(messages, add_generation_prompt=False) and len(mask) == len(ids)
    assert masked_runs(tok, ids, mask) == ["4.<|im_end|>\n", "6 — naïve 🙂<|im_end|>\n"]
    assert set(mask) == {0, 1}


def test_training_mask_tools(toks):
    tok = toks["qwen"]
    ids, mask = tok.chat_ids_for_training(TOOL_CONVERSATION, tools=TOOLS)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
    assert masked_runs(tok, ids, mask) == [call + "<|im_end|>\n", "It is 21 °C in Paris.<|im_end|>\n"]


def test_training_mask_gemma(toks):
    tok = toks["gemma"]
    messages = GEMMA_CONVERSATIONS[1] + [{"role": "assistant", "content": "Très bien, Ω!"}]
    ids, mask = tok.chat_ids_for_training(messages)
    assert ids == tok.chat_ids(messages, add_generation_prompt=False)
    assert masked_runs(tok, ids, mask) == ["Ça va.<end_of_turn>\n", "Très bien, Ω!<end_of_turn>\n"]


def test_training_mask_untrims_byte_level_offsets(toks):
    """The prompt ends with "assistant: " and the reply starts with a digit, so the prompt's last token
    is a lone "Ġ", whose GPT-2-trimmed offset is empty and sits at the reply's first character."""
    tok = toks["colon"]
    messages = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "42 is it."}]
    ids, mask = tok.chat_ids_for_training(messages)
    assert masked_runs(tok, ids, mask) == ["42 is it.<|im_end|>\n"]
    full = tok.render_chat(messages, add_generation_prompt=False)
    trimmed = tok._plain.encode(full, add_special_tokens=False).offsets  # the file's own post-processor
    prompt_end = full.index("42")
    assert (prompt_end, prompt_end) in trimmed  # the trap this test is about is really there


def test_training_mask_single_turn_with_reasoning_and_inconsistent_template(toks):
    tok = toks["thinking"]
    one = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    ids, mask = tok.chat_ids_for_training(one)
    assert masked_runs(tok, ids, mask) == ["<think>\nadd\n</think>\n\n4<|im_end|>\n"]
    two = one + [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "x"}]
    with pytest.raises(LmforgeError, match="renders earlier assistant turns differently"):
        tok.chat_ids_for_training(two)


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("name", ["qwen", "gemma", "thinking"])
def test_save_load_and_pickle(tmp_path, toks, name):
    tok = toks[name]
    path = tok.save(tmp_path / "tokenizer.json")
    assert json.loads(path.read_text())["format"] == "lmforge-hub-tokenizer"
    for other in (HubTokenizer.load(path), pickle.loads(pickle.dumps(tok))):
        assert other == tok and hash(other) == hash(tok) and other.fingerprint == tok.fingerprint
        assert [other.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
        assert other.stop_ids == tok.stop_ids and other.end_of_turn_id == tok.end_of_turn_id
        assert other.bos_id == tok.bos_id and other.tool_call_ids == tok.tool_call_ids
        assert other.chat_template == tok.chat_template and other.tool_use_template == tok.tool_use_template
        messages = [{"role": "user", "content": "hi"}]
        assert other.chat_ids(messages) == tok.chat_ids(messages)
        assert np.array_equal(other.token_byte_lengths(), tok.token_byte_lengths())
    assert toks["qwen"] != toks["colon"]  # same vocabulary, different template
    assert "HubTokenizer(" in repr(tok)


def test_damaged_files(tmp_path, toks):
    good = toks["qwen"].save(tmp_path / "good.json").read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "not ours": json.dumps({"format": "lmforge-bpe", "version": 1}).encode(),
        "no config": json.dumps({"format": "lmforge-hub-tokenizer", "version": 1, "tokenizer": {}}).encode(),
    }
    obj = json.loads(good)
    obj["tokenizer"]["model"]["type"] = "NoSuchModel"
    cases["bad model"] = json.dumps(obj).encode()
    obj = json.loads(good)
    obj["config"]["stop_tokens"] = "oops"
    cases["bad config"] = json.dumps(obj).encode()
    for what, data in cases.items():
        path = tmp_path / f"{what}.json"
        path.write_bytes(data)
        with pytest.raises(LmforgeError) as e:
            HubTokenizer.load(path)
        assert "\n" not in str(e.value), what
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        HubTokenizer.from_hf_dir(tmp_path / "empty")


@pytest.mark.parametrize("name", ["qwen", "gemma", "thinking"])
def test_hf_files_load_in_transformers(tmp_path, toks, name):
    import transformers

    tok = toks[name]
    out = tmp_path / "export"
    out.mkdir()
    for file, data in tok.hf_files().items():
        (out / file).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(ref) == tok.vocab_size
    for text in TEXTS:
        assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    conversations = {"qwen": QWEN_CONVERSATIONS, "gemma": GEMMA_CONVERSATIONS,
                     "thinking": [[{"role": "user", "content": "2+2?"}]]}[name]
    for messages in conversations:
        text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == tok.render_chat(messages)
        assert hf_chat_ids(ref, messages, add_generation_prompt=True) == tok.chat_ids(messages)
    if name != "gemma":
        # transformers' add_generation_prompt defaults to False, render_chat's to True
        assert hf_chat_ids(ref, TOOL_CONVERSATION, tools=TOOLS) == tok.chat_ids(
            TOOL_CONVERSATION, add_generation_prompt=False, tools=TOOLS)
    assert HubTokenizer.from_hf_dir(out).chat_ids(conversations[0]) == tok.chat_ids(conversations[0])
