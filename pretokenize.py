"""Stage 2: Llama-3 JSONL (from data_processing.py) -> token ids packed into rows of exactly --max-len tokens,
written as zstd parquet shards (contract 3 in qlora/__init__.py; schema and metadata in docs/pretokenize.md).

    python pretokenize.py --input DIR --tokenizer Meta-Llama-3-8B --output-dir OUT [--max-len 8192]

Features and their trade-offs:
  * Tokenizer: a model directory or a tokenizer.json. We always encode with add_special_tokens=False and place
    <|begin_of_text|> ourselves, so Meta's files (which add BOS) and a bare tokenizer.json give identical shards.
  * Labels: -100 on padding, on each document's first token (no loss across documents) and, for chat, on the
    prompt up to the last assistant header (--train-on-prompt keeps those). Not shifted: the trainer shifts.
  * Packing: best-fit-decreasing over a bounded window (see qlora/packing.py): >= 98% fill on short documents
    without splitting any; documents longer than --max-len are split (plain), dropped (chat) or an error.
  * Streaming: JSONL is read in ~1 MB chunks, tokenized in a process pool (each worker single-threaded; at most
    2 chunks per worker in flight), packed and written as shards fill, so memory does not grow with the input.
    The pool is forked once the raw tokenizer is loaded; transformers' load_tokenizer (slow to import), which
    validates the tokenizer and gives its fingerprint, runs while the workers tokenize the first chunks.
  * Atomic: everything is written into a temporary sibling of OUT that replaces OUT only on success, so a rerun
    never mixes old and new shards and a failure or interruption leaves the old OUT (or nothing) behind. OUT must
    be new, empty or an earlier output of this stage, and hold no input (qlora.atomic.check_output_dir).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from qlora.atomic import atomic_dir, check_output_dir, output_errors, write_json_atomic
from qlora.errors import UserError, run_main
from qlora.packing import (DEFAULT_LONG_POLICY, FORMATS, LONG_POLICIES, Packer, PackStats, parse_jsonl_lines,
                           tokenize_documents)
from qlora.llama3 import BOS, BOS_ID, EOT, EOT_ID, MAX_CONTEXT, PAD_ID, load_tokenizer, tokenizer_fingerprint
from qlora.shards import COMPRESSION, METADATA_FILE, ROW_GROUP_ROWS, ShardWriter

# defaults (visible here, overridable by flags)
MAX_LEN = 8192
ROWS_PER_SHARD = 1024          # 1024 x 8192 tokens: ~8.4M tokens, some tens of MB per shard
CHUNK_BYTES = 1 << 20          # JSONL bytes per tokenization task
MAX_OPEN_ROWS = 256            # rows kept open for best fit (memory: 256 x max_len x 4 bytes)
STAGE = "pretokenize"
# what marks an earlier output: metadata.json's "stage", or (outputs written before it) its "created_by"
OUTPUT_MARKER = {"stage": STAGE, "created_by": "pretokenize.py"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, metavar="DIR",
                    help="directory with train.jsonl (required) and validation.jsonl (optional), as written by "
                         "data_processing.py; each line a JSON object with a \"text\" field")
    ap.add_argument("--tokenizer", required=True, metavar="PATH",
                    help="Llama-3 tokenizer: a model directory (e.g. Meta-Llama-3-8B) or a tokenizer.json file")
    ap.add_argument("--output-dir", required=True, metavar="OUT",
                    help="output directory; replaced as a whole on success (it must be empty, absent, or an "
                         "earlier pretokenize.py output, and hold no input)")
    ap.add_argument("--max-len", type=int, default=MAX_LEN,
                    help=f"tokens per row, 8 to {MAX_CONTEXT} (default {MAX_LEN})")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1,
                    help="tokenizer worker processes (default: all cores, here %(default)s); 1 = no pool")
    ap.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD,
                    help=f"rows per parquet shard (default {ROWS_PER_SHARD}); row groups hold at most "
                         f"{ROW_GROUP_ROWS} rows")
    ap.add_argument("--train-on-prompt", action="store_true",
                    help="chat data: also train on prompt tokens (default: labels -100 up to and including the "
                         "last assistant header)")
    ap.add_argument("--long", choices=LONG_POLICIES, default=None,
                    help="documents longer than --max-len: split into max-len pieces (each later piece gets its "
                         "own BOS), drop them, or stop with an error; counted in metadata.json "
                         "(default: split for plain, drop for chat)")
    ap.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES,
                    help=f"JSONL bytes per tokenization task (default {CHUNK_BYTES})")
    return ap.parse_args(argv)


# -- worker side ---------------------------------------------------------------------------------------------
# Workers are forked after the parent has loaded the tokenizer: they inherit it instead of parsing the 9 MB
# tokenizer.json again, and nothing but numpy/tokenizers is loaded in the parent at fork time.
_TOKENIZER = None


def _worker_signals():
    # Ctrl-C and scancel's SIGTERM reach the whole process group: the parent alone unwinds (removing its temporary)
    # and stops the pool, whose workers finish the chunk in hand and exit. A worker killed by SIGTERM while writing
    # its result left half a message in the result pipe, and the executor's thread waited for the rest for ever at
    # the parent's exit (1 in ~8 runs on a loaded 2-core machine; py-spy: _python_exit joining it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _tokenize_chunk(lines, path, first_line, train_on_prompt):
    texts, formats, line_nos = parse_jsonl_lines(lines, path, first_line)
    chunk = tokenize_documents(_TOKENIZER, texts, formats, train_on_prompt=train_on_prompt, path=path,
                               line_nos=line_nos, fast=True)
    chunk.n_bytes = sum(map(len, lines))
    return chunk


# -- main side -----------------------------------------------------------------------------------------------
def read_line_chunks(path: Path, chunk_bytes: int):
    """(lines, first line number) of about chunk_bytes each; never splits a line."""
    line_no = 1
    with open(path, "rb") as f:
        while True:
            lines = f.readlines(chunk_bytes)
            if not lines:
                return
            yield lines, line_no
            line_no += len(lines)


def tokenized_chunks(path: Path, pool, args, after_first_result=None):
    """Tokenized chunks of one JSONL file, in file order, with at most 2 tasks per worker in flight.

    `after_first_result` runs once, while the workers are busy with the next chunks, so that slow setup in the
    parent (validating the tokenizer through transformers) overlaps with tokenization instead of preceding it;
    an error in the first chunk is reported before paying for it.
    """
    def first_done(result):
        nonlocal after_first_result
        if after_first_result:
            after_first_result()
            after_first_result = None
        return result

    if pool is None:
        for lines, first in read_line_chunks(path, args.chunk_bytes):
            yield first_done(_tokenize_chunk(lines, str(path), first, args.train_on_prompt))
        return
    pending = deque()
    try:
        for lines, first in read_line_chunks(path, args.chunk_bytes):
            pending.append(pool.submit(_tokenize_chunk, lines, str(path), first, args.train_on_prompt))
            if len(pending) >= 2 * args.num_proc:
                yield first_done(pending.popleft().result())
        while pending:
            yield first_done(pending.popleft().result())
    except BrokenProcessPool:
        raise UserError(f"{path}: a tokenizer worker process was killed (out of memory? fewer --num-proc or a "
                        f"smaller --chunk-bytes need less)") from None


def pretokenize_split(path: Path, split_dir: Path, pool, args, long_policy, after_first_result=None):
    from tqdm import tqdm

    stats = PackStats()
    packer = Packer(args.max_len, long_policy=long_policy, stats=stats, max_open=MAX_OPEN_ROWS)
    writer = ShardWriter(split_dir, args.max_len, rows_per_shard=args.rows_per_shard)
    t0 = time.time()
    n_tok = 0
    # progress on a terminal only, so that logs and error output stay one line per event
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=path.name, disable=None,
              dynamic_ncols=True) as bar:
        for chunk in tokenized_chunks(path, pool, args, after_first_result):
            for row in packer.add_chunk(chunk):
                writer.write(row.input_ids, row.labels, row.doc_lens)
            n_tok += len(chunk.ids)
            bar.update(chunk.n_bytes)
            bar.set_postfix_str(f"{n_tok / max(time.time() - t0, 1e-9) / 1e3:,.0f}k tok/s, {stats.rows} rows",
                                refresh=False)
        for row in packer.finish():
            writer.write(row.input_ids, row.labels, row.doc_lens)
    shards = writer.close()
    info = stats.as_dict(args.max_len)
    info["shards"] = [f"{split_dir.name}/{s}" for s in shards]
    info["input_tokens"] = n_tok
    info["seconds"] = round(time.time() - t0, 3)
    return info


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def raw_tokenizer(path: Path):
    """tokenizers.Tokenizer from a tokenizer.json or a model directory's tokenizer.json."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".json":
        load_tokenizer(path)   # raises the one-line error for a missing or wrong path
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"--tokenizer {path}: cannot load {file} ({str(e).splitlines()[0]})") from None


