"""data_processing.py end to end: chat/plain records, real Llama-3 ids, split, metadata, round trip, bad inputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_processing
from qlora.errors import UserError, run_main
from qlora.llama3 import (BOS_ID, END_HEADER_ID, END_OF_TEXT_ID, EOT_ID, START_HEADER_ID, bundled_tokenizer_json,
                          format_chat, format_plain, load_tokenizer)
from qlora.vocab import load_hand_vocab

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample"
VOCAB = str(SAMPLE / "vocab.json")


def run(*args) -> Path:
    args = [str(a) for a in args]
    assert data_processing.main(args) == 0
    return Path(args[args.index("--output-dir") + 1])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def records(out: Path):
    return read_jsonl(out / "train.jsonl"), read_jsonl(out / "validation.jsonl")


def without_source(recs):
    return [{k: v for k, v in r.items() if k != "source"} for r in recs]


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory):
    return run("--vocab", VOCAB, "--input", SAMPLE / "sequences.npy",
               "--output-dir", tmp_path_factory.mktemp("dp") / "data")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(bundled_tokenizer_json())


def test_sample_gives_chat_records_in_the_llama3_format(sample_out):
    train, val = records(sample_out)
    assert len(train) + len(val) == 3050
    vocab = load_hand_vocab(VOCAB)
    rows = np.load(SAMPLE / "sequences.npy").tolist()
    for r in train + val:
        assert r["format"] == "chat" and "system" not in r
        assert r["text"] == format_chat(r["prompt"], r["response"])
        file, row = r["source"].rsplit(":", 1)
        assert file == str(SAMPLE / "sequences.npy")
        prompt, response = vocab.split_sequence(rows[int(row)])
        assert r["prompt"] == vocab.ids_to_text(prompt) and r["response"] == vocab.ids_to_text(response)
        # round trip through the written text: back to exactly the hand-vocab ids of the input row
        assert vocab.text_to_ids(r["prompt"]) == (prompt, []) and vocab.text_to_ids(r["response"]) == (response, [])
    first = train[0]
    assert first["text"] == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + first["prompt"] +
                             "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + first["response"] +
                             "<|eot_id|>")


def test_chat_text_encodes_to_llama3_control_ids(sample_out, tokenizer):
    train, _ = records(sample_out)
    for r in train[:50]:
        ids = tokenizer.encode(r["text"], add_special_tokens=False)
        assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
        assert ids.count(START_HEADER_ID) == 2 and ids.count(END_HEADER_ID) == 2
        assert ids.count(EOT_ID) == 2 and ids[-1] == EOT_ID
        assert tokenizer.decode(ids) == r["text"]
        prompt_ids = tokenizer.encode(r["prompt"], add_special_tokens=False)
        user_start = ids.index(END_HEADER_ID) + 2  # "\n\n" is one token after the header
        assert ids[user_start:user_start + len(prompt_ids)] == prompt_ids


def test_plain_records_and_system_prompt(tmp_path, tokenizer):
    out = run("--vocab", VOCAB, "--input", SAMPLE / "sequences.jsonl", "--output-dir", tmp_path / "plain",
              "--format", "plain")
    vocab = load_hand_vocab(VOCAB)
    train, val = records(out)
    for r in train + val:
        assert set(r) == {"text", "format", "source"} and r["format"] == "plain"
        body = r["text"][len("<|begin_of_text|>"):-len("<|end_of_text|>")]
        assert r["text"] == format_plain(body) and " <sep> " in body  # an explicit plain keeps the separator
        ids = tokenizer.encode(r["text"], add_special_tokens=False)
        assert ids[0] == BOS_ID and ids[-1] == END_OF_TEXT_ID and ids.count(BOS_ID) == 1
        assert EOT_ID not in ids and START_HEADER_ID not in ids
        assert vocab.text_to_ids(body)[1] == []

    out = run("--vocab", VOCAB, "--input", SAMPLE / "sequences.jsonl", "--output-dir", tmp_path / "sys",
              "--system-prompt", "Transpose the notes.")
    r = records(out)[0][0]
    assert r["system"] == "Transpose the notes."
    assert r["text"] == format_chat(r["prompt"], r["response"], "Transpose the notes.")
    assert r["text"].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                "Transpose the notes.<|eot_id|><|start_header_id|>user")
    ids = tokenizer.encode(r["text"], add_special_tokens=False)
    assert ids.count(START_HEADER_ID) == 3 and ids.count(EOT_ID) == 3


def test_auto_format_is_plain_without_a_separator(tmp_path):
    (tmp_path / "v.txt").write_text("[PAD]\na\nb\n")
    (tmp_path / "s.txt").write_text("1 2 0 0\n2 2 1\n")
    out = run("--vocab", tmp_path / "v.txt", "--input", tmp_path / "s.txt", "--output-dir", tmp_path / "o",
              "--val-fraction", "0")
    assert [r["text"] for r in records(out)[0]] == [format_plain("a b"), format_plain("b b a")]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format"] == "plain" and meta["format_decided_by"] == "the vocabulary has no separator token"


def test_npy_jsonl_parquet_txt_and_globs_give_the_same_records(sample_out, tmp_path):
    seqs = [json.loads(line)["input_ids"] for line in (SAMPLE / "sequences.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"ids": pa.array(seqs[:1500], pa.list_(pa.int16()))}), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.txt").write_text("".join(" ".join(map(str, s)) + "\n" for s in seqs[1500:]))
    expected = records(sample_out)
    out = run("--vocab", VOCAB, "--input", SAMPLE / "sequences.jsonl", "--output-dir", tmp_path / "jsonl")
    assert [without_source(x) for x in records(out)] == [without_source(x) for x in expected]
    out = run("--vocab", VOCAB, "--input", tmp_path / "part-*", "--output-dir", tmp_path / "glob", "--ids-field", "ids")
    assert [without_source(x) for x in records(out)] == [without_source(x) for x in expected]
    meta = json.loads((out / "metadata.json").read_text())
    assert [i["rows"] for i in meta["inputs"]] == [1500, len(seqs) - 1500]


def test_metadata(sample_out):
    meta = json.loads((sample_out / "metadata.json").read_text())
    train, val = records(sample_out)
    assert meta["stage"] == "data_processing" and meta["format"] == "chat"
    assert meta["counts"] == {"rows_read": 3050, "train": len(train), "validation": len(val),
                              "skipped_empty": 0, "skipped_unknown_id": 0}
    assert meta["vocab"]["sha256"] == load_hand_vocab(VOCAB).sha256 and meta["vocab"]["size"] == 18
    assert meta["vocab"]["specials"]["sep"] == {"token": "<sep>", "id": 3}
    assert meta["options"]["val_fraction"] == 0.02 and meta["options"]["seed"] == 0
    assert meta["inputs"] == [{"path": str(SAMPLE / "sequences.npy"), "rows": 3050}]
    assert meta["hand_tokens"]["train"] == sum(len(r["prompt"].split()) + len(r["response"].split()) for r in train)


def test_validation_split_is_deterministic_and_content_based(sample_out, tmp_path):
    train, val = records(sample_out)
    assert 30 <= len(val) <= 90  # 2% of 3050, by hash
    again = run("--vocab", VOCAB, "--input", SAMPLE / "sequences.npy", "--output-dir", tmp_path / "again")
    assert (again / "validation.jsonl").read_bytes() == (sample_out / "validation.jsonl").read_bytes()
    assert (again / "train.jsonl").read_bytes() == (sample_out / "train.jsonl").read_bytes()
    other = run("--vocab", VOCAB, "--input", SAMPLE / "sequences.npy", "--output-dir", tmp_path / "seed1",
                "--seed", "1")
    assert {r["text"] for r in records(other)[1]} != {r["text"] for r in val}
    # Same content, different order and file: the same sequences go to validation.
    lines = (SAMPLE / "sequences.jsonl").read_text().splitlines()[::-1]
    (tmp_path / "rev.jsonl").write_text("\n".join(lines) + "\n")
    rev = run("--vocab", VOCAB, "--input", tmp_path / "rev.jsonl", "--output-dir", tmp_path / "rev")
    assert sorted(r["text"] for r in records(rev)[1]) == sorted(r["text"] for r in val)
    none = run("--vocab", VOCAB, "--input", SAMPLE / "sequences.npy", "--output-dir", tmp_path / "none",
               "--val-fraction", "0")
    assert (none / "validation.jsonl").read_text() == "" and len(records(none)[0]) == 3050


def test_on_unknown_skip_and_empty_rows_are_counted(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"input_ids": [1, 4, 3, 5, 2]}\n{"input_ids": [1, 4, 99, 3, 5]}\n'
                                      '{"input_ids": [0, 0, 1, 2]}\n{"input_ids": [1, 6, 3, 7, 2]}\n')
    out = run("--vocab", VOCAB, "--input", tmp_path / "s.jsonl", "--output-dir", tmp_path / "o",
              "--on-unknown", "skip", "--val-fraction", "0")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["counts"]["skipped_unknown_id"] == 1 and meta["counts"]["skipped_empty"] == 1
    assert [(r["prompt"], r["response"], r["source"].rsplit(":", 1)[1]) for r in records(out)[0]] == \
        [("C4", "D4", "0"), ("E4", "F4", "3")]


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a data_processing output"):
        run("--vocab", VOCAB, "--input", SAMPLE / "sequences.npy", "--output-dir", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "data_processing.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--vocab", "--input", "--output-dir", "--format", "--pad-token", "--bos-token", "--eos-token",
                 "--sep-token", "--unk-token", "--joiner", "--system-prompt", "--val-fraction", "--seed",
                 "--ids-field", "--on-unknown"):
        assert flag in out.stdout


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs, as a user meets them: a subprocess, exit code 2, ONE stderr line naming file and row, no output left.

GOOD_ROWS = '{"input_ids": [1, 4, 3, 5, 2]}\n' * 5


def bad_cases(d: Path):
    vocab_dup = d / "dup.json"
    vocab_dup.write_text('{\n "<pad>": 0,\n "a": 1,\n "a": 2\n}\n')
    (d / "good.jsonl").write_text(GOOD_ROWS)
    (d / "empty.jsonl").write_text("")
    (d / "malformed.jsonl").write_text(GOOD_ROWS + '{"input_ids": [1, 4\n')
    (d / "unknown.jsonl").write_text(GOOD_ROWS + '{"input_ids": [1, 4, 3, 99, 2]}\n')
    (d / "nonint.txt").write_text("1 4 3 5 2\n" * 5 + "1 4 3 five 2\n")
    (d / "twosep.jsonl").write_text(GOOD_ROWS + '{"input_ids": [1, 4, 3, 5, 3, 6, 2]}\n')
    (d / "nosep.jsonl").write_text(GOOD_ROWS + '{"input_ids": [1, 4, 5, 2]}\n')
    good = ["--vocab", VOCAB, "--input", d / "good.jsonl"]
    return {
        "missing file": (["--vocab", VOCAB, "--input", d / "missing.jsonl"], ["missing.jsonl: no such file"]),
        "missing vocab": (["--vocab", d / "nov.json", "--input", d / "good.jsonl"], ["nov.json: no such file"]),
        "empty file": (["--vocab", VOCAB, "--input", d / "empty.jsonl"], ["empty.jsonl: empty file"]),
        "malformed line": (["--vocab", VOCAB, "--input", d / "malformed.jsonl"],
                           ["malformed.jsonl line 6: malformed JSON"]),
        "unknown id": (["--vocab", VOCAB, "--input", d / "unknown.jsonl"],
                       ["unknown.jsonl line 6, position 3: id 99 is not in the vocabulary"]),
        "duplicate vocab entry": (["--vocab", vocab_dup, "--input", d / "good.jsonl"],
                                  ["dup.json:4: duplicate token 'a'"]),
        "wrong field name": (good + ["--ids-field", "tokens"], ["good.jsonl line 1: no field 'tokens'"]),
        "non-integer value": (["--vocab", VOCAB, "--input", d / "nonint.txt"],
                              ["nonint.txt line 6, position 3: 'five' is not an integer id"]),
        "bad flag token": (good + ["--sep-token", "SEP"], ["--sep-token 'SEP': not a token of the vocabulary"]),
        "second separator": (["--vocab", VOCAB, "--input", d / "twosep.jsonl"],
                             ["twosep.jsonl line 6, position 4: a second separator"]),
        "chat row without separator": (["--vocab", VOCAB, "--input", d / "nosep.jsonl"],
                                       ["nosep.jsonl line 6: no separator", "--format plain"]),
        "bad val fraction": (good + ["--val-fraction", "1.5"], ["--val-fraction 1.5"]),
        "joiner in token": (good + ["--joiner", "4"], ["vocab.json:6: token 'C4' (id 4) contains the joiner '4'"]),
    }


@pytest.mark.parametrize("case", ["missing file", "missing vocab", "empty file", "malformed line", "unknown id",
                                  "duplicate vocab entry", "wrong field name", "non-integer value", "bad flag token",
                                  "second separator", "chat row without separator", "bad val fraction",
                                  "joiner in token"])
def test_bad_input_exits_with_one_line_and_no_output(tmp_path, case):
    args, expected = bad_cases(tmp_path)[case]
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "data_processing.py", *map(str, args), "--output-dir", str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("data_processing.py: error: ")
    for piece in expected:
        assert piece in lines[0]
    assert not out_dir.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp sibling left behind


def test_mixed_separators_under_auto_name_the_one_flag_that_works(tmp_path):
    """The first sequence has no separator, a later one has: --format chat would stop at the first, so the error
    must name --format plain alone, and that must then convert everything."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"input_ids": [1, 4, 5, 2]}\n' + GOOD_ROWS)
    base = ["--vocab", VOCAB, "--input", mixed]
    with pytest.raises(UserError) as e:
        run(*base, "--output-dir", tmp_path / "auto")
    msg = str(e.value)
    assert "mixed.jsonl line 2: has a separator, but the format is plain" in msg
    assert "mixed.jsonl line 1), which has none)" in msg
    assert "pass --format plain" in msg and "--format chat needs a separator in every sequence" in msg
    assert "pass --format chat" not in msg
    with pytest.raises(UserError, match=r"mixed\.jsonl line 1: no separator, but the format is chat"):
        run(*base, "--output-dir", tmp_path / "chat", "--format", "chat")
    train, val = records(run(*base, "--output-dir", tmp_path / "plain", "--format", "plain", "--val-fraction", "0"))
    assert [r["format"] for r in train] == ["plain"] * 6 and not val


