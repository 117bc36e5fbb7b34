"""A Hugging Face hub tokenizer (a model folder's `tokenizer.json` and friends) behind the interface of
lmforge's own `lmforge.tokenizer.Tokenizer`, so that pretrained hub models can be fine-tuned, sampled
and evaluated by the rest of lmforge.

What is read (`HubTokenizer.from_hf_dir`), the way transformers 5 reads it:
  * `tokenizer.json` (required): the `tokenizers` pipeline, ids as they are in the file;
  * `tokenizer_config.json`: the special-token strings (bos/eos/unk/sep/pad/cls/mask and any other
    `*_token` entry; a value is a string or a dict with "content") and the chat template (a string, or a
    list of {"name", "template"}: "default", plus "tool_use" for calls that pass tools);
  * `chat_template.jinja` and `additional_chat_templates/*.jinja`: when present they replace the
    config's templates (transformers 5 writes the template there);
  * `special_tokens_map.json`: only when the config has no "added_tokens_decoder", and then its
    entries override the config's (transformers' legacy rule);
  * `generation_config.json` (else `config.json`): "eos_token_id" (an int or a list), the ids at which
    generation stops, with the eos token.
Named special tokens that `tokenizer.json` does not list as added tokens are added as special
tokens, as transformers does on load, so the ids match `AutoTokenizer`'s.

Id and byte conventions (what lmforge relies on):
  * `encode(text)` is plain text: no bos, and special tokens written in the text are encoded as
    ordinary text, like `Tokenizer.encode` (non-special added tokens such as Qwen's "<tool_call>"
    are still matched, as HF does). Chat renderings (`chat_ids`) do recognise special tokens.
  * `token_bytes(id)` is the exact bytes of a token: byte-level BPE (GPT-2, Llama-3, Qwen) maps its
    vocabulary strings back through the GPT-2 byte table; SentencePiece-style BPE with byte fallback
    (Llama-2, Gemma) reads "▁" as a space and "<0xNN>" as that byte; added tokens give the UTF-8 of
    their text. When the pipeline neither normalises nor adds a prefix space (GPT-2, Llama-3, Qwen
    on NFC text; Gemma), the bytes of `encode(text)` join to exactly `text.encode()`.
  * `token_byte_lengths()` counts 0 for special tokens (they stand for no text), as lmforge's does.
  * `bos_id` is the token that starts a document; tokenizers without one (Qwen) use eos, the
    document separator, as lm-evaluation-harness does. `pad_id` is pad, else eos (filler under a mask).

The whole tokenizer is saved as one JSON file ({"format": "lmforge-hub-tokenizer", "tokenizer": the
HF tokenizer.json object, "config": templates, special tokens, stop tokens}), the single
`tokenizer.json` byte string lmforge checkpoints carry; `hf_files()` writes it back as a HF folder.

This file is long because matching `apply_chat_template` exactly takes transformers' whole reading of
a folder and its Jinja sandbox (restricted dict and namespace, the generation tag, message clean-up),
and those details only make sense next to the tokenizer they serve.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_write_bytes, read_json, sha256_bytes
from lmforge.tokenizer import Tokenizer, _from_hf_str

FORMAT = "lmforge-hub-tokenizer"
FORMAT_VERSION = 1

# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES); each one that
# is set is passed to the chat template under its name, and so is any other "*_token" config entry.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MAIN_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")  # saved as top-level config keys
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, standard first
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _token_text(value) -> str | None:
    """A special-token entry of a HF config: a string, an AddedToken dict ({"content": ...}) or null."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_json_object(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{what} {path} is not readable JSON: {_one_line(e)}") from None
    if not isinstance(obj, dict):
        raise LmforgeError(f"{what} {path} is not a JSON object")
    return obj


def _components(component, list_key: str) -> list[Mapping]:
    """The steps of a tokenizer.json pipeline component (decoder, pre_tokenizer), Sequences flattened."""
    if not isinstance(component, Mapping):
        return []
    if component.get("type") == "Sequence":
        return [c for part in component.get(list_key) or [] for c in _components(part, list_key)]
    return [component]


