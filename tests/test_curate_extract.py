"""Curation step 1 (lmforge/curate/extract.py): resolving inputs, reading HTML / WARC / WET / jsonl /
txt, extracting main text, and counting (never raising on) bad input. Every fixture is written by
the test; one test reads the real web excerpts of the development data."""
from __future__ import annotations

import gzip
import io
import json
import os

import pytest
from conftest import shared_file

from lmforge.common import LmforgeError
from lmforge.curate.extract import ExtractConfig, ExtractCounts, decode_html, extract_html, iter_raw, list_inputs

ARTICLE = [
    "Rivers carve their valleys over many thousands of years, grinding rock into sand and carrying it "
    "downstream toward the sea where it settles into wide deltas.",
    "During floods the water rises quickly and moves boulders that would otherwise stay in place for "
    "centuries, which is why the steepest valleys are often the youngest ones in a landscape.",
    "Geologists measure the age of river terraces by dating the sediments found in each layer, and the "
    "results show that most terraces formed during the cold periods of the last ice age.",
    "The slow meandering of lowland rivers tells a different story: there the current erodes the outer "
    "bank of each bend and deposits gravel on the inner bank, so the loops wander across the plain.",
]
NAV = ["Homepage of the magazine", "Subscribe to our newsletter", "Weather forecast"]
COOKIE = "This website uses cookies to improve your experience. Accept all cookies"
FOOTER = "Copyright 2024 Example Media Group. All rights reserved."


def page(article=ARTICLE, title="How rivers shape valleys") -> str:
    nav = "".join(f'<li><a href="/s{i}">{t}</a></li>' for i, t in enumerate(NAV))
    paras = "".join(f"<p>{p}</p>" for p in article)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f'<div id="cookie-banner" class="cookie-consent"><p>{COOKIE}</p><button>OK</button></div>'
            f'<header><nav class="menu"><ul>{nav}</ul></nav></header>'
            f"<main><article><h1>{title}</h1>{paras}</article></main>"
            f'<footer class="site-footer"><p>{FOOTER}</p><a href="/privacy">Privacy policy</a></footer>'
            "</body></html>")


def read(path, cfg=None, **kwargs):
    """(documents, counts, warning lines) of one file."""
    counts, warnings = ExtractCounts(), []
    docs = list(iter_raw(path, cfg or ExtractConfig(**kwargs), counts, warn=warnings.append))
    return docs, counts, warnings


# ----------------------------------------------------------------------------- HTML extraction


@pytest.mark.parametrize("extractor", ["trafilatura", "resiliparse"])
def test_extractors_keep_the_article_and_drop_navigation_footer_and_cookie_banner(extractor):
    text = extract_html(page(), ExtractConfig(extractor=extractor))
    for paragraph in ARTICLE:
        assert paragraph in text
    for boilerplate in [*NAV, COOKIE, FOOTER]:
        assert boilerplate not in text


def test_plain_extractor_and_disabled_step_keep_all_visible_text():
    """The baseline really is boilerplate-blind (so the test above measures something)."""
    for cfg in (ExtractConfig(extractor="plain"), ExtractConfig(enabled=False)):
        text = extract_html(page(), cfg)
        assert ARTICLE[0] in text and NAV[0] in text and FOOTER in text
        assert "<p>" not in text and "cookie-banner" not in text  # markup and attributes never leak


def test_bad_config_values_are_refused():
    """ValueError, as every step's config: the curate config reader turns it into an LmforgeError."""
    with pytest.raises(ValueError, match="extractor must be one of trafilatura, resiliparse, plain"):
        ExtractConfig(extractor="beautifulsoup")
    with pytest.raises(ValueError, match="favor"):
        ExtractConfig(favor="speed")
    with pytest.raises(ValueError, match="min_chars"):
        ExtractConfig(min_chars=-1)


def test_html_files_plain_and_gzipped(tmp_path):
    (tmp_path / "a.html").write_text(page())
    (tmp_path / "b.htm.gz").write_bytes(gzip.compress(page(title="Second page").encode()))
    for name in ("a.html", "b.htm.gz"):
        docs, counts, warnings = read(tmp_path / name)
        assert len(docs) == 1 and ARTICLE[1] in docs[0]["text"] and NAV[0] not in docs[0]["text"]
        assert docs[0]["source"] == f"{tmp_path / name}#0" and docs[0]["id"] == docs[0]["source"]
        assert counts.documents == 1 and counts.bytes_in == (tmp_path / name).stat().st_size
        assert counts.chars_out == len(docs[0]["text"]) and not warnings
        assert counts.bytes_out == len(docs[0]["text"].encode())


