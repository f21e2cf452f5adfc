"""qlora/packing.py and qlora/shards.py with the real Llama-3 tokenizer: BOS handling, labels, best-fit packing,
long documents, shard layout and metadata validation. In-process and fast."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from qlora.errors import UserError
from qlora.llama3 import (BOS, BOS_ID, END_OF_TEXT_ID, EOT, EOT_ID, PAD_ID, START_HEADER_ID,
                          format_chat, format_chat_prompt, format_plain)
from qlora.packing import PackStats, TokenizedChunk, pack_documents, parse_jsonl_lines, tokenize_documents
from qlora.shards import ROW_GROUP_ROWS, SCHEMA, ShardWriter, read_shard_metadata

IGNORE = -100


@pytest.fixture(scope="module")
def tok(llama3_tokenizer_json):
    return Tokenizer.from_file(llama3_tokenizer_json)


def docs_of(chunk: TokenizedChunk) -> list[list[int]]:
    off = np.concatenate(([0], np.cumsum(chunk.lens)))
    return [chunk.ids[a:b].tolist() for a, b in zip(off[:-1], off[1:])]


# -- tokenize_documents --------------------------------------------------------------------------------------
def test_one_bos_and_end_token_whether_or_not_the_text_has_them(tok):
    with_specials = format_plain("The cat sat on the mat.")
    bare = "The cat sat on the mat."
    chunk = tokenize_documents(tok, [with_specials, bare, BOS + bare], ["plain"] * 3)
    a, b, c = docs_of(chunk)
    assert a == b == c
    assert a[0] == BOS_ID and a.count(BOS_ID) == 1 and a[-1] == END_OF_TEXT_ID
    assert list(chunk.mask_lens) == [1, 1, 1]
    assert tok.decode(a, skip_special_tokens=False) == with_specials


def test_special_tokens_in_text_become_single_ids(tok):
    text = format_chat("a prompt", "an answer", system="be brief")
    (ids,) = docs_of(tokenize_documents(tok, [text], ["chat"]))
    assert ids.count(START_HEADER_ID) == 3 and ids.count(EOT_ID) == 3 and ids[-1] == EOT_ID
    assert "<|" not in tok.decode(ids, skip_special_tokens=True)


def test_meta_style_tokenizer_gives_the_same_ids(tok, tiny_model_dir):
    meta = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert meta.encode("hello").ids[0] == BOS_ID  # it does add BOS by itself...
    texts = [format_plain("hello world"), "no specials here", format_chat("p", "r")]
    fmts = ["plain", "plain", "chat"]
    a, b = tokenize_documents(tok, texts, fmts), tokenize_documents(meta, texts, fmts)
    assert docs_of(a) == docs_of(b) and list(a.mask_lens) == list(b.mask_lens)  # ...but not here


def test_bos_inside_a_document_is_an_error(tok):
    with pytest.raises(UserError, match=r"data.jsonl:7: <\|begin_of_text\|> inside"):
        tokenize_documents(tok, ["ok", "one" + BOS + "two"], ["plain"] * 2, path="data.jsonl", line_nos=[3, 7])


@pytest.mark.parametrize("response", ["C4 D5 E4", "\nstarts with a newline", " leading space", ""])
def test_chat_labels_mask_the_prompt_up_to_the_assistant_header(tok, response):
    prompt, system = "A5 B4 C4", "You transpose notes."
    text = format_chat(prompt, response, system)
    chunk = tokenize_documents(tok, [text], ["chat"])
    (ids,) = docs_of(chunk)
    m = int(chunk.mask_lens[0])
    head = tok.decode(ids[:m], skip_special_tokens=False)
    tail = tok.decode(ids[m:], skip_special_tokens=False)
    if response.startswith("\n"):  # "\n\n\n" is one token straddling the cut: it counts as prompt
        assert head == format_chat_prompt(prompt, system) + "\n" and tail == response[1:] + EOT
    else:  # the header's "\n\n" is its own token: the cut is exact
        assert head == format_chat_prompt(prompt, system) and tail == response + EOT
    on_prompt = tokenize_documents(tok, [text], ["chat"], train_on_prompt=True)
    assert list(on_prompt.mask_lens) == [1]


def test_parse_jsonl_lines_errors_name_file_and_line():
    ok = [b'{"text": "a"}', b"", b'{"text": "b", "format": "chat"}']
    texts, fmts, lines = parse_jsonl_lines(ok, "f.jsonl", 10)
    assert texts == ["a", "b"] and fmts == ["plain", "chat"] and lines == [10, 12]
    auto = parse_jsonl_lines([json.dumps({"text": format_chat("p", "r")})], "f", 1)[1]
    assert auto == ["chat"]
    for bad, msg in [(b'{"text": "a"', "f.jsonl:5: malformed JSON"), (b'{"txt": "a"}', 'f.jsonl:5: record has no "text"'),
                     (b'{"text": 3}', 'f.jsonl:5: "text" is a int'), (b'[1]', "f.jsonl:5: expected a JSON object"),
                     (b'{"text": "a", "format": "x"}', 'f.jsonl:5: "format" is'), (b'\xff\xfe', "f.jsonl:5: malformed")]:
        with pytest.raises(UserError, match=msg):
            parse_jsonl_lines([bad], "f.jsonl", 5)


# -- packing -------------------------------------------------------------------------------------------------
def make_chunk(lengths, mask=1, fmt=0, path="x.jsonl", seed=0) -> TokenizedChunk:
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        d = rng.integers(1000, 100000, n).astype(np.int32)
        d[0], d[-1] = BOS_ID, END_OF_TEXT_ID
        docs.append(d)
    lens = np.array(lengths, dtype=np.int64)
    return TokenizedChunk(path, np.concatenate(docs), lens, np.full(len(lengths), mask, dtype=np.int64),
                          np.arange(1, len(lengths) + 1), np.full(len(lengths), fmt, dtype=np.int8))


def check_rows(rows, max_len):
    segments = []
    for r in rows:
        assert len(r.input_ids) == len(r.labels) == max_len
        used = sum(r.doc_lens)
        assert used <= max_len and all(x == PAD_ID for x in r.input_ids[used:])
        assert (r.labels[used:] == IGNORE).all()
        start = 0
        for n in r.doc_lens:
            seg = r.input_ids[start:start + n]
            assert seg[0] == BOS_ID and (seg == BOS_ID).sum() == 1 and r.labels[start] == IGNORE
            segments.append(seg.tolist())
            start += n
    return segments


def test_best_fit_packs_every_document_whole_and_fills_rows():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 900, 3000).tolist()
    chunk = make_chunk(lengths)
    stats = PackStats()
    rows = list(pack_documents([chunk], 8192, stats=stats))
    segments = check_rows(rows, 8192)
    assert sorted(map(tuple, segments)) == sorted(map(tuple, docs_of(chunk)))  # every document once, unsplit
    for r in rows:  # labels = ids except the masked first token of each document and the padding
        used = sum(r.doc_lens)
        starts = np.cumsum([0] + r.doc_lens[:-1])
        expect = r.input_ids.copy()
        expect[starts] = IGNORE
        expect[used:] = IGNORE
        assert (r.labels == expect).all()
    assert stats.rows == len(rows) and stats.documents == len(lengths) and stats.tokens == sum(lengths)
    assert stats.as_dict(8192)["fill_rate"] >= 0.98
    naive_rows = 1 + sum(lengths) // 8192
    assert len(rows) <= naive_rows + 1


def test_bounded_open_rows_still_pack_every_document():
    lengths = np.random.default_rng(2).integers(2000, 5000, 400).tolist()
    rows = list(pack_documents([make_chunk(lengths)], 8192, max_open=4, window_tokens=20000))
    assert sorted(map(tuple, check_rows(rows, 8192))) == sorted(map(tuple, docs_of(make_chunk(lengths))))


def test_long_documents_split_drop_error():
    L = 64
    chunk = make_chunk([10, 150, 20], mask=5)
    long_doc = docs_of(chunk)[1]
    stats = PackStats()
    rows = list(pack_documents([chunk], L, long_policy={"plain": "split"}, stats=stats))
    segments = check_rows(rows, L)
    assert stats.long_split == 1 and stats.documents == 3
    # the pieces: 64 tokens, then BOS + 63, then BOS + the remaining 23; joined without the added BOS = original
    pieces = [s for s in segments if s[1:] and s[1] in long_doc and len(s) != 10 and len(s) != 20]
    rebuilt = pieces[0] + pieces[1][1:] + pieces[2][1:]
    assert [len(p) for p in pieces] == [64, 64, 24] and rebuilt == long_doc
    for r in rows:  # the long doc's 5 masked tokens sit in its first piece; later pieces mask only their BOS
        starts = np.cumsum([0] + r.doc_lens[:-1])
        for s, n in zip(starts, r.doc_lens):
            masked = int((r.labels[s:s + n] == IGNORE).sum())
            assert masked == (5 if r.input_ids[s:s + n].tolist() in (docs_of(chunk)[0], docs_of(chunk)[2], long_doc[:64])
                              else 1)

    stats = PackStats()
    rows = list(pack_documents([chunk], L, long_policy={"plain": "drop"}, stats=stats))
    assert stats.long_dropped == 1 and stats.documents == 2 and sum(sum(r.doc_lens) for r in rows) == 30

    with pytest.raises(UserError, match=r"x.jsonl:2: document has 150 tokens, more than --max-len 64"):
        list(pack_documents([chunk], L, long_policy={"plain": "error"}))


def test_default_long_policy_splits_plain_and_drops_chat():
    stats = PackStats()
    list(pack_documents([make_chunk([100], fmt=0), make_chunk([100], fmt=1)], 64, stats=stats))
    assert (stats.long_split, stats.long_dropped) == (1, 1)


# -- shards --------------------------------------------------------------------------------------------------
def test_shard_writer_row_groups_and_metadata_validation(tmp_path):
    L = 32
    rows = list(pack_documents([make_chunk(list(range(4, 30)) * 8)], L))
    w = ShardWriter(tmp_path / "train", L, rows_per_shard=100)
    for r in rows:
        w.write(r.input_ids, r.labels, r.doc_lens)
    shards = w.close()
    assert len(shards) == -(-len(rows) // 100) >= 2
    total = 0
    for s in shards:
        pf = pq.ParquetFile(tmp_path / "train" / s)
        assert pf.schema_arrow.equals(SCHEMA) and pf.metadata.num_rows <= 100
        assert all(pf.metadata.row_group(g).num_rows <= ROW_GROUP_ROWS for g in range(pf.metadata.num_row_groups))
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        total += pf.metadata.num_rows
    assert total == len(rows)
    back = pq.read_table(tmp_path / "train" / shards[0]).to_pylist()[0]
    assert back["input_ids"] == rows[0].input_ids.tolist() and back["doc_lens"] == rows[0].doc_lens

    (tmp_path / "validation").mkdir()
    meta = {"tokenizer": {"name": "t", "sha256": "abc"}, "max_len": L, "pad_id": PAD_ID, "format": "plain",
            "long_documents": {"policy": "split", "split": 0, "dropped": 0},
            "splits": {"train": {"rows": len(rows), "shards": [f"train/{s}" for s in shards]},
                       "validation": {"rows": 0, "shards": []}}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    got = read_shard_metadata(tmp_path, tokenizer_sha256="abc", max_len=L)
    assert len(got["splits"]["train"]["shard_paths"]) == len(shards)
    with pytest.raises(UserError, match="not this model's tokenizer"):
        read_shard_metadata(tmp_path, tokenizer_sha256="def")
    with pytest.raises(UserError, match="rows of 32 tokens, expected 64"):
        read_shard_metadata(tmp_path, max_len=64)
    meta["splits"]["train"]["rows"] += 1
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="lists .* rows, its shards hold"):
        read_shard_metadata(tmp_path)
    (tmp_path / "train" / shards[-1]).unlink()
    with pytest.raises(UserError, match="is missing"):
        read_shard_metadata(tmp_path)
    with pytest.raises(UserError, match="metadata.json: missing"):
        read_shard_metadata(tmp_path / "validation")
