"""Parquet shards of packed rows (contract 3): the schema, a streaming writer, and metadata.json read/validate.

pretokenize.py writes with ShardWriter; finetune.py reads with read_shard_metadata(out_dir), which checks
metadata.json and every shard's footer with open_shard, the one validation of a shard (schema, row-group sizes;
no data is read). A reader that opens the shards again should use open_shard too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("doc_lens", pa.list_(pa.int32())),
])
ROW_GROUP_ROWS = 64      # a reader can shuffle by row group without loading a whole shard
SPLITS = ("train", "validation")
METADATA_FILE = "metadata.json"
# zstd level 3: about half the size of level 1 on token ids for little extra time (bench/RESULTS.md).
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


class ShardWriter:
    """Writes rows into DIR/shard-00000.parquet, ... with at most `rows_per_shard` rows each and row groups of
    at most 64 rows, flushing every full row group so memory stays at one row group."""

    def __init__(self, split_dir: str | Path, max_len: int, rows_per_shard: int = 1024,
                 row_group_rows: int = ROW_GROUP_ROWS):
        if rows_per_shard < 1:
            raise UserError(f"--rows-per-shard {rows_per_shard}: must be at least 1")
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_len = max_len
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = min(row_group_rows, ROW_GROUP_ROWS, rows_per_shard)
        self.shards: list[str] = []          # names relative to split_dir
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self._buf: list = []

    def write(self, input_ids: np.ndarray, labels: np.ndarray, doc_lens) -> None:
        if len(input_ids) != self.max_len or len(labels) != self.max_len:
            raise ValueError(f"row of {len(input_ids)} tokens, expected {self.max_len}")
        self._buf.append((input_ids, labels, doc_lens))
        if len(self._buf) >= self.row_group_rows or \
                self._rows_in_shard + len(self._buf) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        if self._writer is None:
            name = shard_name(len(self.shards))
            self._writer = pq.ParquetWriter(self.dir / name, SCHEMA, compression=COMPRESSION,
                                            compression_level=COMPRESSION_LEVEL, use_dictionary=False,
                                            write_statistics=False)
            self.shards.append(name)
            self._rows_in_shard = 0
        n, L = len(self._buf), self.max_len
        fixed = pa.array(np.arange(0, (n + 1) * L, L, dtype=np.int32))
        ids = pa.ListArray.from_arrays(fixed, pa.array(np.concatenate([r[0] for r in self._buf])))
        labels = pa.ListArray.from_arrays(fixed, pa.array(np.concatenate([r[1] for r in self._buf])))
        dl = [np.asarray(r[2], dtype=np.int32) for r in self._buf]
        dl_off = pa.array(np.concatenate(([0], np.cumsum([len(d) for d in dl]))).astype(np.int32))
        doc_lens = pa.ListArray.from_arrays(dl_off, pa.array(np.concatenate(dl)))
        table = pa.Table.from_arrays([ids, labels, doc_lens], schema=SCHEMA)
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self._rows_in_shard += n
        self._buf = []
        if self._rows_in_shard >= self.rows_per_shard:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.shards


def open_shard(path: str | Path) -> pq.ParquetFile:
    """A shard's ParquetFile, after checking its footer against contract 3 (one-line UserError otherwise)."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a missing or corrupt file
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if not pf.schema_arrow.equals(SCHEMA):
        found = ", ".join(f"{f.name} {f.type}" for f in pf.schema_arrow)
        raise UserError(f"{path}: columns {found}, expected input_ids, labels, doc_lens as list<int32>")
    md = pf.metadata
    for g in range(md.num_row_groups):
        if md.row_group(g).num_rows > ROW_GROUP_ROWS:
            raise UserError(f"{path}: row group {g} has {md.row_group(g).num_rows} rows (> {ROW_GROUP_ROWS})")
    return pf


def read_shard_metadata(out_dir: str | Path, *, tokenizer_sha256: str | None = None,
                        max_len: int | None = None) -> dict:
    """Load OUT/metadata.json and check it against the shards' parquet footers; one-line UserError otherwise.

    Returns the metadata dict with `splits[s]["shard_paths"]` (absolute paths) added. Pass `tokenizer_sha256`
    (qlora.llama3.tokenizer_fingerprint of the model's tokenizer) and/or `max_len` to check that they match.
    """
    out = Path(out_dir)
    meta_path = out / METADATA_FILE
    if not out.is_dir():
        raise UserError(f"{out}: no such directory (run pretokenize.py first)")
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: missing (not a pretokenize.py output directory?)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    for key in ("tokenizer", "max_len", "pad_id", "format", "splits", "long_documents"):
        if key not in meta:
            raise UserError(f"{meta_path}: missing key {key!r}")
    if tokenizer_sha256 is not None and meta["tokenizer"].get("sha256") != tokenizer_sha256:
        raise UserError(f"{meta_path}: shards were tokenized with {meta['tokenizer'].get('name')!r} "
                        f"(sha256 {str(meta['tokenizer'].get('sha256'))[:12]}...), not this model's tokenizer "
                        f"({tokenizer_sha256[:12]}...); rerun pretokenize.py with the model's tokenizer")
    if max_len is not None and meta["max_len"] != max_len:
        raise UserError(f"{meta_path}: shards hold rows of {meta['max_len']} tokens, expected {max_len}")
    for split in SPLITS:
        info = meta["splits"].get(split)
        if info is None:
            raise UserError(f"{meta_path}: missing split {split!r}")
        paths, rows = [], 0
        for rel in info.get("shards", []):
            p = out / rel
            if not p.is_file():
                raise UserError(f"{p}: shard listed in {meta_path} is missing")
            rows += open_shard(p).metadata.num_rows
            paths.append(str(p.resolve()))
        if rows != info.get("rows"):
            raise UserError(f"{meta_path}: split {split!r} lists {info.get('rows')} rows, its shards hold {rows}")
        info["shard_paths"] = paths
    return meta