@pytest.mark.parametrize("seed", [str(2**63), str(-2**63 - 1)])
def test_seed_outside_64_bits_is_a_one_line_error(tmp_path, seed):
    with pytest.raises(UserError, match=rf"^--seed {seed}: must be a 64-bit integer"):
        run("--vocab", VOCAB, "--input", SAMPLE / "sequences.npy", "--output-dir", tmp_path / "out", "--seed", seed)
    assert not (tmp_path / "out").exists()


def test_seed_at_the_64_bit_limits_works(tmp_path):
    (tmp_path / "good.jsonl").write_text(GOOD_ROWS)
    for seed in (2**63 - 1, -2**63):
        out = run("--vocab", VOCAB, "--input", tmp_path / "good.jsonl", "--output-dir", tmp_path / str(seed),
                  "--seed", seed, "--val-fraction", "0")
        assert json.loads((out / "metadata.json").read_text())["options"]["seed"] == seed


def test_failed_run_keeps_the_previous_output_intact(tmp_path):
    out = run("--vocab", VOCAB, "--input", SAMPLE / "sequences.jsonl", "--output-dir", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.copy(SAMPLE / "sequences.jsonl", tmp_path / "late_error.jsonl")
    good_rows = len((SAMPLE / "sequences.jsonl").read_text().splitlines())
    assert good_rows > 1000  # the bad line is met long after the writer has started
    with open(tmp_path / "late_error.jsonl", "a") as f:
        f.write("not json\n")
    with pytest.raises(UserError, match=rf"late_error\.jsonl line {good_rows + 1}: malformed JSON"):
        run("--vocab", VOCAB, "--input", tmp_path / "late_error.jsonl", "--output-dir", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late_error.jsonl", "out"]


def test_sample_generator_is_deterministic_and_matches_the_committed_files(tmp_path):
    subprocess.run([sys.executable, "examples/make_sample_data.py", "--out", str(tmp_path / "s")], cwd=ROOT,
                   check=True, capture_output=True)
    for name in ("vocab.json", "sequences.npy", "sequences.jsonl"):
        assert (tmp_path / "s" / name).read_bytes() == (SAMPLE / name).read_bytes(), name
    assert sum((SAMPLE / n).stat().st_size for n in ("vocab.json", "sequences.npy", "sequences.jsonl")) < 2_000_000
    subprocess.run([sys.executable, "examples/make_sample_data.py", "--out", str(tmp_path / "r"), "--task", "reverse",
                    "--n", "50", "--min-len", "1", "--max-len", "3", "--notes", "letters"],
                   cwd=ROOT, check=True, capture_output=True)
    out = run("--vocab", tmp_path / "r" / "vocab.json", "--input", tmp_path / "r" / "sequences.jsonl",
              "--output-dir", tmp_path / "rout", "--val-fraction", "0")
    recs = records(out)[0]
    assert len(recs) == 50
    assert all(r["response"].split() == r["prompt"].split()[::-1] and 1 <= len(r["prompt"].split()) <= 3
               for r in recs)


# ------------------------------------------------------------------------------------------------------------------
# Silently wrong before (exit 0 with wrong text), and the last tracebacks: now right, or one line with exit status 2.

def fails(capsys, *args) -> str:
    """data_processing's main as its __main__ runs it: exit status 2 and ONE line on stderr; returns the message."""
    with pytest.raises(SystemExit) as e:
        run_main(lambda: data_processing.main([str(a) for a in args]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0].split(": error: ", 1)[1]


PAD_VOCAB = ["[pad]", "<s>", "</s>", "<sep>", "a", "b"]  # "[pad]" is no common spelling of pad


def test_padding_without_a_known_pad_token_is_refused(tmp_path, capsys):
    (tmp_path / "v.json").write_text(json.dumps(PAD_VOCAB))
    np.save(tmp_path / "rows.npy", np.array([[1, 4, 3, 5, 2, 0, 0], [1, 4, 4, 3, 5, 5, 2]]))
    base = ["--vocab", tmp_path / "v.json", "--val-fraction", "0"]
    msg = fails(capsys, *base, "--input", tmp_path / "rows.npy", "--output-dir", tmp_path / "o1")
    assert msg == (f"{tmp_path}/rows.npy: a 2-D array, so its rows are padded to one length, but no token of "
                   f"{tmp_path}/v.json is known as pad; name it with --pad-token T (or pass --pad-token '' if no row "
                   f"is padded)")
    # the same padded rows as JSON lists: the token after the end of the sequence gives it away
    (tmp_path / "rows.jsonl").write_text('{"input_ids": [1, 4, 3, 5, 2, 0, 0]}\n')
    msg = fails(capsys, *base, "--input", tmp_path / "rows.jsonl", "--output-dir", tmp_path / "o2")
    assert msg == (f"{tmp_path}/rows.jsonl line 1, position 5: '[pad]' after the end-of-sequence token '</s>' (at "
                   f"position 4); if it pads the row, name it with --pad-token [pad]")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    out = run(*base, "--input", tmp_path / "rows.npy", "--output-dir", tmp_path / "o3", "--pad-token", "[pad]")
    assert [(r["prompt"], r["response"]) for r in records(out)[0]] == [("a", "b"), ("a a", "b b")]
    np.save(tmp_path / "full.npy", np.array([[1, 4, 3, 5, 2], [1, 5, 3, 4, 2]]))
    out = run(*base, "--input", tmp_path / "full.npy", "--output-dir", tmp_path / "o4", "--pad-token", "")
    assert [(r["prompt"], r["response"]) for r in records(out)[0]] == [("a", "b"), ("b", "a")]


def test_json_list_vocabulary_in_a_txt_file_gives_the_same_records(sample_out, tmp_path):
    tokens = [t for t, _ in sorted(json.loads(Path(VOCAB).read_text()).items(), key=lambda kv: kv[1])]
    for name in ("vocab.txt", "vocab.vocab"):
        with open(tmp_path / name, "w") as f:
            json.dump(tokens, f, indent=0)
        out = run("--vocab", tmp_path / name, "--input", SAMPLE / "sequences.npy", "--output-dir", tmp_path / name[6:])
        assert records(out) == records(sample_out)
        assert json.loads((out / "metadata.json").read_text())["vocab"]["sha256"] == load_hand_vocab(VOCAB).sha256


def test_control_strings_and_overlapping_joiners_are_refused(tmp_path, capsys):
    good = ["--vocab", VOCAB, "--input", SAMPLE / "sequences.jsonl", "--output-dir", tmp_path / "out"]
    assert fails(capsys, *good, "--system-prompt", "Be brief.<|eot_id|>") == \
        "--system-prompt: contains the Llama-3 control token <|eot_id|>, which would change the document's structure"
    assert fails(capsys, *good, "--joiner", "<|begin_of_text|>").startswith(
        "--joiner '<|begin_of_text|>': contains the Llama-3 control token <|begin_of_text|>")
    (tmp_path / "split.json").write_text(json.dumps(["<pad>", "</s>", "<|eot", "id|>", "x"]))
    (tmp_path / "split.jsonl").write_text('{"input_ids": [4, 4, 1]}\n{"input_ids": [4, 2, 3, 1]}\n')
    split = ["--vocab", tmp_path / "split.json", "--input", tmp_path / "split.jsonl", "--output-dir", tmp_path / "out"]
    assert fails(capsys, *split, "--joiner", "_") == (f"{tmp_path}/split.jsonl line 2: its tokens joined by --joiner "
                                                      f"'_' form the Llama-3 control token <|eot_id|>; choose another "
                                                      f"--joiner")
    assert run(*split[:-1], tmp_path / "spaced")  # control: with spaces they stay apart
    (tmp_path / "edge.json").write_text(json.dumps(["<pad>", "</s>", "xa", "y"]))
    (tmp_path / "edge.jsonl").write_text('{"input_ids": [2, 3, 1]}\n')
    assert fails(capsys, "--vocab", tmp_path / "edge.json", "--input", tmp_path / "edge.jsonl", "--joiner", "aa",
                 "--output-dir", tmp_path / "out").startswith(f"{tmp_path}/edge.json:1: token 'xa' (id 2) ends with "
                                                              f"'a', so in 'xaaa' the joiner 'aa' is found 1 character "
                                                              f"early")
    assert not (tmp_path / "out").exists()


def test_a_file_named_twice_is_read_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(SAMPLE / "sequences.jsonl", "seq.jsonl")
    out = run("--vocab", VOCAB, "--input", "*.jsonl", "./seq.jsonl", "--output-dir", "out")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["counts"]["rows_read"] == 3050 and meta["inputs"] == [{"path": "seq.jsonl", "rows": 3050}]


def last_traceback_cases(d: Path) -> dict:
    """Each of these ended in a Python traceback before."""
    (d / "huge.json").write_text('{"<pad>": 0, "</s>": 1, "a": 2, "b": 9223372036854775808}')
    (d / "huge.jsonl").write_text('{"input_ids": [2, 9223372036854775808, 1]}\n')
    (d / "surrogate.json").write_text('{"<pad>": 0, "</s>": 1, "a": 2, "b\\udc80": 3}')
    (d / "ab.jsonl").write_text('{"input_ids": [2, 3, 1]}\n')
    np.savez(d / "ok.npz", input_ids=np.tile(np.array(json.loads((SAMPLE / "sequences.jsonl").read_text()
                                                                 .splitlines()[0])["input_ids"]), (20, 1)))
    raw = bytearray((d / "ok.npz").read_bytes())
    raw[200:240] = b"x" * 40
    (d / "damaged.npz").write_bytes(raw)
    (d / "afile").write_text("x")
    (d / "arabic.txt").write_text("1 4 3 \u0665 2\n")
    seqs = ["--input", SAMPLE / "sequences.jsonl"]
    return {
        "id >= 2**63": (["--vocab", d / "huge.json", "--input", d / "huge.jsonl"],
                        f"{d}/huge.json:1: id of token 'b': 9223372036854775808 is too large; ids must be < 2**63"),
        "surrogate in a token": (["--vocab", d / "surrogate.json", "--input", d / "ab.jsonl"],
                                 f"{d}/surrogate.json:1: token 'b\\udc80' (id 3) is not valid Unicode (a lone "
                                 f"surrogate at character 1)"),
        "surrogate in --system-prompt": (["--vocab", VOCAB, *seqs, "--system-prompt", "caf\udce9"],
                                         "--system-prompt: not valid Unicode at character 3 (a lone surrogate "
                                         "\\udce9, e.g. from bytes that are not UTF-8)"),
        "surrogate in --joiner": (["--vocab", VOCAB, *seqs, "--joiner", "\udce9"],
                                  "--joiner '\\udce9': not valid Unicode at character 0 (a lone surrogate "
                                  "\\udce9, e.g. from bytes that are not UTF-8)"),
        "damaged npz member": (["--vocab", VOCAB, "--input", d / "damaged.npz"],
                               f"{d}/damaged.npz: array 'input_ids' is damaged (Bad CRC-32 for file 'input_ids.npy')"),
        "output under a file": (["--vocab", VOCAB, *seqs, "--output-dir", d / "afile" / "out"],
                                f"--output-dir {d}/afile/out: cannot be created, {d}/afile is a file"),
        "output is a file": (["--vocab", VOCAB, *seqs, "--output-dir", d / "afile"],
                             f"--output-dir {d}/afile: exists and is not a directory"),
        "non-ASCII digit": (["--vocab", VOCAB, "--input", d / "arabic.txt"],
                            f"{d}/arabic.txt line 1, position 3: '٥' is not an integer id (ids are written in the "
                            f"digits 0-9)"),
    }


@pytest.mark.parametrize("case", ["id >= 2**63", "surrogate in a token", "surrogate in --system-prompt",
                                  "surrogate in --joiner", "damaged npz member", "output under a file",
                                  "output is a file", "non-ASCII digit"])
def test_last_tracebacks_are_one_line(tmp_path, capsys, case):
    args, expected = last_traceback_cases(tmp_path)[case]
    if "--output-dir" not in args:
        args += ["--output-dir", tmp_path / "out"]
    assert fails(capsys, *args) == expected
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
