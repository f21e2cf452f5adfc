"""Make the bundled sample task: a small hand vocabulary of musical notes and id sequences using it.

    python examples/make_sample_data.py                       # regenerates examples/sample/ exactly
    python examples/make_sample_data.py --out /tmp/s --task reverse --n 500 --min-len 1 --max-len 3

Each sequence is `<s> prompt-notes <sep> response-notes </s>` (padded with <pad> to a common width in the .npy):
  transpose: the response is every prompt note moved --step places up the cyclic note list (same length);
  reverse:   the response is the prompt notes in reverse order.
The task is small enough for a tiny random Llama-shaped model with LoRA to learn on CPU in minutes, which the
quick start relies on. Output (all the same data): vocab.json (token -> id), sequences.npy (2-D int32, padded),
sequences.jsonl ({"input_ids": [...]} without padding). Deterministic for a given set of flags.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<s>", "</s>", "<sep>"]  # ids 0, 1, 2, 3
NOTES = {
    # Two octaves of the C major scale: each note is 2 Llama-3 tokens (" C", "4"), like most real hand vocabularies.
    "octaves": [f"{n}{o}" for o in (4, 5) for n in "CDEFGAB"],
    # Single letters: one Llama-3 token a note, an easier task for very small models.
    "letters": list("CDEFGAB") + list("cdefgab"),
}


def make_sequences(notes: list[str], *, task: str, step: int, n: int, min_len: int, max_len: int,
                   seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    first_note = len(SPECIALS)
    pad, bos, eos, sep = range(4)
    seqs = []
    for _ in range(n):
        prompt = [rng.randrange(len(notes)) for _ in range(rng.randint(min_len, max_len))]
        if task == "transpose":
            response = [(k + step) % len(notes) for k in prompt]
        elif task == "reverse":
            response = prompt[::-1]
        else:
            raise ValueError(task)
        seqs.append([bos] + [first_note + k for k in prompt] + [sep] + [first_note + k for k in response] + [eos])
    return seqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "sample"), help="output directory")
    ap.add_argument("--task", choices=["transpose", "reverse"], default="transpose")
    ap.add_argument("--step", type=int, default=2, help="transpose: places up the note list")
    ap.add_argument("--notes", choices=sorted(NOTES), default="octaves", help="note spelling (see NOTES)")
    ap.add_argument("--n", type=int, default=3050, help="number of sequences")
    ap.add_argument("--min-len", type=int, default=4, help="fewest prompt notes")
    ap.add_argument("--max-len", type=int, default=4, help="most prompt notes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 1 <= args.min_len <= args.max_len:
        ap.error("need 1 <= --min-len <= --max-len")

    notes = NOTES[args.notes]
    seqs = make_sequences(notes, task=args.task, step=args.step, n=args.n, min_len=args.min_len,
                          max_len=args.max_len, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + notes)}
    (out / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    width = max(map(len, seqs))
    padded = np.zeros((len(seqs), width), dtype=np.int32)  # <pad> = 0
    for row, s in enumerate(seqs):
        padded[row, :len(s)] = s
    np.save(out / "sequences.npy", padded)
    with open(out / "sequences.jsonl", "w") as f:
        for s in seqs:
            f.write(json.dumps({"input_ids": s}) + "\n")
    print(f"{out}: {len(seqs)} sequences ({args.task}, {args.notes}, prompt {args.min_len}-{args.max_len} notes), "
          f"vocab of {len(vocab)} tokens")


if __name__ == "__main__":
    main()
