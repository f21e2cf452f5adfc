"""Stage 1: hand-vocabulary id sequences -> Llama-3 formatted text -> DIR/{train,validation}.jsonl + metadata.json.

    python data_processing.py --vocab examples/sample/vocab.json --input examples/sample/sequences.npy \\
        --output-dir examples/out/data

Features, each with its trade-off:
  * Vocabulary: JSON token->id, JSON id->token, JSON list, one token a line, or token<TAB>id lines (qlora/vocab.py).
    Specials are found by their common names (<pad>, <s>, </s>, <sep>, [PAD], [SEP], [CLS], <unk>, ...) unless a
    --*-token flag names them. pad is stripped wherever it stands, bos/eos are dropped (Llama's own are used).
    Rows of a 2-D array are padded to one length: without a pad token that is an error (--pad-token names it),
    and so is any token after eos but pad, instead of padding kept as text.
  * Inputs: .npy/.npz/.pt/.txt/.jsonl/.parquet, several files or globs (qlora/sequences.py). txt/jsonl/parquet are
    streamed and output lines are written as they come, so memory stays bounded whatever the input size;
    npy is memory-mapped, npz and pt are loaded whole (they cannot be streamed).
  * Text: hand token strings joined by --joiner; qlora.vocab.HandVocab.text_to_ids inverts it exactly (a joiner
    that a token contains or overlaps is refused up front, so the inverse can never be ambiguous). Llama-3
    control-token strings are refused in tokens, --joiner and --system-prompt, and in the text they form together.
  * Format: plain <|begin_of_text|>TEXT<|end_of_text|>, or chat (prompt = user turn, response = assistant turn,
    split at the separator). The default is decided by the FIRST non-empty sequence (chat if it has a separator):
    no second pass over a large input; a later sequence that disagrees is an error that says which flag to pass.
  * Split: a sequence goes to validation when a hash of (seed, its ids) falls below --val-fraction. Streams,
    is deterministic, independent of file order, and identical sequences always land in the same split (no
    train/validation leakage through duplicates). The validation share is therefore close to, not exactly, F.
  * Unknown ids: an error naming file, row and position, or with --on-unknown skip, skipped and counted.
  * Atomic: everything is written into a temporary sibling of DIR that replaces DIR only on success, so a failed
    or interrupted run leaves no partial file (and an earlier good DIR stays as it was). DIR must be new, empty or
    an earlier output of this stage, and hold no input (qlora.atomic.check_output_dir).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from array import array

from tqdm import tqdm

from qlora.atomic import atomic_dir, check_output_dir, output_errors
from qlora.errors import UserError, run_main
from qlora.llama3 import CONTROL_TOKEN_RE, check_user_text, format_chat, format_plain
from qlora.sequences import count_rows, expand_inputs, iter_sequences, where
from qlora.vocab import SequenceError, add_special_token_flags, load_hand_vocab

STAGE = "data_processing"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Convert hand-vocabulary id sequences into Llama-3 formatted JSONL (train/validation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--vocab", required=True,
                    help="vocabulary file: JSON token->id, JSON id->token, JSON list, one token a line, "
                         "or token<TAB>id lines")
    ap.add_argument("--input", required=True, nargs="+", metavar="FILE",
                    help="sequence files or globs (quote globs): .npy .npz .pt .txt .jsonl .parquet")
    ap.add_argument("--output-dir", required=True, metavar="DIR",
                    help="output directory (created; a previous data_processing output there is replaced; any "
                         "other non-empty directory, or one holding an input, is refused)")
    ap.add_argument("--format", choices=["auto", "plain", "chat"], default="auto",
                    help="auto: chat if the first non-empty sequence contains the separator, else plain. "
                         "With plain, separators stay in the text as their token")
    add_special_token_flags(ap)
    ap.add_argument("--joiner", default=" ", help="string between hand tokens in the text (must be non-empty)")
    ap.add_argument("--system-prompt", default=None, metavar="TEXT",
                    help="system turn for chat records (none by default)")
    ap.add_argument("--val-fraction", type=float, default=0.02, metavar="F",
                    help="expected share of sequences in validation.jsonl, 0 <= F < 1")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the hash-based train/validation split, a 64-bit integer (-2**63 <= N < 2**63)")
    ap.add_argument("--ids-field", default="input_ids", metavar="NAME",
                    help="field (.jsonl), column (.parquet), array (.npz) or key (.pt dict) holding the ids")
    ap.add_argument("--on-unknown", choices=["error", "skip"], default="error",
                    help="an id outside the vocabulary: stop with an error, or skip the row and count it")
    args = ap.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction}: must be >= 0 and < 1")
    if not -2**63 <= args.seed < 2**63:  # it is the 8-byte key of the split hash (in_validation)
        raise UserError(f"--seed {args.seed}: must be a 64-bit integer, -2**63 <= N < 2**63")
    if args.system_prompt is not None:
        check_user_text("--system-prompt", args.system_prompt)
    return args


def check_no_control_token(text: str, file: str, row: int, joiner: str) -> None:
    """No token holds a Llama-3 control string (check_text_safe), but neighbours joined by a joiner can form one
    ("<|eot" + "_" + "id|>"); the tokenizer would then end the turn there."""
    m = CONTROL_TOKEN_RE.search(text) if "<|" in text else None
    if m:
        raise UserError(f"{where(file, row)}: its tokens joined by --joiner {joiner!r} form the Llama-3 control "
                        f"token {m.group(0)}; choose another --joiner")


def in_validation(ids: list[int], seed: int, val_fraction: float) -> bool:
    if val_fraction <= 0.0:
        return False
    h = hashlib.blake2b(array("q", ids).tobytes(), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0**64


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {r: getattr(args, f"{r}_token") for r in ("pad", "bos", "eos", "sep", "unk")}
    vocab = load_hand_vocab(args.vocab, specials=overrides)
    vocab.check_text_safe(args.joiner)
    sep = vocab.specials.sep
    if args.format == "chat" and sep is None:
        raise UserError(f"--format chat: the vocabulary {args.vocab} has no separator token; name it with --sep-token")
    files = expand_inputs(args.input)
    check_output_dir(args.output_dir, {"--vocab": args.vocab, "--input": files}, stage=STAGE)
    # rows padded to one length, and nothing says which token pads them: it would be kept as text
    pad_unknown = vocab.specials.pad is None and overrides["pad"] is None

    fmt = None if args.format == "auto" else args.format
    decided_by = "--format" if fmt else None
    if fmt is None and sep is None:
        fmt, decided_by = "plain", "the vocabulary has no separator token"
    keep_sep = args.format == "plain"
    joiner, system = args.joiner, args.system_prompt

    counts = {"rows_read": 0, "train": 0, "validation": 0, "skipped_empty": 0, "skipped_unknown_id": 0}
    hand_tokens = {"train": 0, "validation": 0}
    per_file: dict[str, int] = {}
    totals = [count_rows(f, args.ids_field) for f in files]
    total = sum(totals) if all(t is not None for t in totals) else None
    t0 = time.time()

    with output_errors("--output-dir", args.output_dir), atomic_dir(args.output_dir) as tmp, \
            open(tmp / "train.jsonl", "w", encoding="utf-8") as train_f, \
            open(tmp / "validation.jsonl", "w", encoding="utf-8") as val_f:
        bar = tqdm(total=total, unit="rows", unit_scale=True, desc="data_processing", disable=None, mininterval=1.0)
        for file, row, ids, padded in iter_sequences(files, args.ids_field):
            if padded and pad_unknown:
                raise UserError(f"{file}: a 2-D array, so its rows are padded to one length, but no token of "
                                f"{args.vocab} is known as pad; name it with --pad-token T (or pass --pad-token '' "
                                f"if no row is padded)")
            bar.update(1)
            counts["rows_read"] += 1
            per_file[file] = per_file.get(file, 0) + 1
            pos = vocab.first_unknown(ids)
            if pos is not None:
                if args.on_unknown == "skip":
                    counts["skipped_unknown_id"] += 1
                    continue
                raise UserError(f"{where(file, row)}, position {pos}: id {ids[pos]} is not in the vocabulary "
                                f"{args.vocab} (--on-unknown skip skips such rows)")
            try:
                prompt_ids, response_ids = vocab.split_sequence(ids, keep_sep=keep_sep)
            except SequenceError as e:
                raise UserError(f"{where(file, row)}, position {e.position}: {e}") from None
            if not prompt_ids and not response_ids:
                counts["skipped_empty"] += 1
                continue
            has_sep = response_ids is not None
            if fmt is None:
                fmt = "chat" if has_sep else "plain"
                decided_by = f"first sequence ({where(file, row)})"
            elif fmt == "chat" and not has_sep:
                raise UserError(f"{where(file, row)}: no separator, but the format is chat (decided by {decided_by}); "
                                f"pass --format plain to convert all sequences as plain text")
            elif fmt == "plain" and has_sep:  # only under auto: an explicit --format plain keeps separators
                # --format chat would stop at the first sequence, which has no separator: plain is the only way on
                raise UserError(f"{where(file, row)}: has a separator, but the format is plain (decided by "
                                f"{decided_by}, which has none); --format chat needs a separator in every sequence, "
                                f"so pass --format plain to convert all sequences as plain text (separators kept "
                                f"as their token)")

            source = f"{file}:{row}"
            if fmt == "plain":
                text = vocab.ids_to_text(prompt_ids, joiner)
                check_no_control_token(text, file, row, joiner)
                record = {"text": format_plain(text), "format": "plain", "source": source}
                split_ids, n_tokens = prompt_ids, len(prompt_ids)
            else:
                prompt = vocab.ids_to_text(prompt_ids, joiner)
                response = vocab.ids_to_text(response_ids, joiner)
                check_no_control_token(prompt + "\n" + response, file, row, joiner)
                record = {"text": format_chat(prompt, response, system), "format": "chat",
                          "prompt": prompt, "response": response}
                if system:
                    record["system"] = system
                record["source"] = source
                split_ids, n_tokens = prompt_ids + [sep] + response_ids, len(prompt_ids) + len(response_ids)
            split = "validation" if in_validation(split_ids, args.seed, args.val_fraction) else "train"
            (val_f if split == "validation" else train_f).write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[split] += 1
            hand_tokens[split] += n_tokens
        bar.close()

        if counts["train"] == 0:
            raise UserError(f"--input {' '.join(args.input)}: no training sequence left ({counts['rows_read']} rows "
                            f"read, {counts['skipped_empty']} empty, {counts['skipped_unknown_id']} with unknown ids, "
                            f"{counts['validation']} in validation)")
        metadata = {
            "stage": STAGE,
            "format": fmt,
            "format_decided_by": decided_by,
            "counts": counts,
            "hand_tokens": hand_tokens,
            "vocab": {"path": args.vocab, "sha256": vocab.sha256, "file_sha256": vocab.file_sha256,
                      "size": len(vocab), "specials": {r: {"token": vocab.special_names()[r], "id": i}
                                                       for r, i in vocab.specials.items()}},
            "options": {"format": args.format, "joiner": joiner, "system_prompt": system,
                        "val_fraction": args.val_fraction, "seed": args.seed, "ids_field": args.ids_field,
                        "on_unknown": args.on_unknown, **{f"{r}_token": t for r, t in overrides.items()}},
            "inputs": [{"path": f, "rows": per_file.get(f, 0)} for f in files],
            "command": [os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)),
        }
        with open(tmp / "metadata.json", "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, ensure_ascii=False)
            f.write("\n")

    secs = time.time() - t0
    skipped = counts["skipped_empty"] + counts["skipped_unknown_id"]
    print(f"{args.output_dir}: {counts['train']} train + {counts['validation']} validation records ({fmt}), "
          f"{skipped} rows skipped, {counts['rows_read'] / max(secs, 1e-9):,.0f} rows/s")
    return 0


if __name__ == "__main__":
    run_main(main, unwind_on_sigterm=True)
