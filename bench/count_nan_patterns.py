"""How many of each 4-bit weight's byte pairs read as bf16 NaN: the values FSDP's bf16 gather changed on the GPU.

    python bench/count_nan_patterns.py [--layer 0]       (CPU; the equality model of bench/fsdp_bench.py)

bench/fsdp_bench.py's small model, quantised here on the CPU, its packed NF4 bytes read as bf16 pairs (the storage
FSDP gathered before qlora/fsdp.py kept them uint8): per weight of one block, the pairs whose bit pattern is a NaN
(exponent all ones, mantissa not zero), to set beside --check-gathered's count of changed values on the GPU
(bench/RESULTS.md, "FSDP2 on one GPU").
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=0)
    args = ap.parse_args()
    from qlora.model import load_base_model
    from qlora.tiny_model import build_tiny_llama3

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llama3(Path(tmp), layers=4, hidden=512, intermediate=1024, heads=4, kv_heads=2,
                          tie_word_embeddings=False, tokenizer_style="meta")  # as fsdp_bench.py builds it
        model = load_base_model(tmp, compute_dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if p.dtype != torch.uint8 or f"layers.{args.layer}." not in name:
            continue
        bits = p.detach().flatten().view(torch.int16)
        nan = (((bits >> 7) & 0xFF) == 0xFF) & ((bits & 0x7F) != 0)
        print(f"{name}: {bits.numel()} bf16 pairs, {int(nan.sum())} NaN patterns")


if __name__ == "__main__":
    main()
