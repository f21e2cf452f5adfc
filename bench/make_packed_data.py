"""Packed training rows for the benchmark: random-token documents of mixed lengths, several per row.

    python bench/make_packed_data.py OUT_DIR [--max-len 8192] [--rows 16] [--min-doc 256] [--max-doc 4096]

By default the rows are made by pretokenize.py itself (the real data path): random-token documents are decoded
to text, written as data_processing-style JSONL ({"text": "<|begin_of_text|>...<|end_of_text|>", "format": "plain"})
and packed by `pretokenize.py` (re-tokenising changes lengths a little). --own-packer writes rows with a plain
first-fit packer here instead (no tokenizer round trip). The output follows contract 3 (OUT/train/shard-00000.parquet with
input_ids / labels / doc_lens, every row max_len tokens, padding at the tail, OUT/metadata.json), so finetune.py reads
it like real data. Token values do not matter for speed; document lengths do (a document mask computes
sum(len^2)/2 attention pairs instead of max_len^2/2), so they are drawn uniformly from [--min-doc, --max-doc].
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora.llama3 import BOS_ID, END_OF_TEXT_ID, PAD_ID  # noqa: E402


def documents(n_tokens: int, min_doc: int, max_doc: int, seed: int):
    rng = random.Random(seed)
    total = 0
    while total < n_tokens:
        n = rng.randint(min_doc, max_doc)
        body = [rng.randrange(1000, 120000) for _ in range(n - 2)]
        yield [BOS_ID] + body + [END_OF_TEXT_ID]
        total += n


def pack(docs, max_len: int):
    """Greedy first-fit into rows in arrival order (no document split, none longer than max_len here)."""
    rows: list[list[list[int]]] = []
    free: list[int] = []
    for d in docs:
        for i, f in enumerate(free):
            if len(d) <= f:
                rows[i].append(d)
                free[i] -= len(d)
                break
        else:
            rows.append([d])
            free.append(max_len - len(d))
    out = []
    for docs_in_row in rows:
        ids, labels, lens = [], [], []
        for d in docs_in_row:
            ids += d
            labels += [-100] + d[1:]
            lens.append(len(d))
        pad = max_len - len(ids)
        out.append({"input_ids": ids + [PAD_ID] * pad, "labels": labels + [-100] * pad, "doc_lens": lens})
    return out


def via_pretokenize(args, out: Path, root: Path) -> None:
    import subprocess
    import tempfile

    from qlora.llama3 import bundled_tokenizer_json, format_chat, format_plain, load_tokenizer

    tok = load_tokenizer(bundled_tokenizer_json())
    with tempfile.TemporaryDirectory() as tmp:
        for split, nrows in (("train", args.rows), ("validation", 2)):
            with open(Path(tmp) / f"{split}.jsonl", "w") as f:
                for doc in documents(int(nrows * args.max_len * 1.05), args.min_doc, min(args.max_doc, args.max_len),
                                     args.seed + (split == "validation")):
                    if args.chat_answer_share is None:
                        rec = {"text": format_plain(tok.decode(doc[1:-1])), "format": "plain"}
                    else:  # a chat turn whose prompt pretokenize.py masks: only the answer carries labels
                        cut = max(1, int(len(doc) * (1 - args.chat_answer_share)))
                        prompt, response = tok.decode(doc[1:cut]), tok.decode(doc[cut:-1])
                        rec = {"text": format_chat(prompt, response), "format": "chat", "prompt": prompt,
                               "response": response}
                    f.write(json.dumps(rec) + "\n")
        subprocess.run([sys.executable, str(root / "pretokenize.py"), "--input", tmp, "--tokenizer",
                        bundled_tokenizer_json(), "--output-dir", str(out), "--max-len", str(args.max_len),
                        "--long", "split", "--num-proc", "4"], check=True)
    meta = json.loads((out / "metadata.json").read_text())
    print(json.dumps(meta["splits"]["train"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=16, help="at least this many train rows")
    ap.add_argument("--min-doc", type=int, default=256)
    ap.add_argument("--max-doc", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--own-packer", action="store_true", help="pack here instead of running pretokenize.py")
    ap.add_argument("--chat-answer-share", type=float, default=None, metavar="F",
                    help="write chat records whose answer is the last F of each document (the prompt is masked, so "
                         "about F of the tokens carry a label) instead of plain records")
    args = ap.parse_args()
    out = Path(args.out_dir)
    root = Path(__file__).resolve().parents[1]
    if not args.own_packer and (root / "pretokenize.py").exists():
        via_pretokenize(args, out, root)
        return
    meta_splits = {}
    for split, nrows in (("train", args.rows), ("validation", 2)):
        rows = pack(documents(int(nrows * args.max_len * 1.02), args.min_doc, min(args.max_doc, args.max_len),
                              args.seed + (split == "validation")), args.max_len)
        (out / split).mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                            ("doc_lens", pa.list_(pa.int32()))])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / split / "shard-00000.parquet",
                       compression="zstd", row_group_size=64)
        ntok = sum(sum(r["doc_lens"]) for r in rows)
        meta_splits[split] = {"rows": len(rows), "documents": sum(len(r["doc_lens"]) for r in rows), "tokens": ntok,
                              "fill_rate": ntok / (len(rows) * args.max_len), "shards": [f"{split}/shard-00000.parquet"]}
    from qlora.llama3 import bundled_tokenizer_json, load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(bundled_tokenizer_json())
    meta = {"tokenizer": {"name": "llama3 (bundled)", "sha256": tokenizer_fingerprint(tok)}, "max_len": args.max_len,
            "pad_id": PAD_ID, "format": "plain", "splits": meta_splits,
            "long_documents": {"policy": "none", "split": 0, "dropped": 0},
            "bench": {"min_doc": args.min_doc, "max_doc": args.max_doc, "seed": args.seed}}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta_splits["train"]))


if __name__ == "__main__":
    main()
