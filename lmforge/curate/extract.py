"""Curation step 1: read raw inputs and turn them into documents of main text.

`list_inputs(paths)` resolves what the user named (files, folders searched recursively, globs) into
input files; `iter_raw(path, cfg, counts)` streams the documents of one file. A document is a dict
`{"id", "text", "source", "meta"}`; `source` is `<path>#<i>` with i the 0-based position of the
record in its file (the WARC record number, the jsonl line number minus one, the .txt document
number, 0 for an HTML file).

Supported inputs (a folder contributes only files with these suffixes; anything else named
explicitly is an error):

- `.html` `.htm` (optionally `.gz`): one page per file, main text extracted.
- `.warc` `.warc.gz`: `response` records with HTTP status 200 and an HTML content type are
  extracted (transfer/content encodings undone); requests, metadata, warcinfo, resource and
  revisit records, other statuses (redirects, 404s) and non-HTML payloads are counted and skipped.
  Meta: url (WARC-Target-URI without the `<>` wget puts around it), warc_date, warc_record_id.
- `.wet` `.wet.gz` (Common Crawl's `.warc.wet.gz`): `conversion` records are already text and pass
  straight through, with their content-language hint.
- `.jsonl` `.jsonl.gz`: a record with a string "text" passes through; one with a string "html"
  (and no "text") is extracted. "id" and "url" are kept; so are the scalar fields of a Dolma-style
  "metadata" object (its "url" included).
- `.txt`: UTF-8 text split into documents at runs of two or more blank lines, the same convention
  as `lmforge data prepare` (lmforge/data/sources.py); a file without such a separator is one
  document.

HTML bytes are decoded with the first of the HTTP charset, the `<meta>` charset and UTF-8 that
decodes them without error (labels mapped as browsers do: "iso-8859-1" reads as windows-1252).
Failing that, a page that is UTF-8 but for a few stray bytes is read as UTF-8 with U+FFFD in their
place (kept, counted in `decode_errors`); any other page is a legacy encoding, the one uchardet
guesses, else windows-1252. WET text, jsonl and .txt are UTF-8, stray bytes replaced and counted.

Bad input never stops a run: a binary payload, an invalid JSON line, a WARC record whose HTTP
encoding cannot be undone, a page the extractor fails on or a text shorter than `min_chars` is
counted and skipped. A file that is not what its suffix
says (random bytes named .warc.gz), is truncated or cannot be read is counted in `file_errors`;
the documents read before the failure are kept. Each file prints at most one warning line (to
stderr, or to the `warn` callable given to `iter_raw`); everything else shows in the counts.

This file is long because each input format needs its own reader and its own ways of failing
(charsets, HTTP encodings, truncated gzip members), and they share the counting and the recovery.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lmforge.common import LmforgeError

EXTRACTORS = ("trafilatura", "resiliparse", "plain")
FAVOR = ("balanced", "precision", "recall")

HTML_SUFFIXES = (".html", ".htm", ".html.gz", ".htm.gz")
WARC_SUFFIXES = (".warc", ".warc.gz")
WET_SUFFIXES = (".wet", ".wet.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TXT_SUFFIXES = (".txt",)
SUPPORTED_SUFFIXES = HTML_SUFFIXES + WARC_SUFFIXES + WET_SUFFIXES + JSONL_SUFFIXES + TXT_SUFFIXES

HTML_TYPES = ("text/html", "application/xhtml+xml")

# A payload with a NUL byte or more than this fraction of other control bytes in its first
# _SNIFF_BYTES is an image, archive or executable, not text, whatever its name or header says.
_SNIFF_BYTES = 8192
_MAX_CONTROL_FRACTION = 0.05
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27))  # keep \t \n \f \r ESC
_ASCII = bytes(range(128))
# When no charset decodes a page cleanly, it is treated as UTF-8 with a few bad bytes if at most this
# fraction of its non-ASCII bytes are invalid; a page in a legacy encoding has nearly all of them invalid.
_MOSTLY_UTF8 = 0.1
_FEW_BAD_BYTES = 3
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]{1,40})""", re.I)


