"""Sequence readers: every input format gives the same rows; streaming; one-line errors naming file and row."""
from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qlora.errors import UserError
from qlora.sequences import expand_inputs, iter_file, iter_sequences

SEQS = [[1, 4, 5, 3, 6, 2], [1, 7, 3, 8, 9, 10, 2], [4, 5]]


def padded(seqs=SEQS, pad=0):
    arr = np.full((len(seqs), max(map(len, seqs)) + 2), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        arr[i, :len(s)] = s
    return arr


def object_array(seqs=SEQS):
    arr = np.empty(len(seqs), dtype=object)
    for i, s in enumerate(seqs):
        arr[i] = np.array(s, dtype=np.int32)
    return arr


def write_all_formats(d, seqs=SEQS):
    """The same sequences in every supported way; array formats padded with 0 (callers strip it)."""
    files = {}
    np.save(d / "padded.npy", padded(seqs))
    np.save(d / "object.npy", object_array(seqs), allow_pickle=True)
    np.savez(d / "single.npz", padded(seqs))
    np.savez(d / "named.npz", input_ids=object_array(seqs), other=np.arange(3))
    torch.save(torch.tensor(padded(seqs)), d / "tensor.pt")
    torch.save([list(s) for s in seqs], d / "lists.pt")
    torch.save({"input_ids": [torch.tensor(s) for s in seqs]}, d / "dict.pt")
    (d / "seqs.txt").write_text("".join(" ".join(map(str, s)) + "\n" for s in seqs))
    (d / "seqs.jsonl").write_text("".join(json.dumps({"input_ids": s, "id": i}) + "\n" for i, s in enumerate(seqs)))
    (d / "bare.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seqs))
    pq.write_table(pa.table({"input_ids": pa.array(seqs, pa.list_(pa.int32()))}), d / "i32.parquet")
    pq.write_table(pa.table({"input_ids": pa.array(seqs, pa.large_list(pa.int64()))}), d / "i64.parquet",
                   row_group_size=2)
    for p in sorted(d.iterdir()):
        files[p.name] = str(p)
    return files


def strip_pad(ids):
    return [i for i in ids if i != 0]


def test_every_format_reads_the_same_rows(tmp_path):
    files = write_all_formats(tmp_path)
    assert len(files) == 12
    for name, f in files.items():
        rows = list(iter_file(f))
        assert [r.row for r in rows] == [0, 1, 2], name
        assert all(r.file == f for r in rows), name
        assert [strip_pad(r.ids) for r in rows] == SEQS, name
        assert all(type(i) is int for r in rows for i in r.ids), name


def test_ids_field_selects_field_column_array_or_key(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"ids": [1, 2]}) + "\n")
    pq.write_table(pa.table({"ids": [[3, 4]], "input_ids": [[9]]}), tmp_path / "a.parquet")
    np.savez(tmp_path / "a.npz", ids=np.array([[5, 6]]), input_ids=np.array([[9]]))
    torch.save({"ids": torch.tensor([[7, 8]])}, tmp_path / "a.pt")
    got = [r.ids for r in iter_sequences([str(tmp_path / n) for n in ("a.jsonl", "a.parquet", "a.npz", "a.pt")],
                                         ids_field="ids")]
    assert got == [[1, 2], [3, 4], [5, 6], [7, 8]]


def test_globs_are_sorted_and_deduplicated(tmp_path):
    for n in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / n).write_text("1 2\n" if n.endswith("txt") else "[1]\n")
    files = expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "a.txt"), str(tmp_path / "*")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.txt", "b.txt", "c.jsonl"]


