"""Markdown table of bench_train.py results (JSON lines): python bench/summarize.py results.jsonl [--ref noupcast]"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--ref", default="noupcast", help="config the speed-up column divides by (same seq and mb)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM datasheet)")
    args = ap.parse_args()
    rows = [json.loads(line) for path in args.results for line in open(path) if line.strip()]
    ref = {(r["seq"], r["mb"]): r["tokens_per_s"] for r in rows if r["config"] == args.ref and "tokens_per_s" in r}
    print("| config | seq | mb | ckpt blocks | tokens/s | x ref | peak alloc GiB | peak reserved GiB | step-0 loss |"
          " GFLOP/token (model / hw) | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['seq']} | {r['mb']} | | {r['error'][:60]} | | "
                  f"{r.get('peak_alloc_gib', 0):.1f} | | | | | |")
            continue
        x = r["tokens_per_s"] / ref[(r["seq"], r["mb"])] if (r["seq"], r["mb"]) in ref else float("nan")
        f = r["flops"]
        print(f"| {r['config']} | {r['seq']} | {r['mb']} | {r.get('ckpt_blocks', '')} | {r['tokens_per_s']:,.0f} | "
              f"{x:.2f} | {r['peak_alloc_gib']:.1f} | {r['peak_reserved_gib']:.1f} | {r['step0_loss']:.4f} | "
              f"{f['per_token_gflop_model']:.1f} / {f['per_token_gflop_hardware']:.1f} | "
              f"{r['model_tflops_per_s']:.0f} | {100 * r['model_tflops_per_s'] / args.peak_tflops:.0f}% |")


if __name__ == "__main__":
    main()
