"""Test-only builders of pretokenized data for finetune.py's tests.

Two ways, both producing contract-3 directories:
  * `write_rows`: hand-built rows through qlora.shards.ShardWriter (pretokenize.py's own writer), for tests that
    need exact control over documents, labels and padding;
  * `pretokenized_task`: a small learnable plain-text task written as JSONL and packed by pretokenize.py itself,
    for end-to-end runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qlora.llama3 import BOS_ID, END_OF_TEXT_ID, PAD_ID, format_plain, load_tokenizer, tokenizer_fingerprint
from qlora.shards import ShardWriter

IGNORE = -100
_SHA_CACHE: dict[str, str] = {}


def tokenizer_sha(model_dir) -> str:
    key = str(model_dir)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = tokenizer_fingerprint(load_tokenizer(model_dir))
    return _SHA_CACHE[key]


def random_doc(rng: np.random.Generator, n_tokens: int) -> list[int]:
    """<|begin_of_text|> + ordinary token ids + <|end_of_text|>, n_tokens in all."""
    return [BOS_ID] + rng.integers(1000, 20000, n_tokens - 2).tolist() + [END_OF_TEXT_ID]


def pack_row(docs: list[list[int]], max_len: int, masked: list[list[bool]] | None = None):
    """One contract-3 row: documents in order, pad tail; labels -100 on pad, each document's first token and any
    position marked in `masked` (e.g. a prompt)."""
    ids, labels, lens = [], [], []
    for i, d in enumerate(docs):
        lab = list(d)
        lab[0] = IGNORE
        if masked is not None:
            lab = [IGNORE if m else x for x, m in zip(lab, masked[i])]
        ids += d
        labels += lab
        lens.append(len(d))
    assert len(ids) <= max_len
    pad = max_len - len(ids)
    return (np.array(ids + [PAD_ID] * pad, dtype=np.int32), np.array(labels + [IGNORE] * pad, dtype=np.int32),
            np.array(lens, dtype=np.int32))


def write_rows(out: Path, model_dir, max_len: int, train_rows: list, validation_rows: list | None = None,
               *, row_group_rows: int = 64, rows_per_shard: int = 1024, tokenizer_sha256: str | None = None) -> Path:
    """A pretokenize.py-shaped directory holding exactly the given rows (tuples from `pack_row`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, rows in (("train", train_rows), ("validation", validation_rows or [])):
        writer = ShardWriter(out / split, max_len, rows_per_shard=rows_per_shard, row_group_rows=row_group_rows)
        for ids, labels, lens in rows:
            writer.write(ids, labels, lens)
        shards = writer.close()
        tokens = int(sum(int(r[2].sum()) for r in rows))
        splits[split] = {"rows": len(rows), "documents": int(sum(len(r[2]) for r in rows)), "tokens": tokens,
                         "fill_rate": tokens / max(1, len(rows) * max_len),
                         "shards": [f"{split}/{s}" for s in shards]}
    meta = {"created_by": "tests/shard_fixtures.py",
            "tokenizer": {"name": "tiny", "sha256": tokenizer_sha256 or tokenizer_sha(model_dir)},
            "max_len": max_len, "pad_id": PAD_ID, "format": "plain", "splits": splits,
            "long_documents": {"policy": "split", "split": 0, "dropped": 0}}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    return out


def random_rows(model_dir, n_rows: int, max_len: int, seed: int = 0, docs_per_row=(1, 3)):
    """Rows of 1-3 random documents each plus some padding: several documents per row, as real packed data."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        k = int(rng.integers(docs_per_row[0], docs_per_row[1] + 1))
        budget = max_len - int(rng.integers(0, max_len // 8))
        cuts = sorted(rng.choice(np.arange(8, budget - 7, 4), size=k - 1, replace=False).tolist()) if k > 1 else []
        bounds = [0] + cuts + [budget]
        rows.append(pack_row([random_doc(rng, b - a) for a, b in zip(bounds[:-1], bounds[1:])], max_len))
    return rows


def task_texts(n: int, seed: int) -> list[str]:
    """A small learnable task: counting runs ("7 8 9 10 11 ...") from a random start with a random step."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, stride, length = int(rng.integers(0, 50)), int(rng.integers(1, 4)), int(rng.integers(6, 14))
        out.append(" ".join(str(start + stride * i) for i in range(length)))
    return out


def pretokenized_task(tmp: Path, model_dir, *, n_train: int = 160, n_val: int = 24, max_len: int = 128,
                      seed: int = 0) -> Path:
    """JSONL written like data_processing.py (plain format), packed by pretokenize.py itself."""
    import pretokenize

    jsonl = Path(tmp) / "jsonl"
    jsonl.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("validation", n_val, seed + 1)):
        with open(jsonl / f"{split}.jsonl", "w") as f:
            for t in task_texts(n, s):
                f.write(json.dumps({"text": format_plain(t), "format": "plain"}) + "\n")
    out = Path(tmp) / "tok"
    assert pretokenize.main(["--input", str(jsonl), "--tokenizer", str(model_dir), "--output-dir", str(out),
                             "--max-len", str(max_len), "--num-proc", "1"]) == 0
    return out
