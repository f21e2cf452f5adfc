"""pretokenize.py end to end (subprocess) with the real Llama-3 tokenizer: both tokenizer styles give identical
shards, decoded documents equal their JSONL text, labels, one-line errors without partial output, atomic rerun,
and the real data_processing.py output of examples/sample."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from qlora.llama3 import BOS_ID, END_OF_TEXT_ID, EOT, EOT_ID, PAD_ID, format_chat, format_chat_prompt, format_plain
from qlora.shards import read_shard_metadata

REPO = Path(__file__).resolve().parent.parent
IGNORE = -100
WORDS = "the of and to in is it you that he was for on are with as his they be at one have this from".split()


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def plain_records(n, seed, max_words=60):
    rng = np.random.default_rng(seed)
    return [{"text": format_plain(" ".join(rng.choice(WORDS, int(rng.integers(1, max_words))))), "format": "plain"}
            for _ in range(n)]


def chat_records(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, r = (" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))) for _ in range(2))
        out.append({"text": format_chat(p, r), "format": "chat", "prompt": p, "response": r})
    return out


def run_inproc(*args):
    """pretokenize.main in this process (one worker): saves the transformers import of a subprocess."""
    import pretokenize

    assert pretokenize.main([str(a) for a in args] + ["--num-proc", "1"]) == 0


def run(*args, check=True):
    proc = subprocess.run([sys.executable, str(REPO / "pretokenize.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def read_rows(out: Path, split: str = "train"):
    meta = json.loads((out / "metadata.json").read_text())
    rows = []
    for rel in meta["splits"][split]["shards"]:
        rows += pq.read_table(out / rel).to_pylist()
    return meta, rows


def documents(rows):
    for r in rows:
        start = 0
        for n in r["doc_lens"]:
            yield r["input_ids"][start:start + n], r["labels"][start:start + n]
            start += n


def check_contract(meta, rows, max_len):
    assert len(rows) == meta["splits"]["train"]["rows"] if rows else True
    for r in rows:
        ids, labels, lens = r["input_ids"], r["labels"], r["doc_lens"]
        assert len(ids) == len(labels) == max_len
        used = sum(lens)
        assert all(x == PAD_ID for x in ids[used:]) and all(x == IGNORE for x in labels[used:])
        assert used == max_len or ids[used - 1] in (END_OF_TEXT_ID, EOT_ID)
    for ids, labels in documents(rows):
        assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and labels[0] == IGNORE
        # only --long split pieces before a document's last one (exactly max_len long) lack the end token
        assert ids[-1] in (END_OF_TEXT_ID, EOT_ID) or len(ids) == max_len


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    recs = plain_records(400, 0)
    recs[5]["text"] = recs[5]["text"][len("<|begin_of_text|>"):]  # no BOS in the text: added, not doubled
    write_jsonl(d / "train.jsonl", recs)
    write_jsonl(d / "validation.jsonl", plain_records(20, 1))
    return d


@pytest.mark.slow
def test_tokenizer_styles_give_identical_shards_and_texts_round_trip(plain_dir, tmp_path, tiny_model_dir,
                                                                      tiny_model_dir_bare, llama3_tokenizer_json):
    outs = {}
    for name, tok in [("json", llama3_tokenizer_json), ("meta", tiny_model_dir), ("bare", tiny_model_dir_bare)]:
        outs[name] = tmp_path / name
        # the subprocess uses the process pool; the others run in-process on one core
        (run if name == "json" else run_inproc)("--input", plain_dir, "--tokenizer", tok, "--output-dir", outs[name],
                                                "--max-len", 512, "--rows-per-shard", 10)
    metas = {k: read_rows(v) for k, v in outs.items()}
    for split in ("train", "validation"):
        tables = {k: [pq.read_table(v / rel) for rel in metas[k][0]["splits"][split]["shards"]] for k, v in outs.items()}
        assert all(len(t) == len(tables["json"]) for t in tables.values())
        for t in zip(*tables.values()):
            assert all(x.equals(t[0]) for x in t)
    meta, rows = metas["json"]
    assert {m["tokenizer"]["sha256"] for m, _ in metas.values()} == {meta["tokenizer"]["sha256"]}
    check_contract(meta, rows, 512)
    # decoding each packed document gives back its JSONL text (the record without BOS gets it added)
    tok = Tokenizer.from_file(llama3_tokenizer_json)
    texts = [json.loads(line)["text"] for line in open(plain_dir / "train.jsonl")]
    texts[5] = "<|begin_of_text|>" + texts[5]
    decoded = [tok.decode(ids, skip_special_tokens=False) for ids, _ in documents(rows)]
    assert sorted(decoded) == sorted(texts)
    for ids, labels in documents(rows):  # plain: every token but the first is trained on
        assert labels == [IGNORE] + ids[1:]
    s = meta["splits"]["train"]
    assert s["documents"] == 400 and s["tokens"] == sum(len(i) for i, _ in documents(rows))
    assert s["fill_rate"] == pytest.approx(s["tokens"] / (s["rows"] * 512), abs=1e-6) and s["fill_rate"] >= 0.98
    assert len(s["shards"]) == -(-s["rows"] // 10)
    assert meta["max_len"] == 512 and meta["pad_id"] == PAD_ID and meta["format"] == "plain"
    assert meta["long_documents"] == {"policy": "split", "policy_by_format": {"plain": "split", "chat": "drop"},
                                      "split": 0, "dropped": 0}
    read_shard_metadata(outs["json"], tokenizer_sha256=meta["tokenizer"]["sha256"], max_len=512)


@pytest.mark.slow
def test_chat_labels_and_long_documents(tmp_path, llama3_tokenizer_json):
    d = tmp_path / "chat"
    recs = chat_records(120, 2)
    long_prompt = " ".join(["word"] * 300)
    recs.append({"text": format_chat(long_prompt, "short"), "format": "chat"})
    write_jsonl(d / "train.jsonl", recs)
    write_jsonl(d / "validation.jsonl", chat_records(5, 3))
    tok = Tokenizer.from_file(llama3_tokenizer_json)
    run_inproc("--input", d, "--tokenizer", llama3_tokenizer_json, "--output-dir", tmp_path / "a", "--max-len", 256)
    meta, rows = read_rows(tmp_path / "a")
    check_contract(meta, rows, 256)
    assert meta["format"] == "chat" and meta["long_documents"]["dropped"] == 1 and meta["long_documents"]["policy"] == "drop"
    pairs = sorted((r["prompt"], r["response"]) for r in recs if "prompt" in r)
    got = []
    for ids, labels in documents(rows):
        k = labels.index(next(x for x in labels if x != IGNORE))  # first trained position
        prompt_text = tok.decode(ids[:k], skip_special_tokens=False)
        assert all(x == IGNORE for x in labels[:k]) and labels[k:] == ids[k:]
        p = prompt_text.split("user<|end_header_id|>\n\n")[1].split(EOT)[0]
        assert prompt_text == format_chat_prompt(p)
        response = tok.decode(ids[k:], skip_special_tokens=False)
        assert response.endswith(EOT)
        got.append((p, response[:-len(EOT)]))
    assert sorted(got) == pairs
    run_inproc("--input", d, "--tokenizer", llama3_tokenizer_json, "--output-dir", tmp_path / "b", "--max-len", 256,
        "--train-on-prompt", "--long", "split")
    meta, rows = read_rows(tmp_path / "b")
    check_contract(meta, rows, 256)
    assert meta["long_documents"]["split"] == 1 and meta["splits"]["train"]["documents"] == 121
    long_ids = tok.encode(recs[-1]["text"], add_special_tokens=False).ids  # 300+ tokens -> pieces of 256 + rest
    assert meta["splits"]["train"]["segments"] == 122
    pieces = [ids for ids, _ in documents(rows) if len(ids) == 256 or ids[-3:] == long_ids[-3:]]
    assert len(pieces) == 2 and pieces[0] == long_ids[:256] and pieces[1] == [BOS_ID] + long_ids[256:]
    for ids, labels in documents(rows):
        assert labels == [IGNORE] + ids[1:]


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
def test_bad_inputs_exit_with_one_line_and_leave_nothing(tmp_path, llama3_tokenizer_json):
    tok = llama3_tokenizer_json
    out = tmp_path / "out"
    _one_line_error(run("--input", tmp_path / "nope", "--tokenizer", tok, "--output-dir", out, check=False),
                    "--input", "nope")
    (tmp_path / "empty").mkdir()
    _one_line_error(run("--input", tmp_path / "empty", "--tokenizer", tok, "--output-dir", out, check=False),
                    "train.jsonl is missing")
    cases = {
        "malformed": ('{"text": "ok"}\n{"text": "bad"\n', "train.jsonl:2: malformed JSON"),
        "notext": ('{"text": "ok"}\n{"text": "ok"}\n{"input_ids": [1, 2]}\n', 'train.jsonl:3: record has no "text"'),
        "long": (json.dumps({"text": format_plain("word " * 100)}) + "\n", "train.jsonl:1: document has"),
    }
    for name, (content, msg) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "train.jsonl").write_text(content)
        extra = ["--long", "error", "--max-len", 64] if name == "long" else []
        _one_line_error(run("--input", d, "--tokenizer", tok, "--output-dir", out, *extra, check=False),
                        str(d / "train.jsonl").split("/")[-2], msg)
    # a tokenizer that is not Llama-3's
    from tokenizers import Tokenizer as T
    from tokenizers.models import WordLevel
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    T(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(other))
    _one_line_error(run("--input", tmp_path / "malformed", "--tokenizer", other, "--output-dir", out, check=False),
                    "not a Llama-3 tokenizer")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.slow
def test_rerun_replaces_shards_atomically(plain_dir, tmp_path, llama3_tokenizer_json):
    out = tmp_path / "out"
    args = ["--input", plain_dir, "--tokenizer", llama3_tokenizer_json, "--output-dir", out, "--max-len", 256,
            "--num-proc", 1]
    run_inproc(*args[:-2], "--rows-per-shard", 2)
    many = sorted(p.name for p in (out / "train").iterdir())
    assert len(many) > 3
    run_inproc(*args[:-2], "--rows-per-shard", 1000)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-00000.parquet"]
    meta = read_shard_metadata(out)
    # a failing rerun leaves the previous output untouched
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "fine"}\nnot json\n')
    _one_line_error(run("--input", bad, "--tokenizer", llama3_tokenizer_json, "--output-dir", out, check=False),
                    "train.jsonl:2")
    assert read_shard_metadata(out)["splits"] == meta["splits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]
    # and an unrelated non-empty directory is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    _one_line_error(run(*args[:4], "--output-dir", tmp_path / "mine", check=False), "refusing to replace")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_sample_data_through_data_processing(tmp_path, llama3_tokenizer_json):
    """The bundled sample through the real stage 1, then stage 2 at 8192: fill rate >= 98% and texts round trip."""
    sample = REPO / "examples" / "sample"
    if not (REPO / "data_processing.py").exists() or not sample.is_dir():
        pytest.skip("data_processing.py or examples/sample not present")
    inputs = sorted(sample.glob("*.jsonl")) or sorted(sample.glob("*.npy"))
    subprocess.run([sys.executable, str(REPO / "data_processing.py"), "--vocab", str(sample / "vocab.json"), "--input",
                    str(inputs[0]), "--output-dir", str(tmp_path / "jsonl")], check=True, capture_output=True, cwd=REPO)
    run("--input", tmp_path / "jsonl", "--tokenizer", llama3_tokenizer_json, "--output-dir", tmp_path / "tok")
    meta, rows = read_rows(tmp_path / "tok")
    check_contract(meta, rows, 8192)
    assert meta["max_len"] == 8192 and meta["splits"]["train"]["fill_rate"] >= 0.98
    tok = Tokenizer.from_file(llama3_tokenizer_json)
    texts = [json.loads(line)["text"] for line in open(tmp_path / "jsonl" / "train.jsonl")]
    assert sorted(tok.decode(ids, skip_special_tokens=False) for ids, _ in documents(rows)) == sorted(texts)
    assert meta["splits"]["train"]["documents"] == len(texts)


def fails(capsys, *args) -> str:
    """pretokenize's main as its __main__ runs it: exit status 2 and ONE line on stderr; returns the message."""
    import pretokenize
    from qlora.errors import run_main

    with pytest.raises(SystemExit) as e:
        run_main(lambda: pretokenize.main([str(a) for a in args] + ["--num-proc", "1"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0].split(": error: ", 1)[1]


@pytest.mark.parametrize("max_len", [10**12, 2**31, 131073, 7, -1])
def test_absurd_max_len_is_one_line(tmp_path, capsys, llama3_tokenizer_json, max_len):
    """10**12 asked numpy for 3.7 TB (a traceback), 3e9 was killed by the kernel, leaving its temporary."""
    write_jsonl(tmp_path / "in" / "train.jsonl", plain_records(3, 0))
    assert fails(capsys, "--input", tmp_path / "in", "--tokenizer", llama3_tokenizer_json, "--output-dir",
                 tmp_path / "out", "--max-len", max_len) == \
        f"--max-len {max_len}: must be at least 8 and at most 131072 (the longest Llama-3 context)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_lone_surrogate_in_jsonl_text_is_one_line(tmp_path, capsys, llama3_tokenizer_json):
    write_jsonl(tmp_path / "in" / "train.jsonl", plain_records(3, 0))
    with open(tmp_path / "in" / "train.jsonl", "a") as f:
        f.write('{"text": "<|begin_of_text|>caf\\udce9<|end_of_text|>"}\n')  # json.dumps would write it like this
    assert fails(capsys, "--input", tmp_path / "in", "--tokenizer", llama3_tokenizer_json, "--output-dir",
                 tmp_path / "out") == \
        f'{tmp_path}/in/train.jsonl:4: "text" is not valid Unicode (a lone surrogate at character 20)'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.slow
def test_outputs_are_readable_as_the_umask_allows(plain_dir, tmp_path, llama3_tokenizer_json):
    """metadata.json went through mkstemp: 0600 whatever the umask, unreadable for the group sharing the data."""
    old = os.umask(0o002)
    try:
        run_inproc("--input", plain_dir, "--tokenizer", llama3_tokenizer_json, "--output-dir", tmp_path / "out",
                   "--max-len", 512)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*")}
    assert modes["out/metadata.json"] == 0o664 and modes["out/train"] == 0o775
    assert set(modes.values()) == {0o664, 0o775}, modes