@dataclass
class ExtractConfig:
    """Reading raw inputs and extracting main text from HTML."""

    # False: HTML keeps ALL its visible text (the "plain" extractor: no boilerplate removal);
    # text inputs pass through either way.
    enabled: bool = True
    # "trafilatura" (best quality), "resiliparse" (about 12x faster, lets more boilerplate through)
    # or "plain" (every visible text node: navigation, footers and all). bench/curate_extract.py
    # measures all three on 442 gold-annotated pages.
    extractor: str = "trafilatura"
    # trafilatura only: "precision" drops more doubtful blocks, "recall" keeps more.
    favor: str = "balanced"
    # trafilatura only: skip its fallback extractors (readability, jusText): faster on pages where
    # its own extraction comes out short, slightly lower recall.
    fast: bool = False
    include_tables: bool = True
    # Reader comments under an article: user text, but mostly short and noisy (on the gold pages
    # keeping them lets more must-drop text through than it saves must-keep text).
    include_comments: bool = False
    # An extracted (or passed-through) text shorter than this, leading and trailing whitespace not
    # counted, is empty: what remains is a title or an error message. Length rules proper are the
    # quality filters' job.
    min_chars: int = 20

    def __post_init__(self):
        # ValueError, as in the other steps: the config reader turns it into an LmforgeError naming the file.
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {', '.join(EXTRACTORS)}, got {self.extractor!r}")
        if self.favor not in FAVOR:
            raise ValueError(f"favor must be one of {', '.join(FAVOR)}, got {self.favor!r}")
        if not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise ValueError(f"min_chars must be a whole number >= 0, got {self.min_chars!r}")