# ----------------------------------------------------------------------------- WARC / WET


def write_warc(path, uri_wrap=lambda u: u):
    """warcinfo, then per page a request and a response; plus a PNG, a 404 HTML page, a metadata
    record and a chunked HTML response (wget keeps the transfer encoding)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    def response(writer, uri, body, status="200 OK", ctype="text/html; charset=utf-8", extra=()):
        http = StatusAndHeaders(status, [("Content-Type", ctype), *extra], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(uri_wrap(uri), "response", payload=io.BytesIO(body),
                                                      http_headers=http))

    chunked_body = page(article=["Chunked transfer " + ARTICLE[2]], title="Chunked").encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (chunked_body[:500], chunked_body[500:]))
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=str(path).endswith(".gz"))
        w.write_record(w.create_warcinfo_record(os.path.basename(path), {"software": "test"}))
        req = StatusAndHeaders("GET /rivers HTTP/1.1", [("Host", "example.org")], is_http_request=True)
        w.write_record(w.create_warc_record(uri_wrap("https://example.org/rivers"), "request",
                                            payload=io.BytesIO(b""), http_headers=req))
        response(w, "https://example.org/rivers", page().encode())
        response(w, "https://example.org/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), ctype="image/png")
        response(w, "https://example.org/missing", page(title="Not found").encode(), status="404 Not Found")
        w.write_record(w.create_warc_record(uri_wrap("https://example.org/rivers"), "metadata",
                                            payload=io.BytesIO(b"fetchTimeMs: 120\r\n"),
                                            warc_content_type="application/warc-fields"))
        response(w, "https://example.org/chunked", chunked + b"0\r\n\r\n", extra=[("Transfer-Encoding", "chunked")])


@pytest.mark.parametrize("wrap", [False, True], ids=["bare-uri", "wget-<uri>"])
def test_warc_extracts_exactly_the_html_200_responses(tmp_path, wrap):
    path = tmp_path / "crawl.warc.gz"
    write_warc(path, (lambda u: f"<{u}>") if wrap else (lambda u: u))
    docs, counts, warnings = read(path)
    assert [d["meta"]["url"] for d in docs] == ["https://example.org/rivers", "https://example.org/chunked"]
    rivers, chunked = docs
    assert ARTICLE[3] in rivers["text"] and FOOTER not in rivers["text"]
    assert "Chunked transfer " + ARTICLE[2] in chunked["text"]  # chunk sizes undone, not glued into the text
    assert rivers["id"].startswith("urn:uuid:") and rivers["id"] == rivers["meta"]["warc_record_id"]
    assert rivers["meta"]["warc_date"] and rivers["source"] == f"{path}#2"  # warcinfo 0, request 1
    assert counts.records == 7 and counts.skipped_record_type == 3  # warcinfo, request, metadata
    assert counts.skipped_non_html == 1 and counts.skipped_status == 1 and counts.documents == 2
    assert not warnings and counts.file_errors == 0


def test_uncompressed_warc_and_wet(tmp_path):
    from warcio.warcwriter import WARCWriter

    write_warc(tmp_path / "crawl.warc")
    assert len(read(tmp_path / "crawl.warc")[0]) == 2
    text = "Ríos y valles\nLos ríos excavan sus valles durante miles de años."
    with open(tmp_path / "crawl.warc.wet.gz", "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warcinfo_record("crawl.warc.wet.gz", {"software": "test"}))
        w.write_record(w.create_warc_record("https://example.es/rios", "conversion",
                                            payload=io.BytesIO(text.encode()), warc_content_type="text/plain",
                                            warc_headers_dict={"WARC-Identified-Content-Language": "spa"}))
    docs, counts, _ = read(tmp_path / "crawl.warc.wet.gz")
    assert [d["text"] for d in docs] == [text]  # already text: passes through unchanged
    assert docs[0]["meta"]["url"] == "https://example.es/rios" and docs[0]["meta"]["content_language"] == "spa"
    assert counts.skipped_record_type == 1 and counts.documents == 1


def test_truncated_or_fake_warc_is_counted_not_raised(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    write_warc(path)
    data = path.read_bytes()
    # Cut inside the chunked payload of the last response, and inside its WARC headers (where fastwarc
    # itself ends silently): the pages before the cut are kept, the file is counted once.
    for cut in (200, 1000):
        (tmp_path / "cut.warc.gz").write_bytes(data[: len(data) - cut])
        docs, counts, warnings = read(tmp_path / "cut.warc.gz")
        assert [d["meta"]["url"] for d in docs] == ["https://example.org/rivers"]
        assert counts.file_errors == 1 and len(warnings) == 1
    (tmp_path / "fake.warc.gz").write_bytes(gzip.compress(b"this is a plain text file\n" * 50))
    docs, counts, warnings = read(tmp_path / "fake.warc.gz")
    assert docs == [] and counts.file_errors == 1 and counts.files == 1
    assert len(warnings) == 1 and "not a WARC file" in warnings[0] and "fake.warc.gz" in warnings[0]


# ----------------------------------------------------------------------------- jsonl and txt


def test_jsonl_passes_text_through_keeps_dolma_ids_and_extracts_html(tmp_path):
    long = ARTICLE[0]
    lines = [
        json.dumps({"text": long}),
        "",
        json.dumps({"id": "doc-7", "text": ARTICLE[1], "metadata": {"url": "example.com/a", "warc_date": "2019"},
                    "attributes": {"spans": [[0, 3]]}}),
        json.dumps({"url": "https://example.org/p", "html": page()}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"title": "no text here"}),
        json.dumps({"text": "tiny"}),
    ]
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    docs, counts, warnings = read(path)
    assert [d["text"] for d in docs[:2]] == [long, ARTICLE[1]]  # exactly as given
    assert docs[0]["id"] == f"{path}#0" and docs[1]["id"] == "doc-7" and docs[1]["source"] == f"{path}#2"
    assert docs[1]["meta"] == {"url": "example.com/a", "warc_date": "2019"}
    assert docs[2]["meta"]["url"] == "https://example.org/p" and ARTICLE[2] in docs[2]["text"]
    assert NAV[1] not in docs[2]["text"]
    assert counts.records == 7 and counts.bad_records == 3 and counts.empty == 1 and counts.documents == 3
    assert len(warnings) == 1 and "line 5" in warnings[0]  # the first problem only


def test_txt_documents_are_separated_by_two_blank_lines(tmp_path):
    path = tmp_path / "books.txt"
    path.write_text("\ufeffFirst book, first paragraph.\n\nStill the first book.\n\n\n\n"
                    "Second book, alone.\n  \n\nThird book's only line.\n\n")
    docs, counts, _ = read(path, min_chars=1)
    assert [d["text"] for d in docs] == ["First book, first paragraph.\n\nStill the first book.",
                                         "Second book, alone.", "Third book's only line."]
    assert [d["source"].rsplit("#", 1)[1] for d in docs] == ["0", "1", "2"]


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_counted_and_skipped_with_one_warning_per_file(tmp_path):
    rng = __import__("random").Random(0)
    junk = bytes(rng.randrange(256) for _ in range(4000))
    (tmp_path / "junk.html").write_bytes(junk)
    docs, counts, warnings = read(tmp_path / "junk.html")
    assert docs == [] and counts.skipped_binary == 1 and len(warnings) == 1

    # Declared UTF-8 with one stray byte: kept, counted, the bad byte replaced (not a mojibake of the page).
    broken = page().replace("thousands", "th\x00ousands").encode().replace(b"\x00", b"\xff")
    (tmp_path / "stray.html").write_bytes(broken.replace(b"Rivers carve", "Rivières carve".encode()))
    docs, counts, warnings = read(tmp_path / "stray.html")
    assert counts.decode_errors == 1 and len(docs) == 1 and len(warnings) == 1
    assert "Rivières carve" in docs[0]["text"] and "th\ufffdousands" in docs[0]["text"]

    # Undeclared windows-1252 is a legacy encoding, not an error: decoded right, nothing counted.
    legacy = page().replace("<meta charset='utf-8'>", "").replace("Rivers carve", "Flüsse graben")
    docs, counts, warnings = read(_write(tmp_path / "legacy.html", legacy.encode("cp1252")))
    assert "Flüsse graben" in docs[0]["text"] and counts.decode_errors == 0 and not warnings

    # A truncated .jsonl.gz: the records before the cut are kept, the file counted once.
    data = gzip.compress("".join(json.dumps({"text": f"{i} {ARTICLE[i % 4]}"}) + "\n" for i in range(400)).encode())
    docs, counts, warnings = read(_write(tmp_path / "cut.jsonl.gz", data[: len(data) // 2]))
    assert 0 < len(docs) < 400 and counts.file_errors == 1 and len(warnings) == 1

    # Invalid UTF-8 in a jsonl line and in a .txt: replaced and counted, the document kept.
    docs, counts, _ = read(_write(tmp_path / "bad.jsonl", b'{"text": "caf\xe9 au lait, a long enough text"}\n'))
    assert docs[0]["text"] == "caf\ufffd au lait, a long enough text" and counts.decode_errors == 1
    docs, counts, _ = read(_write(tmp_path / "lone.jsonl", b'{"text": "half a pair \\ud800 in a long enough text"}\n'))
    assert docs[0]["text"].encode() and counts.decode_errors == 1  # writable as UTF-8 downstream
    docs, counts, _ = read(_write(tmp_path / "bad.txt", b"caf\xe9 au lait, a long enough text\n"))
    assert docs[0]["text"] == "caf\ufffd au lait, a long enough text" and counts.decode_errors == 1
    docs, counts, _ = read(_write(tmp_path / "binary.txt", junk))
    assert docs == [] and counts.skipped_binary == 1

    # Broken HTML and an empty file are no crash either.
    docs, counts, _ = read(_write(tmp_path / "broken.html", b"<html><body><div><p>Unclosed " + ARTICLE[0].encode()))
    assert counts.records == 1 and counts.documents + counts.empty == 1
    docs, counts, _ = read(_write(tmp_path / "empty.html", b""))
    assert docs == [] and counts.empty == 1


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_decode_html_prefers_the_declared_charset():
    text = "Привет, мир"
    assert decode_html(text.encode("cp1251"), "windows-1251") == (text, False)
    meta = f"<html><head><meta charset=windows-1251></head><body>{text}</body></html>"
    assert text in decode_html(meta.encode("cp1251"))[0]
    assert decode_html("é".encode("utf-16"))[0] == "é"  # a BOM wins


def test_counts_add_up_across_workers():
    a, b = ExtractCounts(documents=2, chars_out=10), ExtractCounts(documents=3, file_errors=1)
    assert a.add(b).to_dict()["documents"] == 5 and a.file_errors == 1 and a.chars_out == 10


# ----------------------------------------------------------------------------- resolving inputs


def test_list_inputs_files_folders_globs_and_errors(tmp_path):
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    for name in ["sub/b.warc.gz", "sub/a.html", "c.jsonl", "README.md", "sub/x.warc.wat.gz", "sub/.hidden/d.txt"]:
        (tmp_path / name).write_text("x")
    found = list_inputs([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["c.jsonl", "sub/a.html", "sub/b.warc.gz"]
    assert list_inputs([str(tmp_path / "sub" / "*.html"), tmp_path / "sub" / "a.html"]) == [tmp_path / "sub/a.html"]
    with pytest.raises(LmforgeError, match="no such file or folder: .*nope.warc"):
        list_inputs([tmp_path / "nope.warc"])
    with pytest.raises(LmforgeError, match="unsupported input file: .*README.md"):
        list_inputs([tmp_path / "README.md"])
    with pytest.raises(LmforgeError, match="matches no supported files"):
        list_inputs([str(tmp_path / "*.pdf")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="contains no supported files"):
        list_inputs([tmp_path / "empty"])
    with pytest.raises(LmforgeError, match="unsupported input file"):
        list(iter_raw(tmp_path / "README.md", ExtractConfig(), ExtractCounts()))


# ----------------------------------------------------------------------------- the real excerpts


def test_real_web_excerpts_yield_documents():
    files = {rel: shared_file(f"web-raw/{rel}") for rel in [
        "warc/CC-MAIN-2020-34-excerpt.warc.gz", "warc/dolma-sample-0000.warc.gz",
        "warc/dolma-sample-0001.warc.gz", "cc-whirlwind/whirlwind.warc.wet.gz"]}
    cfg = ExtractConfig(extractor="resiliparse")  # the fast one; trafilatura's quality is bench/curate_extract.py's
    got = {}
    for rel, path in files.items():
        docs, counts, warnings = read(path, cfg)
        assert not warnings and counts.file_errors == 0, rel
        assert all(d["meta"]["url"].startswith("http") for d in docs), rel  # wget's <> stripped
        got[rel] = (len(docs), counts)
        if rel.startswith("warc/CC-MAIN"):  # declared windows-1251 in its HTTP header: decoded, not mojibake
            (ru,) = [d["text"] for d in docs if d["meta"]["url"] == "http://01spb.ru/company/"]
            assert "пожарной безопасности" in ru
    # 16 Common Crawl responses, all HTML 200; the wget WARCs hold 22 and 15 pages; one WET page.
    assert got["warc/CC-MAIN-2020-34-excerpt.warc.gz"][0] >= 14
    assert got["warc/dolma-sample-0000.warc.gz"][0] >= 20 and got["warc/dolma-sample-0001.warc.gz"][0] >= 13
    assert got["cc-whirlwind/whirlwind.warc.wet.gz"][0] == 1
    cc = got["warc/CC-MAIN-2020-34-excerpt.warc.gz"][1]
    assert cc.records == 50 and cc.skipped_record_type == 34 and cc.chars_out > 10_000
