"""Compare a one-GPU and a DDP finetune.py run (issue 5): throughput scaling, memory per GPU, adapters across ranks.

    python bench/ddp_report.py RUN_1GPU RUN_NGPU [--warmup 2]

Reads RUN/metrics.jsonl (tokens_per_s is global: all ranks' tokens per optimizer step / step time;
gpu_mem_* are rank 0's peaks), RUN/config.json and the last checkpoint's trainer_state.json, whose
lora_sha256_per_rank holds every rank's sha256 of its LoRA weights' bytes (finetune.py gathers them at each
checkpoint and stops if they differ).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summary(run: Path, warmup: int) -> dict:
    recs = [json.loads(x) for x in open(run / "metrics.jsonl") if x.strip()]
    recs = [r for r in recs if "tokens_per_s" in r]
    cfg = json.loads((run / "config.json").read_text())
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text()) if ckpts else {}
    return {"world": cfg["resolved"]["world_size"], "steps": len(recs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs[warmup:]),
            "reserved_gib": max(r.get("gpu_mem_reserved_gib", 0) for r in recs),
            "allocated_gib": max(r.get("gpu_mem_allocated_gib", 0) for r in recs),
            "losses": [round(r["loss"], 4) for r in recs], "digests": state.get("lora_sha256_per_rank"),
            "checkpoint": ckpts[-1].name if ckpts else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("one")
    ap.add_argument("many")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    a, b = summary(Path(args.one), args.warmup), summary(Path(args.many), args.warmup)
    scaling = b["tokens_per_s"] / a["tokens_per_s"]
    mem = b["reserved_gib"] / a["reserved_gib"] - 1 if a["reserved_gib"] else float("nan")  # nan on CPU
    same = b["digests"] is not None and len(set(b["digests"])) == 1
    print("| run | GPUs | tokens/s (all GPUs) | tokens/s per GPU | peak reserved GiB (rank 0) | peak allocated GiB |")
    print("|---|---|---|---|---|---|")
    for name, s in (("1 GPU", a), (f"DDP x{b['world']}", b)):
        print(f"| {name} | {s['world']} | {s['tokens_per_s']:,.0f} | {s['tokens_per_s'] / s['world']:,.0f} | "
              f"{s['reserved_gib']:.2f} | {s['allocated_gib']:.2f} |")
    print(f"\nscaling {scaling:.2f}x (target >= 1.9x); memory per GPU {100 * mem:+.1f}% vs one GPU (target within 5%)")
    print(f"LoRA sha256 per rank at {b['checkpoint']}: {b['digests']} -> {'bit-identical' if same else 'DIFFERENT'}")
    print(f"losses 1 GPU: {a['losses']}\nlosses DDP:   {b['losses']}")


if __name__ == "__main__":
    main()