def tokenizer_name(path: Path) -> str:
    return path.name if path.is_dir() else f"{path.parent.name}/{path.name}"


def main(argv=None) -> int:
    args = parse_args(argv)
    inp, out = Path(args.input), Path(args.output_dir)
    if not inp.is_dir():
        raise UserError(f"--input {inp}: no such directory")
    files = {"train": inp / "train.jsonl", "validation": inp / "validation.jsonl"}
    if not files["train"].is_file():
        raise UserError(f"--input {inp}: {files['train']} is missing (run data_processing.py first)")
    if not 8 <= args.max_len <= MAX_CONTEXT:
        raise UserError(f"--max-len {args.max_len}: must be at least 8 and at most {MAX_CONTEXT} (the longest "
                        f"Llama-3 context)")
    if args.num_proc < 1:
        raise UserError(f"--num-proc {args.num_proc}: must be at least 1")
    if args.rows_per_shard < 1:
        raise UserError(f"--rows-per-shard {args.rows_per_shard}: must be at least 1")
    if args.chunk_bytes < 1:
        raise UserError(f"--chunk-bytes {args.chunk_bytes}: must be at least 1")
    check_output_dir(out, {"--input": inp, "--tokenizer": args.tokenizer}, stage=STAGE, marker=OUTPUT_MARKER)

    # The raw tokenizer the workers encode with, from the same tokenizer.json that load_tokenizer validates
    # (transformers is slow to import: load_tokenizer runs once the workers are busy, see tokenized_chunks).
    global _TOKENIZER
    _TOKENIZER = raw_tokenizer(Path(args.tokenizer))
    if [_TOKENIZER.token_to_id(t) for t in (BOS, EOT)] != [BOS_ID, EOT_ID]:
        load_tokenizer(args.tokenizer)   # not Llama-3: raises its one-line error now, before any work
    long_policy = {f: args.long for f in FORMATS} if args.long else dict(DEFAULT_LONG_POLICY)
    loaded = {}

    def validate_tokenizer():
        if not loaded:
            loaded["tok"] = load_tokenizer(args.tokenizer)   # one-line UserError if not Llama-3
            loaded["sha256"] = tokenizer_fingerprint(loaded["tok"])

    # one tokenizer thread per process: the pool is the parallelism (measured faster than one process running
    # encode_batch on all cores, because JSON parsing and id conversion are then parallel too)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = None
    if args.num_proc > 1:
        # fork: workers inherit _TOKENIZER (no second 9 MB parse). Unlike multiprocessing.Pool, which waits forever
        # for a worker that was killed (the OOM killer, scancel's SIGTERM), the executor then raises.
        pool = ProcessPoolExecutor(args.num_proc, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_worker_signals)
        pool.submit(int).result()  # fork the workers now, while the parent has no other thread (tqdm's comes later)
    t0 = time.time()
    try:
        with output_errors("--output-dir", out), atomic_dir(out) as tmp:
            splits = {}
            for split, path in files.items():
                if path.is_file():
                    splits[split] = pretokenize_split(path, tmp / split, pool, args, long_policy, validate_tokenizer)
                else:
                    print(f"pretokenize.py: note: {path} not found, writing an empty validation split")
                    (tmp / split).mkdir()
                    splits[split] = dict(PackStats().as_dict(args.max_len), shards=[], input_tokens=0, seconds=0.0)
                s = splits[split]
                print(f"{split}: {s['documents']} documents, {s['tokens']:,} tokens in {s['rows']} rows of "
                      f"{args.max_len} (fill {s['fill_rate']:.2%}), {len(s['shards'])} shards, "
                      f"{s['long_split']} long split, {s['long_dropped']} long dropped, "
                      f"{s['input_tokens'] / max(s['seconds'], 1e-9):,.0f} tok/s")
            validate_tokenizer()
            if splits["train"]["documents"] == 0:
                raise UserError(f"{files['train']}: no documents to train on"
                                + (" (all longer than --max-len and dropped)" if splits["train"]["long_dropped"] else ""))
            counts = {f: sum(s["formats"][f] for s in splits.values()) for f in FORMATS}
            used = [f for f in FORMATS if counts[f]]
            fmt = used[0] if len(used) == 1 else "mixed"
            policy = args.long or (DEFAULT_LONG_POLICY[fmt] if fmt in DEFAULT_LONG_POLICY else "per-format")
            src_meta = inp / "metadata.json"
            meta = {
                "stage": STAGE,
                "tokenizer": {"name": tokenizer_name(Path(args.tokenizer)), "path": str(Path(args.tokenizer).resolve()),
                              "sha256": loaded["sha256"]},
                "max_len": args.max_len,
                "pad_id": PAD_ID,
                "bos_id": BOS_ID,
                "format": fmt,
                "train_on_prompt": args.train_on_prompt,
                "splits": splits,
                "long_documents": {"policy": policy, "policy_by_format": long_policy,
                                   "split": sum(s["long_split"] for s in splits.values()),
                                   "dropped": sum(s["long_dropped"] for s in splits.values())},
                "shards": {"rows_per_shard": args.rows_per_shard, "row_group_rows": ROW_GROUP_ROWS,
                           "compression": COMPRESSION,
                           "columns": {"input_ids": "list<int32>", "labels": "list<int32>", "doc_lens": "list<int32>"}},
                "input": {"dir": str(inp.resolve()),
                          "files": {k: v.name for k, v in files.items() if v.is_file()},
                          "metadata": _read_json_or_none(src_meta)},
                "seconds": round(time.time() - t0, 3),
            }
            write_json_atomic(tmp / METADATA_FILE, meta)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)  # on error nothing of theirs is wanted
    print(f"wrote {out}/ ({meta['format']}, {meta['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    run_main(main, unwind_on_sigterm=True)