def test_one_file_named_twice_is_read_once(tmp_path, monkeypatch):
    """A glob and ./file, a path with '..', a symlink: one file, read once, under the name it was first given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("1 2\n")
    (tmp_path / "b.txt").write_text("3\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    files = expand_inputs(["*.txt", "./a.txt", "sub/../a.txt", str(tmp_path / "a.txt"), "link.txt"])
    assert files == ["a.txt", "b.txt"]
    assert [r.ids for r in iter_sequences(files)] == [[1, 2], [3]]
    (tmp_path / "c.txt").write_text("1 2\n")  # control: same content, another file
    assert expand_inputs(["a.txt", "c.txt"]) == ["a.txt", "c.txt"]


def test_rows_of_rectangular_arrays_are_marked_padded(tmp_path):
    files = write_all_formats(tmp_path)
    np.save(tmp_path / "one.npy", np.array([1, 4, 5]))
    torch.save(torch.tensor([1, 4, 5]), tmp_path / "one.pt")
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2], [3, 0]], pa.list_(pa.int64(), 2))}),
                   tmp_path / "fixed.parquet")
    padded_files = {"padded.npy", "single.npz", "tensor.pt", "fixed.parquet"}
    for name in [*files, "one.npy", "one.pt", "fixed.parquet"]:
        rows = list(iter_file(str(tmp_path / name)))
        assert {r.padded for r in rows} == {name in padded_files}, name


def test_damaged_npz_member_is_one_line(tmp_path):
    np.savez(tmp_path / "ok.npz", input_ids=np.arange(200).reshape(20, 10))
    raw = bytearray((tmp_path / "ok.npz").read_bytes())
    raw[200:240] = b"x" * 40  # inside the member's data: the archive opens, reading the array fails its CRC
    (tmp_path / "bad.npz").write_bytes(raw)
    assert len(list(iter_file(str(tmp_path / "ok.npz")))) == 20
    with pytest.raises(UserError, match=r"bad\.npz: array 'input_ids' is damaged \(Bad CRC-32") as e:
        list(iter_file(str(tmp_path / "bad.npz")))
    assert "\n" not in str(e.value)


def test_blank_lines_keep_line_numbers(tmp_path):
    (tmp_path / "s.txt").write_text("1 2\n\n3\n")
    assert [(r.row, r.ids) for r in iter_file(str(tmp_path / "s.txt"))] == [(0, [1, 2]), (1, []), (2, [3])]


def test_line_formats_stream(tmp_path):
    """The reader yields the first rows before it has read the rest (a broken last line is met only at the end)."""
    (tmp_path / "s.jsonl").write_text('{"input_ids": [1]}\n' * 3 + "not json\n")
    rows = iter_file(str(tmp_path / "s.jsonl"))
    assert [next(rows).ids for _ in range(3)] == [[1]] * 3
    with pytest.raises(UserError, match=r"s\.jsonl line 4: malformed JSON"):
        next(rows)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_memory_stays_bounded(tmp_path, fmt):
    """Reading 600k ids (>= 4.8 MB as Python lists) must peak far below the size of the data."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, size=(1200, 500))
    path = tmp_path / f"big.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(" ".join(map(str, r)) for r in data.tolist()) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in data.tolist()))
    else:
        pq.write_table(pa.table({"input_ids": pa.array(list(data), pa.list_(pa.int64()))}), path,
                       row_group_size=256)
    tracemalloc.start()
    try:
        n = total = 0
        for r in iter_file(str(path)):
            n += 1
            total += sum(r.ids)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 1200 and total == int(data.sum())
    assert peak < 1_000_000, f"peak {peak} bytes"


def test_parquet_reader_memory_does_not_grow_with_the_file(tmp_path):
    """Arrow's own buffers (invisible to tracemalloc above), measured in a fresh process by its memory pool's peak:
    reading 9.6M ids (77 MB as int64, 9.7 MB compressed) must stay far below the file, about one row group."""
    rng = np.random.default_rng(0)
    path = tmp_path / "big.parquet"
    data = rng.integers(0, 200, size=(19200, 500))
    pq.write_table(pa.table({"input_ids": pa.array(list(data), pa.list_(pa.int64()))}), path, row_group_size=256)
    del data
    code = ("import sys, pyarrow as pa\n"
            "from qlora.sequences import iter_file\n"
            "n = sum(1 for _ in iter_file(sys.argv[1]))\n"
            "print(n, pa.default_memory_pool().max_memory())\n")
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[1])
    n, peak = map(int, p.stdout.split())
    assert n == 19200
    # measured 2.9 MB with pre_buffer off, 12.5 MB with pyarrow's default (which grows with the file)
    assert peak < 6_000_000, f"Arrow memory pool peak {peak} bytes"


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "", r"empty\.txt: empty file"),
    ("blank.jsonl", "\n\n", r"blank\.jsonl: empty file"),
    ("bad.jsonl", '{"input_ids": [1]}\n{"input_ids": [1,\n', r"bad\.jsonl line 2: malformed JSON"),
    ("field.jsonl", '{"ids": [1]}\n', r"field\.jsonl line 1: no field 'input_ids' \(fields: ids\); .*--ids-field"),
    ("float.jsonl", '{"input_ids": [1, 2.5]}\n', r"float\.jsonl line 1, position 1: 2\.5 is not an integer id"),
    ("str.jsonl", '[1]\n{"input_ids": [1, "2"]}\n', r"str\.jsonl line 2, position 1: '2' is not an integer id"),
    ("notlist.jsonl", '{"input_ids": 5}\n', r"notlist\.jsonl line 1: field 'input_ids' is int"),
    ("word.txt", "1 2\n3 x 4\n", r"word\.txt line 2, position 1: 'x' is not an integer id"),
    ("float.txt", "1 2.0\n", r"float\.txt line 1, position 1: '2\.0' is not an integer id"),
    # int() takes all of these; ids are ASCII digits
    ("arabic.txt", "1 2\n3 \u0661\u0662\n", r"arabic\.txt line 2, position 1: '١٢' is not an integer id"),
    ("underscore.txt", "1 1_000\n", r"underscore\.txt line 1, position 1: '1_000' is not an integer id"),
    ("plus.txt", "+1 2\n", r"plus\.txt line 1, position 0: '\+1' is not an integer id"),
    ("superscript.txt", "1 \u00b2\n", r"superscript\.txt line 1, position 1: '²' is not an integer id"),
])
def test_bad_line_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message) as e:
        list(iter_file(str(tmp_path / name)))
    assert "\n" not in str(e.value)


