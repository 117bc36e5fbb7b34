"""Byte-level BPE tokenizer: trained with Hugging Face `tokenizers`, stored in lmforge's own
one-file JSON format, encoded with `tiktoken`.

Id layout (the project's convention, relied on by every later stage):
  * ids 0..255 are the raw bytes 0..255;
  * ids 256.. are the learned merges in the order they were learned (rank == id);
  * the special tokens, in the order of SPECIAL_TOKENS, take the last ids.

Special tokens can never come out of `encode()`: text such as "<|bos|>" inside plain text is
encoded as ordinary bytes. Callers insert special ids explicitly (`special_id`, `bos_id`).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_write_bytes, read_json, sha256_bytes

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",  # document start / separator; also serves as end-of-text
    "<|system_start|>",
    "<|system_end|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_result_start|>",
    "<|tool_result_end|>",
    "<|pad|>",
)

# GPT-4 (cl100k) pre-split pattern. The engines used here (tiktoken's fancy-regex, the `regex`
# package, and Oniguruma inside HF `tokenizers`) all accept the possessive quantifiers, so one
# pattern serves training, encoding, the reference encoder and the HF export.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

FORMAT = "lmforge-bpe"
FORMAT_VERSION = 1
N_BYTES = 256


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table that byte-level BPE in HF `tokenizers` uses
    for its vocabulary strings: printable Latin-1 bytes map to themselves, the rest are shifted
    to code points 256.. so that every byte is a visible, non-whitespace character."""
    printable = [("!", "~"), ("¡", "¬"), ("®", "ÿ")]
    keep = [b for lo, hi in printable for b in range(ord(lo), ord(hi) + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(N_BYTES):
        if b not in table:
            table[b] = chr(N_BYTES + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _to_hf_str(data: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in data)


def _from_hf_str(s: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"not a byte-level token string: {s!r}") from e


def _special_name(name: str) -> str:
    """Accept both "<|bos|>" and "bos"."""
    return name if name.startswith("<|") else f"<|{name}|>"


def _limit_chars(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    if max_chars is None:
        yield from texts
        return
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        if len(text) > left:
            text = text[:left]
        left -= len(text)
        yield text


class Tokenizer:
    """A byte-level BPE tokenizer defined entirely by its ordered merge list (id pairs)."""

    def __init__(self, merges: Sequence[Sequence[int]], pattern: str = SPLIT_PATTERN):
        self.pattern = pattern
        self.merges: list[tuple[int, int]] = []
        # Every token's bytes, rebuilt from the merges; ids are positions in this list.
        vocab: list[bytes] = [bytes([b]) for b in range(N_BYTES)]
        seen: dict[bytes, int] = {v: i for i, v in enumerate(vocab)}
        for rank, pair in enumerate(merges):
            new_id = N_BYTES + rank
            try:
                left, right = (int(x) for x in pair)
            except (TypeError, ValueError):
                raise ValueError(f"merge {rank} is not a pair of ids: {pair!r}") from None
            if not (0 <= left < new_id and 0 <= right < new_id):
                raise ValueError(f"merge {rank} ({left}, {right}) uses an id that does not exist yet")
            data = vocab[left] + vocab[right]
            if data in seen:
                # Two ids for one byte string would make rank-based (tiktoken) and pair-based
                # merging disagree; training never produces this.
                raise ValueError(f"merge {rank} ({left}, {right}) repeats token {seen[data]}")
            seen[data] = new_id
            vocab.append(data)
            self.merges.append((left, right))
        self._vocab = vocab
        self.special_tokens: dict[str, int] = {s: len(vocab) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        self.bos_id = self.special_tokens["<|bos|>"]
        self.pad_id = self.special_tokens["<|pad|>"]
        self.fingerprint = sha256_bytes(self._canonical_json().encode())
        self._enc = self._build_tiktoken()
        self._pair_ranks: dict[tuple[int, int], int] | None = None  # built on first reference_encode
        self._byte_lengths: np.ndarray | None = None

    # ---------------------------------------------------------------- construction / training

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """No merges: one token per byte, plus the special tokens."""
        return cls([])

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        show_progress: bool = True,
        max_chars: int | None = None,
    ) -> Tokenizer:
        """Learn merges from `texts` with HF `tokenizers`' BPE trainer.

        `vocab_size` counts everything: 256 byte tokens + merges + len(SPECIAL_TOKENS) specials.
        If the corpus runs out of pairs first, the merges learned so far are kept and the
        resulting `vocab_size` attribute is smaller than asked."""
        minimum = N_BYTES + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise LmforgeError(
                f"vocab_size {vocab_size} is too small: it must be at least {minimum} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
            )
        n_merges = vocab_size - minimum
        if max_chars is not None and max_chars < 0:
            raise LmforgeError(f"max_chars must be >= 0, got {max_chars}")
        if n_merges == 0:
            return cls.byte_level()

        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = cls._hf_pre_tokenizer(SPLIT_PATTERN)
        trainer = trainers.BpeTrainer(
            # The trainer's target counts the 256-byte alphabet; specials are ours to add.
            vocab_size=N_BYTES + n_merges,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=show_progress,
        )
        hf.train_from_iterator(_limit_chars(texts, max_chars), trainer=trainer)
        hf_merges = json.loads(hf.to_str())["model"]["merges"]
        merges, dropped = _merges_from_hf(hf_merges)
        if dropped:
            warnings.warn(
                f"tokenizer training: dropped {dropped} of {len(hf_merges)} learned merges "
                "that textbook BPE could not reproduce",
                stacklevel=2,
            )
        return cls(merges, SPLIT_PATTERN)

    @staticmethod
    def _hf_pre_tokenizer(pattern: str):
        from tokenizers import Regex, pre_tokenizers

        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    def _build_tiktoken(self):
        import tiktoken

        return tiktoken.Encoding(
            name=f"lmforge-{self.fingerprint[:16]}",
            pat_str=self.pattern,
            mergeable_ranks={data: i for i, data in enumerate(self._vocab)},
            special_tokens=dict(self.special_tokens),
        )

    # ---------------------------------------------------------------- vocabulary facts

    @property
    def vocab_size(self) -> int:
        """Total number of ids: bytes + merges + specials."""
        return len(self._vocab) + len(SPECIAL_TOKENS)

    @property
    def n_merges(self) -> int:
        return len(self.merges)

    def special_id(self, name: str) -> int:
        """Id of a special token, by full text ("<|bos|>") or short name ("bos")."""
        token = _special_name(name)
        if token not in self.special_tokens:
            known = ", ".join(SPECIAL_TOKENS)
            raise LmforgeError(f"unknown special token {name!r}; known: {known}")
        return self.special_tokens[token]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._id_to_special

    # What chat, generation and post-training ask of any tokenizer (lmforge's or a HubTokenizer):
    @property
    def end_of_turn_id(self) -> int:
        """The token that ends an assistant turn (what a reply is trained to end with)."""
        return self.special_tokens["<|assistant_end|>"]

    @property
    def stop_ids(self) -> frozenset[int]:
        """Where generation stops by default: the end of the turn, or of the text."""
        return frozenset((self.end_of_turn_id, self.bos_id))

    @property
    def tool_call_ids(self) -> tuple[int, int] | None:
        """The tokens around a tool call's JSON."""
        return self.special_tokens["<|tool_call_start|>"], self.special_tokens["<|tool_call_end|>"]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; a special token gives the UTF-8 of its text form."""
        token_id = int(token_id)
        if 0 <= token_id < len(self._vocab):
            return self._vocab[token_id]
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode()
        raise ValueError(f"token id {token_id} is out of range (vocab_size {self.vocab_size})")

    def token_byte_lengths(self) -> np.ndarray:
        """Byte length of every id's text (0 for special tokens, which stand for no text):
        summed over a token sequence this gives the byte count used for bits-per-byte."""
        if self._byte_lengths is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            lengths[: len(self._vocab)] = [len(v) for v in self._vocab]
            self._byte_lengths = lengths
        return self._byte_lengths.copy()  # callers may modify or wrap it (torch.from_numpy)

    # ---------------------------------------------------------------- encoding / decoding

    def encode(self, text: str) -> list[int]:
        """Ids for plain text. Never yields a special id, even for text like "<|bos|>".
        Lone surrogates (not valid Unicode, e.g. from surrogateescape) are encoded as U+FFFD."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated token bytes; special tokens contribute their text form (b"<|bos|>")."""
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        top = self.vocab_size
        for i in ids:
            if not 0 <= i < top:
                raise ValueError(f"token id {i} is out of range (vocab_size {top})")
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids (invalid UTF-8 becomes U+FFFD); specials appear as their text."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def reference_encode(self, text: str) -> list[int]:
        """Slow textbook BPE, for checking the fast path: split with the pattern, start each
        chunk from its bytes, and repeatedly apply the earliest-learned merge among adjacent
        pairs until none applies.

        The split uses the `regex` package, which may know a newer Unicode version than
        tiktoken's engine: characters assigned only in the newest version (Unicode 17 at the
        time of writing) can be split differently. Everything older splits identically."""
        import regex

        if self._pair_ranks is None:
            self._pair_ranks = {pair: N_BYTES + rank for rank, pair in enumerate(self.merges)}
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: replace them with U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        out: list[int] = []
        for chunk in regex.findall(self.pattern, text):
            out.extend(_bpe_merge(list(chunk.encode("utf-8")), self._pair_ranks))
        return out

    # ---------------------------------------------------------------- persistence

    def _content(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "merges": [list(m) for m in self.merges],
        }

    def _canonical_json(self) -> str:
        return json.dumps(self._content(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as one JSON file (atomically); one merge per line for diffs."""
        content = self._content()
        head = {k: v for k, v in content.items() if k != "merges"}
        lines = ["{"]
        for key, value in head.items():
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
        merges = ",\n".join(f"    [{a}, {b}]" for a, b in self.merges)
        lines.append('  "merges": [' + (f"\n{merges}\n  " if merges else "") + "]")
        lines.append("}")
        path = Path(path)
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        obj = read_json(path, "tokenizer file", fmt=FORMAT, version=FORMAT_VERSION)
        merges, pattern = obj.get("merges"), obj.get("pattern")
        if not isinstance(merges, list) or not isinstance(pattern, str):
            raise LmforgeError(f"{path}: corrupt tokenizer file (missing 'merges' or 'pattern')")
        try:
            tok = cls(merges, pattern)
            tok._verify_merges()
        except ValueError as e:
            raise LmforgeError(f"{path}: corrupt tokenizer file: {e}") from None
        except Exception as e:  # e.g. tiktoken rejecting a damaged pattern
            raise LmforgeError(f"{path}: corrupt tokenizer file: {type(e).__name__}: {e}") from None
        if obj.get("special_tokens") != tok.special_tokens or obj.get("vocab_size") != tok.vocab_size:
            raise LmforgeError(
                f"{path}: corrupt tokenizer file (special tokens or vocab_size do not match the merges)"
            )
        return tok

    def _verify_merges(self) -> None:
        """Check that every token is what textbook BPE makes of its own bytes, the condition under
        which tiktoken's rank-based merging equals pair-based merging (see _merges_from_hf).
        Trained tokenizers satisfy it by construction; this guards hand-edited files."""
        pair_to_id: dict[tuple[int, int], int] = {}
        for rank, pair in enumerate(self.merges):
            new_id = N_BYTES + rank
            if _bpe_merge(list(self._vocab[new_id]), pair_to_id) != list(pair):
                raise ValueError(f"merge {rank} {pair} can never apply: BPE splits its bytes otherwise")
            pair_to_id[pair] = new_id

    # tiktoken's Encoding cannot be pickled; workers rebuild it from the merges.
    def __getstate__(self) -> dict:
        return {"merges": self.merges, "pattern": self.pattern}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["merges"], state["pattern"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, n_merges={self.n_merges}, "
            f"fingerprint={self.fingerprint[:12]})"
        )

    # ---------------------------------------------------------------- Hugging Face export

    def to_hf(self):
        """An equivalent `tokenizers.Tokenizer` (same ids), for use with `transformers`."""
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {_to_hf_str(data): i for i, data in enumerate(self._vocab)}
        merges = [(_to_hf_str(self._vocab[a]), _to_hf_str(self._vocab[b])) for a, b in self.merges]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        hf.pre_tokenizer = self._hf_pre_tokenizer(self.pattern)
        hf.decoder = decoders.ByteLevel()
        # Added after the model vocab, so they get the next ids: exactly our special ids.
        hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
        for s, i in self.special_tokens.items():
            if hf.token_to_id(s) != i:
                raise RuntimeError(f"HF export gave {s} id {hf.token_to_id(s)}, expected {i}")
        return hf

    def export_hf(self, path: str | os.PathLike) -> Path:
        """Write a HF `tokenizer.json`. A directory path gets `tokenizer.json` inside it."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        atomic_write_bytes(path, self.to_hf().to_str(pretty=True).encode())
        return path


_NO_MERGE = float("inf")  # sort key for adjacent pairs that are not merges


def _bpe_merge(ids: list[int], pair_to_id: dict[tuple[int, int], int]) -> list[int]:
    """Textbook BPE on one chunk: while some adjacent pair is a merge, apply the earliest-learned
    one (lowest new id) at every place it occurs, left to right."""
    while len(ids) > 1:
        best = min(zip(ids, ids[1:]), key=lambda p: pair_to_id.get(p, _NO_MERGE))
        new_id = pair_to_id.get(best)
        if new_id is None:
            break
        merged: list[int] = []
        i = 0
        while i < len(ids):  # left to right, so in a run like (a, a, a) the first pair wins
            if i + 1 < len(ids) and ids[i] == best[0] and ids[i + 1] == best[1]:
                merged.append(new_id)
                i += 2
            else:
                merged.append(ids[i])
                i += 1
        ids = merged
    return ids


def _merges_from_hf(hf_merges: list) -> tuple[list[tuple[int, int]], int]:
    """Turn HF's merges (byte-level strings, "a b" or ["a", "b"]) into our id pairs, numbering
    new tokens in learned order. Returns (merges, number of HF merges dropped).

    tiktoken merges any adjacent pair whose concatenation is a token (by rank), while textbook
    BPE (our reference, and HF itself) only applies the listed pairs. The two agree on every
    input when each token t is what textbook BPE makes of t's own bytes: then, by the time t's
    rank comes up, the only way t's bytes can sit as two adjacent tokens is t's own pair. A
    merge is kept only if that holds (and its string is new); HF's trainer applies merges to
    its words exactly this way, so in practice nothing is dropped, but we check, not trust."""
    ids: dict[bytes, int] = {bytes([b]): b for b in range(N_BYTES)}
    pair_to_id: dict[tuple[int, int], int] = {}
    merges: list[tuple[int, int]] = []
    dropped = 0
    for m in hf_merges:
        left_s, right_s = m.split(" ") if isinstance(m, str) else m
        left, right = _from_hf_str(left_s), _from_hf_str(right_s)
        data = left + right
        pair = (ids.get(left), ids.get(right))
        if data in ids or None in pair or _bpe_merge(list(data), pair_to_id) != list(pair):
            dropped += 1
            continue
        new_id = N_BYTES + len(merges)
        ids[data] = new_id
        pair_to_id[pair] = new_id
        merges.append(pair)
    return merges, dropped
