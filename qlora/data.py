"""Read pretokenize.py's packed parquet shards by row group, in a seeded order shared by all DDP ranks.

The order is an endless stream of rows: epoch e is a permutation of all rows (row groups shuffled by seed+e, rows
shuffled inside each group), epochs concatenated. Optimizer step s takes stream rows [s*G, (s+1)*G) with
G = micro_batch x grad_accum x world_size; rank r takes its own contiguous slice of those. So the data position is
one number — rows consumed — valid for any number of ranks, and no row is dropped at an epoch's end. Row groups
hold <= 64 rows (contract 3), so shuffling by group plus within-group keeps reads to one group at a time instead of
loading a shard. Hand-written because no library sampler resumes mid-epoch from a row count across world sizes.
check_data refuses, before any model is loaded, data the model cannot train on.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

COLUMNS = ("input_ids", "labels", "doc_lens")


def check_data(data_dir: str | os.PathLike, model_dir: str | os.PathLike, model_config: dict, tokenizer) -> dict:
    """shards.read_shard_metadata (metadata.json checked against every shard's parquet footer), and refuse data
    this model cannot train on: shards made with another tokenizer, rows longer than its context, an empty train
    split. Returns the metadata."""
    from .llama3 import tokenizer_fingerprint
    from .shards import read_shard_metadata

    meta = read_shard_metadata(data_dir, tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    meta_path = Path(data_dir) / "metadata.json"
    max_pos = model_config.get("max_position_embeddings")
    if max_pos is not None and int(meta["max_len"]) > int(max_pos):
        raise UserError(f"{meta_path}: max_len {meta['max_len']} exceeds the model's context "
                        f"(max_position_embeddings={max_pos} in {model_dir}/config.json); rerun pretokenize.py "
                        f"with --max-len {max_pos} or less")
    if not meta["splits"]["train"].get("rows"):
        raise UserError(f"{meta_path}: the train split has no rows (empty data set)")
    return meta


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int       # row-group index inside the file
    num_rows: int


class PackedShards:
    """All rows of one split (train or validation) as an indexable set of row groups; reads only what is asked for."""

    def __init__(self, data_dir: str | os.PathLike, split: str, meta: dict, cache_groups: int = 4):
        import pyarrow.parquet as pq

        self.split = split
        self.max_len = int(meta["max_len"])
        self.pad_id = int(meta["pad_id"])
        split_meta = meta["splits"].get(split)
        self.groups: list[RowGroup] = []
        self._files: dict[str, "pq.ParquetFile"] = {}
        shards = (split_meta or {}).get("shards", [])
        for rel in shards:
            path = Path(data_dir) / rel
            if not path.is_file():
                raise UserError(f"{Path(data_dir) / 'metadata.json'}: {split} shard {rel} does not exist")
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise UserError(f"{path}: not a readable parquet file ({e})") from e
            names = set(pf.schema_arrow.names)
            if not set(COLUMNS) <= names:
                raise UserError(f"{path}: needs columns {', '.join(COLUMNS)}, has {', '.join(sorted(names))}")
            self._files[str(path)] = pf
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if n:
                    self.groups.append(RowGroup(str(path), i, n))
        self.num_rows = sum(g.num_rows for g in self.groups)
        self._cache: OrderedDict = OrderedDict()
        self._cache_groups = cache_groups

    def __len__(self) -> int:
        return self.num_rows

    def _read_group(self, gi: int) -> dict:
        if gi in self._cache:
            self._cache.move_to_end(gi)
            return self._cache[gi]
        g = self.groups[gi]
        table = self._files[g.path].read_row_group(g.index, columns=list(COLUMNS))
        cols = {}
        for name in COLUMNS:
            col = table.column(name).combine_chunks()
            flat = col.values.to_numpy(zero_copy_only=False)
            offsets = col.offsets.to_numpy()
            cols[name] = (flat, offsets)
        lengths = np.diff(cols["input_ids"][1])
        if (lengths != self.max_len).any() or (np.diff(cols["labels"][1]) != self.max_len).any():
            raise UserError(f"{g.path}: row group {g.index} has rows not exactly max_len={self.max_len} long")
        data = {"input_ids": cols["input_ids"][0].reshape(-1, self.max_len).astype(np.int64),
                "labels": cols["labels"][0].reshape(-1, self.max_len).astype(np.int64),
                "doc_lens": [cols["doc_lens"][0][a:b] for a, b in zip(cols["doc_lens"][1][:-1], cols["doc_lens"][1][1:])]}
        self._cache[gi] = data
        if len(self._cache) > self._cache_groups:
            self._cache.popitem(last=False)
        return data

    def rows(self, refs: list[tuple[int, int]]) -> dict:
        """Stack rows given as (group index, row inside group) into a batch of numpy arrays."""
        ids, labels, pos = [], [], []
        for gi, ri in refs:
            grp = self._read_group(gi)
            doc_lens = grp["doc_lens"][ri]
            if int(doc_lens.sum()) > self.max_len or (doc_lens <= 0).any():
                g = self.groups[gi]
                raise UserError(f"{g.path}: row group {g.index} row {ri}: doc_lens {doc_lens.tolist()} do not fit "
                                f"max_len={self.max_len}")
            ids.append(grp["input_ids"][ri])
            labels.append(grp["labels"][ri])
            pos.append(packed_position_ids(doc_lens, self.max_len))
        return {"input_ids": np.stack(ids), "labels": np.stack(labels), "position_ids": np.stack(pos)}


def packed_position_ids(doc_lens, max_len: int) -> np.ndarray:
    """Positions restarting at 0 at every document, the padding tail counted as one more segment.

    transformers (masking_utils.find_packed_sequence_indices) turns every restart into a new attention segment, so
    with attention_mask=None each document attends only to itself; RoPE sees each document from position 0.
    """
    lens = [int(n) for n in doc_lens]
    pad = max_len - sum(lens)
    if pad:
        lens.append(pad)
    return np.concatenate([np.arange(n, dtype=np.int64) for n in lens])


class StreamOrder:
    """The seeded, endless order of rows: epoch-wise permutations concatenated (see module docstring)."""

    def __init__(self, shards: PackedShards, seed: int, shuffle: bool = True):
        self.shards, self.seed, self.shuffle = shards, seed, shuffle
        self._epoch_cache: tuple[int, list[tuple[int, int]]] | None = None

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        groups = self.shards.groups
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            group_order = rng.permutation(len(groups))
            order = [(int(gi), int(ri)) for gi in group_order for ri in rng.permutation(groups[gi].num_rows)]
        else:
            order = [(gi, ri) for gi, g in enumerate(groups) for ri in range(g.num_rows)]
        self._epoch_cache = (epoch, order)
        return order

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        """Stream rows [start, start+count), crossing epoch boundaries as needed."""
        n = self.shards.num_rows
        out = []
        while count > 0:
            epoch, offset = divmod(start, n)
            chunk = self.epoch_order(epoch)[offset:offset + count]
            out += chunk
            start += len(chunk)
            count -= len(chunk)
        return out


def step_micro_batches(order: StreamOrder, rows_consumed: int, micro_batch_size: int, grad_accum: int,
                       rank: int, world_size: int) -> list[dict]:
    """This rank's `grad_accum` micro-batches of the optimizer step that starts at stream row `rows_consumed`."""
    per_rank = micro_batch_size * grad_accum
    refs = order.take(rows_consumed + rank * per_rank, per_rank)
    return [order.shards.rows(refs[i:i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]


def eval_micro_batches(shards: PackedShards, micro_batch_size: int, rank: int, world_size: int,
                       max_rows: int | None = None):
    """Every validation row once, in file order, split round-robin by micro-batch across ranks."""
    order = StreamOrder(shards, seed=0, shuffle=False).epoch_order(0)
    if max_rows is not None:
        order = order[:max_rows]
    batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    for b in batches[rank::world_size]:
        yield shards.rows(b)