def _untrimmed_offsets(post):
    """The post-processor with offset trimming switched off. ByteLevel's trimming moves a token's
    start past its leading space (and leaves "Ġ" with an empty offset), which would misplace tokens
    at the edge of a training span; it changes offsets only, never ids."""
    if not isinstance(post, Mapping):
        return post
    post = dict(post)
    if post.get("type") == "Sequence":
        post["processors"] = [_untrimmed_offsets(p) for p in post.get("processors") or []]
    elif "trim_offsets" in post:
        post["trim_offsets"] = False
    return post


def _tokens_transformers_adds(hf, cfg: Mapping, tokens: Mapping, extra) -> list:
    """The added tokens transformers (5.x, TokenizersBackend.__init__) applies on top of tokenizer.json:
    the entries of tokenizer_config's "added_tokens_decoder" (their flags replace tokenizer.json's), then
    the named and extra special tokens that are not added tokens yet (as special tokens: same id if in
    the vocabulary, else a new one). Named tokens are always marked special."""
    from tokenizers import AddedToken

    named = {t for t in tokens.values() if t}
    out = []
    decoder = cfg.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        entries = [(int(k), v) for k, v in decoder.items() if str(k).isdigit() and isinstance(v, Mapping)]
        for _, entry in sorted(entries, key=lambda kv: kv[0]):
            if isinstance(entry.get("content"), str):
                flags = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                         if isinstance(entry.get(k), bool)}
                if entry["content"] in named:
                    flags["special"] = True
                out.append(AddedToken(entry["content"], **flags))
    present = {t.content for t in hf.get_added_tokens_decoder().values()} | {t.content for t in out}
    wanted = [t for t in tokens.values() if t]
    if isinstance(extra, (list, tuple)):
        wanted += [_token_text(t) for t in extra if _token_text(t)]
    for text in dict.fromkeys(wanted):
        if text not in present:
            out.append(AddedToken(text, special=True, normalized=False))
    return out


# ----------------------------------------------------------------------------- chat template rendering