def test_bad_array_and_parquet_files(tmp_path):
    def err(name):
        with pytest.raises(UserError) as e:
            list(iter_file(str(tmp_path / name)))
        assert "\n" not in str(e.value)
        return str(e.value)

    np.save(tmp_path / "float.npy", np.array([[1.0, 2.0], [3.0, 3.5]]))
    assert err("float.npy").endswith("float.npy row 1, position 1: 3.5 is not an integer id")
    np.save(tmp_path / "ok_float.npy", np.array([[1.0, 2.0]]))
    assert [r.ids for r in iter_file(str(tmp_path / "ok_float.npy"))] == [[1, 2]]
    np.save(tmp_path / "empty.npy", np.zeros((0, 5), dtype=np.int32))
    assert err("empty.npy").endswith("empty.npy: empty file (no sequences)")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), dtype=np.int32))
    assert "expected 2-D" in err("cube.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 2)), b=np.zeros((1, 2)))
    assert "no array 'input_ids' (arrays: a, b)" in err("two.npz")
    torch.save(torch.zeros(2, 3), tmp_path / "float.pt")
    assert "dtype torch.float32, expected integer ids" in err("float.pt")
    torch.save({"x": torch.zeros(2, 3, dtype=torch.long)}, tmp_path / "dict.pt")
    assert "no key 'input_ids' (keys: x)" in err("dict.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    assert "junk.pt: not a readable .pt file" in err("junk.pt")
    pq.write_table(pa.table({"ids": [[1]]}), tmp_path / "col.parquet")
    assert "col.parquet: no column 'input_ids' (columns: ids); choose it with --ids-field" in err("col.parquet")
    pq.write_table(pa.table({"input_ids": ["a"]}), tmp_path / "str.parquet")
    assert "has type string, expected list<int>" in err("str.parquet")
    pq.write_table(pa.table({"input_ids": pa.array([[1.0], [2.0, 2.5]], pa.list_(pa.float64()))}),
                   tmp_path / "float.parquet")
    assert err("float.parquet").endswith("float.parquet row 1, position 1: 2.5 is not an integer id")
    pq.write_table(pa.table({"input_ids": pa.array([[1], None], pa.list_(pa.int64()))}), tmp_path / "null.parquet")
    assert err("null.parquet").endswith("null.parquet row 1: null instead of a list of ids")
    pq.write_table(pa.table({"input_ids": pa.array([], pa.list_(pa.int64()))}), tmp_path / "empty.parquet")
    assert err("empty.parquet").endswith("empty.parquet: empty file (no sequences)")


def test_bad_input_arguments(tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n")
    for patterns, message in [([str(tmp_path / "missing.txt")], "missing.txt: no such file"),
                              ([str(tmp_path / "*.jsonl")], "*.jsonl: no file matches"),
                              ([str(tmp_path)], "is a directory"),
                              ([str(tmp_path / "x.csv")], "x.csv: unsupported file type")]:
        with pytest.raises(UserError, match=message.replace("*", r"\*").replace(".", r"\.")):
            expand_inputs(patterns)