@dataclass
class ExtractCounts:
    """What reading and extraction saw. A record read normally ends in exactly one of the skipped_*,
    bad_records, extract_errors, empty or documents counters; decode_errors counts records read with
    replacements, whatever became of them; file_errors counts files."""

    files: int = 0  # input files opened
    file_errors: int = 0  # files not in their suffix's format, truncated or unreadable (kept what came before)
    bytes_in: int = 0  # bytes of the input files as stored (compressed size for .gz)
    content_bytes: int = 0  # uncompressed bytes of the payloads considered (HTML, WET text, jsonl lines, .txt)
    records: int = 0  # WARC records of every type, jsonl lines, .txt documents, HTML files
    skipped_record_type: int = 0  # WARC request / metadata / warcinfo / resource / revisit records
    skipped_status: int = 0  # HTTP responses whose status is not 200 (redirects, 404s, ...)
    skipped_non_html: int = 0  # responses whose content type is not HTML (images, PDFs, plain text, ...)
    skipped_binary: int = 0  # payloads that are binary (NUL / control bytes): images, archives, junk
    bad_records: int = 0  # jsonl lines that are no JSON object with a "text" or "html" string; WARC records
    # whose payload cannot be read (a broken gzip / chunked HTTP encoding)
    decode_errors: int = 0  # payloads valid in no charset tried: read with U+FFFD replacements (kept)
    extract_errors: int = 0  # pages the extractor raised on
    empty: int = 0  # texts shorter than min_chars after extraction
    documents: int = 0  # documents yielded
    chars_out: int = 0  # characters yielded
    bytes_out: int = 0  # UTF-8 bytes yielded

    def add(self, other: ExtractCounts) -> ExtractCounts:
        """Add another worker's counts into these (and return self)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Resolving inputs


def _suffix_ok(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _check_supported(path: Path) -> None:
    if not _suffix_ok(path):
        raise LmforgeError(f"unsupported input file: {path} (expected one of {', '.join(SUPPORTED_SUFFIXES)})")


def _files_in_folder(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, checkpoints: never data
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and _suffix_ok(p):
                found.append(p)
    # Sorted by relative path so the document order is the same on every machine.
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def list_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The input files named by `paths` (files, folders searched recursively, glob patterns), in
    order and without repeats. A missing path, an unsupported file named explicitly, or a folder or
    glob without any supported file raises LmforgeError naming it; inside folders and globs,
    files with other suffixes (READMEs, WAT files, ...) are ignored."""
    out: list[Path] = []
    seen: set[Path] = set()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for spec in paths:
        text = os.path.expanduser(str(spec))
        if not text.strip():
            raise LmforgeError("empty input path")
        path = Path(text)
        if path.is_file():
            _check_supported(path)
            found = [path]
        elif path.is_dir():
            found = _files_in_folder(path)
            if not found:
                raise LmforgeError(f"folder {path} contains no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
        elif any(c in text for c in "*?["):
            found = []
            for match in sorted(glob.glob(text, recursive=True)):
                p = Path(match)
                if p.is_dir():
                    found.extend(_files_in_folder(p))
                elif p.is_file() and _suffix_ok(p):
                    found.append(p)
            if not found:
                raise LmforgeError(f"glob {text!r} matches no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
        else:
            raise LmforgeError(f"no such file or folder: {text}")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    if not out:
        raise LmforgeError("no input files given")
    return out


def is_raw_web(spec) -> bool:
    """Whether a data spec (as `lmforge speedrun --data` takes it) names raw web files — HTML, WARC or
    WET — that must be curated before they are tokenized. Dataset names and plain text are not."""
    if spec is None:
        return False
    try:
        files = list_inputs([spec])
    except LmforgeError:
        return False
    return any(p.name.lower().endswith(HTML_SUFFIXES + WARC_SUFFIXES + WET_SUFFIXES) for p in files)


# ---------------------------------------------------------------------------------------------
# Decoding


def looks_binary(data: bytes) -> bool:
    """True for bytes that are no text in any encoding the web uses (images, archives, executables).
    UTF-16 text has NULs too, but starts with a byte order mark."""
    head = data[:_SNIFF_BYTES]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    if b"\x00" in head:
        return True
    return len(head) - len(head.translate(None, _CONTROL_BYTES)) > _MAX_CONTROL_FRACTION * len(head)


def _codec(label: str | None) -> str | None:
    """A Python codec for a charset label, mapped as the WHATWG encoding standard says (browsers read
    "iso-8859-1" and "ascii" as windows-1252, "gb2312" as gbk), or None for an unknown label."""
    if not label:
        return None
    from resiliparse.parse.encoding import map_encoding_to_html5

    try:
        name = codecs.lookup(label.strip().strip("\"'")).name
    except LookupError:
        return None
    mapped = map_encoding_to_html5(name)
    return codecs.lookup(mapped).name if mapped else name


def decode_html(data: bytes, declared: str | None = None) -> tuple[str, bool]:
    """(text, lossy) for the bytes of a web page; `declared` is the HTTP charset, if any. See the module
    docstring for the order in which encodings are tried; lossy means U+FFFD replaced invalid bytes."""
    for bom, codec in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                       (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):  # a byte order mark overrides every declaration
            text = data[len(bom):].decode(codec, errors="replace")
            return text, "\ufffd" in text
    meta = _META_CHARSET.search(data[:2048])
    declared_codecs = [_codec(declared), _codec(meta.group(1).decode("ascii")) if meta else None]
    tried = set()
    for codec in (*declared_codecs, "utf-8"):
        if codec and codec not in tried:
            tried.add(codec)
            try:
                return data.decode(codec), False
            except (UnicodeDecodeError, LookupError):
                pass
    as_utf8 = data.decode("utf-8", errors="replace")
    bad, non_ascii = as_utf8.count("\ufffd"), len(data.translate(None, _ASCII))
    # UTF-8 with a few stray bytes; a page that says it is UTF-8 may also have a few in little non-ASCII text
    if bad <= max(_MOSTLY_UTF8 * non_ascii, _FEW_BAD_BYTES if "utf-8" in declared_codecs else 0):
        return as_utf8, True
    from resiliparse.parse.encoding import detect_encoding

    for codec in (_codec(detect_encoding(data, html5_compatible=True)), "cp1252"):
        if codec and codec not in tried:
            tried.add(codec)
            try:
                return data.decode(codec), False
            except (UnicodeDecodeError, LookupError):
                pass
    return as_utf8, True


def _decode_utf8(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


# ---------------------------------------------------------------------------------------------
# Extraction


def extract_html(html: str, cfg: ExtractConfig, url: str | None = None) -> str:
    """The main text of one HTML page with the configured extractor ("" when there is none). Lines
    and paragraphs become newlines. May raise on input the extractor cannot parse; `iter_raw`
    counts those in `extract_errors`."""
    extractor = cfg.extractor if cfg.enabled else "plain"
    if extractor == "trafilatura":
        import trafilatura

        text = trafilatura.extract(
            html, url=url, output_format="txt", include_comments=cfg.include_comments,
            include_tables=cfg.include_tables, favor_precision=cfg.favor == "precision",
            favor_recall=cfg.favor == "recall", fast=cfg.fast, deduplicate=False, with_metadata=False)
        return (text or "").strip()
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    text = extract_plain_text(
        tree, preserve_formatting=True, main_content=extractor == "resiliparse", list_bullets=False,
        alt_texts=False, links=False, form_fields=False, noscript=False, comments=cfg.include_comments,
        skip_elements=None if cfg.include_tables else ["table"])
    return text.strip()


# ---------------------------------------------------------------------------------------------
# Reading one input file


class _FileReader:
    """Shared bookkeeping while one file is read: counters, the one warning, the output dicts."""

    def __init__(self, path: Path, cfg: ExtractConfig, counts: ExtractCounts, warn: Callable[[str], None]):
        self.path, self.cfg, self.counts, self.warn_fn = path, cfg, counts, warn
        self.warned = False

    def problem(self, counter: str, message: str) -> None:
        setattr(self.counts, counter, getattr(self.counts, counter) + 1)
        if not self.warned:  # one line per file: a million bad records must not flood the terminal
            self.warned = True
            self.warn_fn(f"{self.path}: {message} (further problems in this file are only counted)")

    def document(self, index: int, text: str, meta: dict, doc_id: str | None = None) -> dict | None:
        if len(text.strip()) < self.cfg.min_chars:
            self.counts.empty += 1
            return None
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate (a JSON "\ud800" escape) would break every UTF-8 writer
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            size = len(text.encode("utf-8"))
            self.problem("decode_errors", f"record {index} holds unpaired surrogates; replaced")
        self.counts.documents += 1
        self.counts.chars_out += len(text)
        self.counts.bytes_out += size
        source = f"{self.path}#{index}"
        return {"id": doc_id or source, "text": text, "source": source, "meta": meta}

    def html_document(self, index: int, data: bytes, declared: str | None, meta: dict,
                      doc_id: str | None = None) -> dict | None:
        """Decode and extract the bytes of one page (counted; None when skipped)."""
        if looks_binary(data):
            self.problem("skipped_binary", f"record {index} is binary data, not HTML")
            return None
        html, lossy = decode_html(data, declared)
        if lossy:
            self.problem("decode_errors", f"record {index} is not valid in its charset; invalid bytes replaced")
        return self.extract(index, html, meta, doc_id)

    def extract(self, index: int, html: str, meta: dict, doc_id: str | None = None) -> dict | None:
        try:
            text = extract_html(html, self.cfg, url=meta.get("url"))
        except Exception as e:  # extractors raise many types on pathological pages; one page must not stop a run
            self.problem("extract_errors", f"record {index}: extraction failed ({_one_line(e)})")
            return None
        return self.document(index, text, meta, doc_id)


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 200 else text[:197] + "..."


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def iter_raw(path: str | os.PathLike, cfg: ExtractConfig, counts: ExtractCounts,
             warn: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Stream the documents of one input file (see the module docstring), adding what happened to
    `counts`. Only a file with an unsupported suffix raises (LmforgeError); bad content is counted."""
    path = Path(path)
    _check_supported(path)
    name = path.name.lower()
    reader = _FileReader(path, cfg, counts, warn or _print_warning)
    counts.files += 1
    try:
        counts.bytes_in += path.stat().st_size
    except OSError as e:
        reader.problem("file_errors", f"cannot read: {e}")
        return
    if name.endswith(HTML_SUFFIXES):
        yield from _iter_html_file(reader)
    elif name.endswith(WARC_SUFFIXES + WET_SUFFIXES):
        yield from _iter_warc(reader)
    elif name.endswith(JSONL_SUFFIXES):
        yield from _iter_jsonl(reader)
    else:
        yield from _iter_txt(reader)


def _iter_html_file(r: _FileReader) -> Iterator[dict]:
    try:
        data = r.path.read_bytes()
        if r.path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; truncation an EOFError
        r.problem("file_errors", f"cannot read: {e}")
        return
    r.counts.records += 1
    r.counts.content_bytes += len(data)
    doc = r.html_document(0, data, None, {})
    if doc is not None:
        yield doc


def _strip_uri(uri: str | None) -> str | None:
    # wget writes WARC-Target-URI as <https://...> (the WARC 1.0 grammar's form); readers expect the bare URI
    if uri is None:
        return None
    uri = uri.strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1].strip()
    return uri or None


def _warc_meta(record) -> dict:
    h = record.headers
    meta = {"url": _strip_uri(h.get("WARC-Target-URI")), "warc_date": h.get("WARC-Date"),
            "warc_record_id": _strip_uri(h.get("WARC-Record-ID"))}
    language = h.get("WARC-Identified-Content-Language")
    if language:
        meta["content_language"] = language
    return {k: v for k, v in meta.items() if v is not None}


def _looks_like_html(data: bytes) -> bool:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head")) or b"<html" in head


def _iter_warc(r: _FileReader) -> Iterator[dict]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    counts = r.counts
    try:
        stream = open(r.path, "rb")
    except OSError as e:
        r.problem("file_errors", f"cannot read: {e}")
        return
    with stream:
        # auto_decode undoes chunked transfer encoding (wget keeps it) and gzip content encoding.
        records = iter(ArchiveIterator(stream, parse_http=True, auto_decode="all"))
        index, last_pos = -1, 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                if not _gzip_tail_complete(stream, last_pos):
                    r.problem("file_errors", f"is truncated: its gzip data ends early (last record read: {index})")
                break
            except Exception as e:  # fastwarc raises OSError for data that is no WARC or is corrupt
                what = "is not a WARC file" if index < 0 else f"is corrupt after record {index}"
                r.problem("file_errors", f"{what} ({_one_line(e)})")
                return
            index += 1
            counts.records += 1
            last_pos = record.stream_pos
            rtype = record.record_type
            if rtype == WarcRecordType.conversion:  # WET: text already extracted by the crawler
                try:
                    data = record.reader.read()
                except Exception as e:
                    r.problem("bad_records", f"record {index} cannot be read ({_one_line(e)})")
                    continue
                counts.content_bytes += len(data)
                if looks_binary(data):
                    r.problem("skipped_binary", f"record {index} is binary data, not text")
                    continue
                text, lossy = _decode_utf8(data)
                if lossy:
                    r.problem("decode_errors", f"record {index} is not valid UTF-8; invalid bytes replaced")
                meta = _warc_meta(record)
                doc = r.document(index, text.strip(), meta, meta.get("warc_record_id"))
                if doc is not None:
                    yield doc
                continue
            if rtype != WarcRecordType.response:
                counts.skipped_record_type += 1
                continue
            if not record.is_http or record.http_headers is None:
                counts.skipped_non_html += 1  # e.g. dns: records of some crawlers
                continue
            if record.http_headers.status_code != 200:
                counts.skipped_status += 1
                continue
            mime = (record.http_content_type or "").lower()
            if mime and mime not in HTML_TYPES:
                counts.skipped_non_html += 1
                continue
            try:
                data = record.reader.read()
            except Exception as e:  # a broken gzip/chunked encoding inside one record, or the file ends in it
                r.problem("bad_records", f"record {index}: its HTTP encoding cannot be undone ({_one_line(e)})")
                continue
            encoded = any(record.http_headers.get(k) for k in ("Transfer-Encoding", "Content-Encoding"))
            if not encoded and len(data) < record.content_length:  # the file ends inside this record
                r.problem("file_errors", f"is truncated inside record {index}")
                return
            counts.content_bytes += len(data)
            if not mime and not _looks_like_html(data):  # no Content-Type: sniff like a browser would
                counts.skipped_non_html += 1
                continue
            meta = _warc_meta(record)
            doc = r.html_document(index, data, record.http_charset, meta, meta.get("warc_record_id"))
            if doc is not None:
                yield doc


def _gzip_tail_complete(stream, offset: int) -> bool:
    """Whether every gzip member from `offset` (where the last record read starts) to the end of the
    file is complete: fastwarc ends silently at a member cut short, so a truncated download would
    otherwise look like a shorter file. Only the last record or two are decompressed again."""
    stream.seek(0)
    if stream.read(2) != b"\x1f\x8b":
        return True  # uncompressed: a record cut short is caught by its Content-Length
    stream.seek(offset)
    member, pending = zlib.decompressobj(wbits=31), False
    try:
        for block in iter(lambda: stream.read(1 << 16), b""):
            while block:
                member.decompress(block)
                pending = True
                if not member.eof:
                    break
                block = member.unused_data
                member, pending = zlib.decompressobj(wbits=31), False
    except zlib.error:
        return False
    return not pending


def _open_lines(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _record_meta(record: dict) -> dict:
    meta: dict = {}
    metadata = record.get("metadata")
    if isinstance(metadata, dict):  # Dolma: {"id", "text", "metadata": {"url", ...}}
        meta.update({k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))})
    url = record.get("url")
    if isinstance(url, str) and url:
        meta["url"] = url
    return meta


def _iter_jsonl(r: _FileReader) -> Iterator[dict]:
    counts = r.counts
    try:
        f = _open_lines(r.path)
    except OSError as e:
        r.problem("file_errors", f"cannot read: {e}")
        return
    with f:
        lines = iter(f)
        index = -1
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated gzip, I/O error
                r.problem("file_errors", f"cannot be read past line {index + 1} ({e})")
                return
            index += 1
            if not raw.strip():
                continue
            counts.records += 1
            counts.content_bytes += len(raw)
            line, lossy = _decode_utf8(raw)
            if lossy:
                r.problem("decode_errors", f"line {index + 1} is not valid UTF-8; invalid bytes replaced")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                r.problem("bad_records", f"line {index + 1} is not valid JSON ({e})")
                continue
            if not isinstance(record, dict):
                r.problem("bad_records", f"line {index + 1} is a JSON {type(record).__name__}, not an object")
                continue
            doc_id = record.get("id")
            doc_id = str(doc_id) if isinstance(doc_id, (str, int)) and doc_id != "" else None
            meta = _record_meta(record)
            text, html = record.get("text"), record.get("html")
            if isinstance(text, str):
                doc = r.document(index, text, meta, doc_id)
            elif isinstance(html, str):
                doc = r.extract(index, html, meta, doc_id)
            else:
                r.problem("bad_records", f"line {index + 1} has no \"text\" or \"html\" string")
                continue
            if doc is not None:
                yield doc


def _iter_txt(r: _FileReader) -> Iterator[dict]:
    """Documents separated by two or more blank lines, read line by line so a huge file never sits
    in memory whole (a document does)."""
    counts = r.counts
    try:
        f = open(r.path, "rb")
    except OSError as e:
        r.problem("file_errors", f"cannot read: {e}")
        return
    with f:
        if looks_binary(f.read(_SNIFF_BYTES)):
            counts.records += 1
            r.problem("skipped_binary", "is binary data, not text")
            return
        f.seek(0)
        index, lines, blank_run = 0, [], 0

        def finish():
            nonlocal lines
            data = b"".join(lines)
            counts.records += 1
            counts.content_bytes += len(data)
            text, bad = _decode_utf8(data.removeprefix(codecs.BOM_UTF8) if index == 0 else data)
            lines = []
            if bad:
                r.problem("decode_errors", f"document {index} is not valid UTF-8; invalid bytes replaced")
            return r.document(index, text.strip(), {})

        try:
            for raw in f:
                if raw.strip():
                    if blank_run >= 2 and lines:
                        doc = finish()
                        if doc is not None:
                            yield doc
                        index += 1
                    blank_run = 0
                elif lines:
                    blank_run += 1
                if lines or raw.strip():
                    lines.append(raw)
        except OSError as e:
            r.problem("file_errors", f"cannot be read to the end ({e})")
            return
        if lines:
            doc = finish()
            if doc is not None:
                yield doc