def _plain_data(value):
    """What a template may see: JSON-like builtins only (as transformers' apply_chat_template does),
    so no object with dangerous methods reaches the sandbox; anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(v) for v in value)
    if isinstance(value, np.generic):
        return _plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (e.g. OpenAI SDK messages)
        return _plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages) -> list[dict]:
    """Messages as transformers hands them to the template: keys whose value is None dropped (APIs
    send content=None next to tool_calls), plain data, and the reasoning aliased under all three
    names it goes by (reasoning_content, thinking, reasoning)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise LmforgeError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
        elif callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise LmforgeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = _plain_data({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


@functools.lru_cache(maxsize=1)
def _jinja_environment():
    """The environment transformers renders chat templates in: sandboxed and immutable, trim_blocks and
    lstrip_blocks, loop controls, a `{% generation %}` block (rendered as its body), a `tojson` that
    does not escape HTML or non-ASCII, `raise_exception`, `strftime_now`, and `dict`/`namespace`
    restricted the way transformers restricts them."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %}; here the
        # block just renders its body (masks come from chat_ids_for_training's prefix renderings).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 - jinja's own signature trick, so namespace(self=1) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise LmforgeError(f"the chat template rejected the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@functools.lru_cache(maxsize=32)
def _compile_template(template: str):
    import jinja2

    try:
        return _jinja_environment().from_string(template)
    except jinja2.TemplateError as e:
        raise LmforgeError(f"the chat template does not compile: {_one_line(e)}") from None


# ----------------------------------------------------------------------------- the tokenizer


class HubTokenizer:
    """A Hugging Face `tokenizer.json` (+ chat template, special tokens, stop ids) with lmforge's
    tokenizer interface. Build it with `from_hf_dir` (a HF model folder) or `load` (lmforge's file)."""

    def __init__(self, tokenizer: Mapping | str, config: Mapping):
        """`tokenizer` is a HF tokenizer.json (object or text); `config` holds the chat templates, the
        special-token strings and the stop tokens (see `_check_config`). Raises ValueError when the two
        do not make a tokenizer."""
        from tokenizers import Tokenizer as HFTokenizer

        text = tokenizer if isinstance(tokenizer, str) else json.dumps(tokenizer)
        obj = json.loads(text)  # a private copy
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
            raise ValueError("the tokenizer is not a HF tokenizer.json object")
        self.config = self._check_config(config)
        self._tokenizer_obj = obj
        try:
            base, chat = HFTokenizer.from_str(text), HFTokenizer.from_str(text)
            post = obj.get("post_processor")
            if _untrimmed_offsets(post) != post:  # swap in the same post-processor without trimming
                alone = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                         "pre_tokenizer": None, "post_processor": _untrimmed_offsets(post), "decoder": None,
                         "model": {"type": "BPE", "vocab": {}, "merges": []}}
                chat.post_processor = HFTokenizer.from_str(json.dumps(alone)).post_processor
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise ValueError(f"tokenizers cannot build it: {_one_line(e)}") from None
        for hf in (base, chat):
            hf.no_truncation()
            hf.no_padding()
        base.encode_special_tokens = True  # plain text: special tokens are never matched
        self._plain, self._chat = base, chat  # two objects, so the two encode modes never toggle one

        vocab = base.get_vocab(with_added_tokens=True)
        self._vocab_size = max(base.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self._id_to_str: list[str | None] = [None] * self._vocab_size
        for token, i in vocab.items():
            self._id_to_str[i] = token
        added = base.get_added_tokens_decoder()
        self._added: dict[int, str] = {i: t.content for i, t in added.items()}
        self._added_by_text: dict[str, int] = {t: i for i, t in self._added.items()}
        self._special: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        for i, token in self._added.items():
            self._id_to_str[i] = token

        self.chat_template: str | None = self.config["chat_template"]
        self.tool_use_template: str | None = self.config["tool_use_template"]
        self.bos_token: str | None = self.config["bos_token"]
        self.eos_token: str | None = self.config["eos_token"]
        self.pad_token: str | None = self.config["pad_token"]
        self.unk_token: str | None = self.config["unk_token"]
        self._eos_token_id = self._id_of(self.eos_token)
        stop = [self._id_of(t) for t in self.config["stop_tokens"]]
        self.stop_ids: frozenset[int] = frozenset(i for i in stop + [self._eos_token_id] if i is not None)
        # The token-bytes convention of the model's vocabulary strings (see token_bytes).
        decoders = _components(obj.get("decoder"), "decoders")
        pre_tokenizers = _components(obj.get("pre_tokenizer"), "pretokenizers")
        decoder_types = [c.get("type") for c in decoders]
        pre_types = [c.get("type") for c in pre_tokenizers]
        metaspace = [c.get("replacement") for c in decoders + pre_tokenizers if c.get("type") == "Metaspace"]
        self._space = metaspace[0] if metaspace and isinstance(metaspace[0], str) and metaspace[0] else "▁"
        if "ByteLevel" in decoder_types:
            self._byte_mode = "byte_level"
        elif obj["model"].get("byte_fallback") or {"ByteFallback", "Metaspace"} & set(decoder_types + pre_types):
            self._byte_mode = "sentencepiece"
        elif "ByteLevel" in pre_types:
            self._byte_mode = "byte_level"
        else:
            self._byte_mode = "text"
        self._fingerprint: str | None = None  # computed on first use
        self._bytes: list[bytes] | None = None  # built on first use
        self._byte_lengths: np.ndarray | None = None
        self._end_of_turn_id: int | None = None

    @staticmethod
    def _check_config(config: Mapping) -> dict:
        if not isinstance(config, Mapping):
            raise ValueError("'config' is not an object")
        out = {}
        for key in ("chat_template", "tool_use_template", *MAIN_TOKENS):
            value = config.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"config {key!r} must be a string or null")
            out[key] = value
        stop = config.get("stop_tokens", [])
        named = config.get("named_tokens", {})
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError("config 'stop_tokens' must be a list of strings")
        if not isinstance(named, Mapping) or not all(isinstance(v, str) for v in named.values()):
            raise ValueError("config 'named_tokens' must map names to strings")
        out["stop_tokens"] = list(stop)
        out["named_tokens"] = dict(named)
        return out

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> HubTokenizer:
        """Read a Hugging Face model folder (see the module docstring for which files and how)."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise LmforgeError(f"{folder} is not a directory (expected a Hugging Face model folder)")
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise LmforgeError(f"no tokenizer.json in {folder} (only `tokenizers` serialisations are supported)")
        try:
            hf = HFTokenizer.from_str(tj.read_text(encoding="utf-8"))
        except Exception as e:
            raise LmforgeError(f"{tj} is not a tokenizer `tokenizers` can load: {_one_line(e)}") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = _read_json_object(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
        map_path = folder / "special_tokens_map.json"
        if map_path.is_file() and "added_tokens_decoder" not in cfg:
            cfg = {**cfg, **_read_json_object(map_path, "special tokens map")}

        tokens = {key: _token_text(cfg.get(key)) for key in NAMED_TOKENS}
        for key, value in cfg.items():  # model-specific named tokens, e.g. "image_token"
            if key.endswith("_token") and key not in NAMED_TOKENS and _token_text(value) is not None:
                tokens[key] = _token_text(value)
        extra = cfg.get("extra_special_tokens", cfg.get("additional_special_tokens"))
        if isinstance(extra, Mapping):
            tokens.update({k: _token_text(v) for k, v in extra.items() if _token_text(v) is not None})
            extra = []
        padding = hf.padding  # a dict, or None
        if tokens["pad_token"] is None and isinstance(padding, Mapping) and isinstance(padding.get("pad_token"), str):
            tokens["pad_token"] = padding["pad_token"]
        hf.add_tokens(_tokens_transformers_adds(hf, cfg, tokens, extra))
        obj = json.loads(hf.to_str())
        obj["truncation"] = obj["padding"] = None  # lmforge never truncates or pads inside the tokenizer

        templates: dict[str, str] = {}
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if not templates:  # template files, when present, replace the config's templates
            t = cfg.get("chat_template")
            if isinstance(t, str):
                templates["default"] = t
            elif isinstance(t, list):
                templates = {d["name"]: d["template"] for d in t
                             if isinstance(d, Mapping) and isinstance(d.get("name"), str)
                             and isinstance(d.get("template"), str)}
            elif t is not None:
                raise LmforgeError(f"{cfg_path}: 'chat_template' must be a string or a list of "
                                   "{'name', 'template'} objects")

        stop_tokens: list[str] = []
        gen_path = folder / "generation_config.json"
        if not gen_path.is_file():  # transformers then derives the generation config from config.json
            gen_path = folder / "config.json"
        if gen_path.is_file():
            eos_ids = _read_json_object(gen_path, "model config").get("eos_token_id")
            eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
            for i in eos_ids:
                text = hf.id_to_token(i) if isinstance(i, int) and not isinstance(i, bool) and i >= 0 else None
                if text is not None and text not in stop_tokens:
                    stop_tokens.append(text)
        if tokens["eos_token"] and tokens["eos_token"] not in stop_tokens:
            stop_tokens.append(tokens["eos_token"])
        config = {
            "chat_template": templates.get("default"),
            "tool_use_template": templates.get("tool_use"),
            **{key: tokens[key] for key in MAIN_TOKENS},
            "named_tokens": {k: v for k, v in tokens.items() if k not in MAIN_TOKENS and v is not None},
            "stop_tokens": stop_tokens,
        }
        try:
            return cls(obj, config)
        except ValueError as e:
            raise LmforgeError(f"{folder}: {e}") from None

    # ---------------------------------------------------------------- vocabulary facts

    @property
    def vocab_size(self) -> int:
        """Total number of ids (model vocabulary + added tokens, or the largest id + 1 if more)."""
        return self._vocab_size

    def _id_of(self, text: str | None) -> int | None:
        if text is None:
            return None
        i = self._plain.token_to_id(text)
        return i if i is not None and 0 <= i < self._vocab_size else None

    @property
    def eos_id(self) -> int | None:
        """Id of the eos token (None if the tokenizer has none)."""
        return self._eos_token_id

    @property
    def bos_id(self) -> int:
        """Id that starts a document: the bos token, else the eos token (the document separator of
        GPT-2 and Qwen style tokenizers, which have no separate bos)."""
        i = self._id_of(self.bos_token)
        if i is None:
            i = self._eos_token_id
        if i is None:
            raise LmforgeError("this tokenizer has neither a bos nor an eos token, so documents cannot be delimited")
        return i

    @property
    def pad_id(self) -> int:
        """Id used as filler under a mask: the pad token, else eos (else bos)."""
        i = self._id_of(self.pad_token)
        return self.bos_id if i is None else i

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends an assistant turn in the chat template (eos without a template)."""
        if self._end_of_turn_id is None:
            self._end_of_turn_id = self._find_end_of_turn()
        return self._end_of_turn_id

    def _find_end_of_turn(self) -> int:
        if self.chat_template is None:
            if self._eos_token_id is None:
                raise LmforgeError("this tokenizer has neither a chat template nor an eos token to end a turn")
            return self._eos_token_id
        text = self.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "REPLY"}],
                                add_generation_prompt=False)
        at = text.find("REPLY")
        if at < 0:
            raise LmforgeError("cannot find the end-of-turn token: the chat template drops the assistant's reply")
        ids = self._chat.encode(text[at + len("REPLY"):], add_special_tokens=False).ids
        for pick in (lambda i: i in self.stop_ids, lambda i: i in self._special):
            found = next((i for i in ids if pick(i)), None)
            if found is not None:
                return found
        if self._eos_token_id is not None:
            return self._eos_token_id
        raise LmforgeError("cannot find the end-of-turn token: the chat template writes no special token after "
                           "the assistant's reply and there is no eos token")

    @property
    def tool_call_ids(self) -> tuple[int, int] | None:
        """(id of "<tool_call>", id of "</tool_call>") when the vocabulary has both (the Hermes/Qwen
        convention) and the chat template mentions tools; else None."""
        start, end = self._id_of("<tool_call>"), self._id_of("</tool_call>")
        templates = (self.chat_template, self.tool_use_template)
        mentions = any(t is not None and re.search(r"\btools\b", t) for t in templates)
        return (start, end) if start is not None and end is not None and mentions else None

    def special_id(self, name: str) -> int:
        """Id of a special or added token, by its exact text (e.g. "<|im_end|>")."""
        i = self._added_by_text.get(name)
        if i is None:
            known = ", ".join(sorted(self._added_by_text)[:12])
            more = " ..." if len(self._added_by_text) > 12 else ""
            raise LmforgeError(f"unknown special token {name!r}; known: {known}{more}")
        return i

    def is_special(self, token_id: int) -> bool:
        """True for added tokens marked special (control tokens, not text)."""
        return int(token_id) in self._special

    def _all_bytes(self) -> list[bytes]:
        if self._bytes is None:
            out = []
            for i, text in enumerate(self._id_to_str):
                if text is None:  # an id no token has (a hole in the vocabulary)
                    out.append(b"")
                elif i in self._added:
                    out.append(text.encode("utf-8"))
                else:
                    out.append(self._model_token_bytes(text))
            self._bytes = out
        return self._bytes

    def _model_token_bytes(self, text: str) -> bytes:
        if self._byte_mode == "byte_level":
            try:
                return _from_hf_str(text)
            except ValueError:
                return text.encode("utf-8")
        if self._byte_mode == "sentencepiece":
            m = _BYTE_TOKEN.fullmatch(text)
            if m:
                return bytes([int(m.group(1), 16)])
            return text.replace(self._space, " ").encode("utf-8")
        return text.encode("utf-8")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; an added token gives the UTF-8 of its text form."""
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is out of range (vocab_size {self._vocab_size})")
        return self._all_bytes()[token_id]

    def token_byte_lengths(self) -> np.ndarray:
        """Byte length of every id's text (0 for special tokens, which stand for no text): summed over
        a token sequence this gives the byte count used for bits-per-byte."""
        if self._byte_lengths is None:
            self._byte_lengths = np.array(
                [0 if i in self._special else len(b) for i, b in enumerate(self._all_bytes())], dtype=np.int64
            )
        return self._byte_lengths.copy()  # callers may modify or wrap it (torch.from_numpy)

    # ---------------------------------------------------------------- encoding / decoding

    def encode(self, text: str) -> list[int]:
        """Ids for plain text, without bos. Special tokens written in the text are encoded as
        ordinary text. Lone surrogates (not valid Unicode) are encoded as U+FFFD."""
        try:
            return self._plain.encode(text, add_special_tokens=False).ids
        except TypeError:
            if not isinstance(text, str):
                raise
            return self._plain.encode(_LONE_SURROGATE.sub("\ufffd", text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of each text, in parallel. `tokenizers` sizes its own thread pool
        (RAYON_NUM_THREADS), so `num_threads` is accepted for interface compatibility only."""
        texts = list(texts)
        try:
            return [e.ids for e in self._plain.encode_batch_fast(texts, add_special_tokens=False)]
        except TypeError:
            return [self.encode(t) for t in texts]

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is out of range (vocab_size {self._vocab_size})")
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated token bytes; added tokens contribute their text form (b"<|im_end|>")."""
        table = self._all_bytes()
        return b"".join(table[i] for i in self._checked_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids as HF decodes it (its decoder; special tokens kept as their text)."""
        return self._plain.decode(self._checked_ids(ids), skip_special_tokens=False)

    # ---------------------------------------------------------------- chat

    def _template_for(self, tools) -> str:
        if tools is not None and self.tool_use_template is not None:
            return self.tool_use_template
        if self.chat_template is None:
            raise LmforgeError("this tokenizer has no chat template (no chat_template.jinja and no "
                               "'chat_template' in tokenizer_config.json)")
        return self.chat_template

    def template_variables(self) -> dict[str, str]:
        """The special-token strings every rendering sees (bos_token, eos_token, ... when set)."""
        named = {key: self.config[key] for key in MAIN_TOKENS if self.config[key] is not None}
        return {**named, **self.config["named_tokens"]}

    def render_chat(self, messages, add_generation_prompt: bool = True, tools=None, **kwargs) -> str:
        """The chat template's text for `messages` exactly as transformers'
        `apply_chat_template(..., tokenize=False)` renders it. `tools` is a list of JSON-schema dicts
        (the "tool_use" template, if there is one, is used whenever tools is not None); other keyword
        arguments become template variables (e.g. enable_thinking=False, documents=[...])."""
        import jinja2

        compiled = _compile_template(self._template_for(tools))
        if tools is not None:
            if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence) \
                    or not all(isinstance(t, Mapping) for t in tools):
                raise LmforgeError("tools must be a list of JSON-schema dicts")
            tools = _plain_data(list(tools))
        documents = _plain_data(kwargs.pop("documents", None))
        variables = _plain_data({**self.template_variables(), **kwargs})  # kwargs override the tokens
        try:
            return compiled.render(messages=_prepare_messages(messages), tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except LmforgeError:
            raise
        except jinja2.TemplateError as e:
            raise LmforgeError(f"the chat template failed: {_one_line(e)}") from None
        except Exception as e:  # e.g. a TypeError from '+' on a missing field
            raise LmforgeError(f"the chat template failed on this conversation: {type(e).__name__}: "
                               f"{_one_line(e)}") from None

    def chat_ids(self, messages, add_generation_prompt: bool = True, tools=None, **kwargs) -> list[int]:
        """Ids of the rendered chat, special tokens recognised and nothing added, as
        `apply_chat_template(..., tokenize=True)` gives them."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        return self._chat.encode(text, add_special_tokens=False).ids

    def chat_ids_for_training(self, messages, tools=None, **kwargs) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a whole conversation: ids as `chat_ids(messages, add_generation_prompt=
        False)`; mask[i] is 1 exactly on the tokens the assistant writes. Assistant message i owns the
        characters that rendering messages[:i+1] adds to the prompt messages[:i] + generation prompt:
        its content, tool calls and end-of-turn (plus whatever the template writes after it, such as
        ChatML's newline). A token is learned when it starts inside such a span."""
        full = self.render_chat(messages, add_generation_prompt=False, tools=tools, **kwargs)
        spans = []
        for i, message in enumerate(_prepare_messages(messages)):
            if message.get("role") != "assistant":
                continue
            prompt = self.render_chat(messages[:i], add_generation_prompt=True, tools=tools, **kwargs)
            turn = self.render_chat(messages[: i + 1], add_generation_prompt=False, tools=tools, **kwargs)
            if not (turn.startswith(prompt) and full.startswith(turn)):
                raise LmforgeError(
                    f"the chat template renders earlier assistant turns differently from the last one (message {i}; "
                    "Qwen3's, for one, drops the reasoning of earlier turns), so the assistant's tokens cannot be "
                    "located: train on conversations with one assistant turn"
                )
            if len(turn) > len(prompt):
                spans.append((len(prompt), len(turn)))
        encoding = self._chat.encode(full, add_special_tokens=False)
        mask = [0] * len(encoding.ids)
        k = 0
        for t, (start, _end) in enumerate(encoding.offsets):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k == len(spans):
                break
            if start >= spans[k][0]:
                mask[t] = 1
        return encoding.ids, mask

    # ---------------------------------------------------------------- persistence

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of the saved content: equal fingerprints, equal tokenizers."""
        if self._fingerprint is None:
            self._fingerprint = sha256_bytes(self._canonical_json().encode())
        return self._fingerprint

    def _content(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": self._tokenizer_obj, "config": self.config}

    def _canonical_json(self) -> str:
        return json.dumps(self._content(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def to_bytes(self) -> bytes:
        """The file `save` writes (ASCII JSON)."""
        return (json.dumps(self._content(), ensure_ascii=True, separators=(",", ":")) + "\n").encode()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as one JSON file (atomically)."""
        path = Path(path)
        atomic_write_bytes(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HubTokenizer:
        obj = read_json(path, "tokenizer file", fmt=FORMAT, version=FORMAT_VERSION)
        if not isinstance(obj.get("tokenizer"), dict) or not isinstance(obj.get("config"), dict):
            raise LmforgeError(f"{path}: corrupt tokenizer file (missing 'tokenizer' or 'config')")
        try:
            return cls(obj["tokenizer"], obj["config"])
        except ValueError as e:
            raise LmforgeError(f"{path}: corrupt tokenizer file: {_one_line(e)}") from None

    # Workers rebuild the `tokenizers` objects from the content (exact, and no unpicklable caches).
    def __getstate__(self) -> dict:
        return {"tokenizer": json.dumps(self._tokenizer_obj), "config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"], state["config"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HubTokenizer) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return (f"HubTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
                f"chat_template={'yes' if self.chat_template else 'no'}, fingerprint={self.fingerprint[:12]})")

    # ---------------------------------------------------------------- Hugging Face export

    def hf_files(self) -> dict[str, bytes]:
        """tokenizer.json and tokenizer_config.json of a HF folder from which
        `transformers.AutoTokenizer.from_pretrained` loads an equivalent tokenizer (same ids, same chat
        rendering). Stop ids belong in the model's generation_config.json, which is not written here."""
        config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update(self.template_variables())
        named = {"default": self.chat_template, "tool_use": self.tool_use_template}
        named = {k: v for k, v in named.items() if v is not None}
        if list(named) == ["default"]:
            config["chat_template"] = named["default"]
        elif named:
            config["chat_template"] = [{"name": k, "template": v} for k, v in named.items()]
        return {
            "tokenizer.json": json.dumps(self._tokenizer_obj, ensure_ascii=False, indent=2).encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
        }


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer in a file: lmforge's own BPE, or a HubTokenizer (a Hugging Face tokenizer with
    its special tokens and chat template, as `lmforge import` stores it); picked by the file's format."""
    try:
        fmt = json.loads(Path(path).read_bytes()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None  # Tokenizer.load says what is wrong with the file
    return HubTokenizer.load(path) if fmt == FORMAT else Tokenizer.load(path)
