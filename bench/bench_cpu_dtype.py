"""The quick start's training step on the CPU: compute dtype and lm_head loss variants, timed in one call.

    python bench/bench_cpu_dtype.py [--steps 6] [--out results.jsonl]

Builds the quick start's tiny model and data (examples/quickstart.sh's settings: 2 blocks of 256, rows of 512, LoRA
r=16, micro-batch 2) in a temporary directory, then times optimizer steps of qlora.model.forward_loss for each
variant, each in a fresh process pinned to one thread and timed in CPU seconds (time.process_time), so that other
load on the machine inflates the numbers less than wall time would. Variants:
  bf16 + checkpointed lm_head  the code before this change (bf16 autocast; each loss chunk checkpointed, so the
                               lm_head runs forward, again in the recompute, and backward)
  bf16 / fp32 + fused lm_head  qlora.loss now: d/d hidden computed in the forward, two lm_head matmuls instead of 3
  fp32 + checkpointed lm_head  the dtype change alone
Each variant runs twice: natively, and with the CPU's bf16 and AVX-512 paths switched off (ONEDNN_MAX_CPU_ISA=AVX2,
ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2), which stands in for a CPU with AVX2 only (checked: bf16
matmuls then run at ~2 GFLOP/s instead of ~180). The first losses are printed: fp32 gives the same numbers with
and without AVX-512, bf16 does not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
VARIANTS = [("bf16", "checkpointed"), ("bf16", "fused"), ("fp32", "checkpointed"), ("fp32", "fused")]


def child(work: Path, dtype: str, lmhead: str, steps: int) -> dict:
    import statistics
    import time

    import torch
    from torch.utils.checkpoint import checkpoint

    import qlora.loss as loss_module
    import qlora.model as model_module
    from qlora.data import PackedShards, StreamOrder, step_micro_batches
    from qlora.shards import read_shard_metadata
    from qlora.model import apply_lora, forward_loss, load_base_model, resolve_compute_dtype

    torch.set_num_threads(1)
    if lmhead == "checkpointed":
        def checkpointed(hidden, weight, targets, chunk_size=1024):
            hidden, targets = loss_module.labelled_rows(hidden, targets)
            total = hidden.new_zeros((), dtype=torch.float32)
            for i in range(0, targets.numel(), chunk_size):
                total = total + checkpoint(loss_module._chunk_ce_sum, hidden[i:i + chunk_size], weight,
                                           targets[i:i + chunk_size], use_reentrant=False)
            return total
        model_module.linear_cross_entropy_sum = checkpointed
    meta = read_shard_metadata(work / "tokens")
    order = StreamOrder(PackedShards(work / "tokens", "train", meta), seed=1)
    compute_dtype = resolve_compute_dtype(dtype, "cpu", native_cpu_bf16=True)
    model = apply_lora(load_base_model(work / "tiny", quantize="nf4", compute_dtype=compute_dtype), r=16, alpha=32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    seconds, losses = [], []
    for step in range(steps):
        batch = {k: torch.from_numpy(v) for k, v in step_micro_batches(order, 2 * step, 2, 1, 0, 1)[0].items()}
        t0 = time.process_time()
        loss_sum, n = forward_loss(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        seconds.append(time.process_time() - t0)
        losses.append(float(loss_sum.detach() / n))
    return {"dtype": dtype, "lm_head": lmhead, "cpu_s_per_step_median": statistics.median(seconds[1:]),
            "cpu_s_per_step": seconds, "losses": losses, "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (the first is not timed)")
    ap.add_argument("--out", default=None, help="append one JSON line per variant here")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        work, dtype, lmhead, steps = args.child
        print(json.dumps(child(Path(work), dtype, lmhead, int(steps))))
        return
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([py, "-m", "qlora.tiny_model", str(work / "tiny"), "--layers", "2", "--hidden", "256",
                        "--intermediate", "512", "--init-std", "0.1"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([py, str(ROOT / "data_processing.py"), "--vocab", str(ROOT / "examples/sample/vocab.json"),
                        "--input", str(ROOT / "examples/sample/sequences.npy"), "--output-dir", str(work / "data")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([py, str(ROOT / "pretokenize.py"), "--input", str(work / "data"), "--tokenizer",
                        str(work / "tiny"), "--output-dir", str(work / "tokens"), "--max-len", "512"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        rows = []
        for isa, extra in (("native", {}), ("avx2-only", AVX2_ONLY)):
            for dtype, lmhead in VARIANTS:
                res = subprocess.run([py, __file__, "--child", str(work), dtype, lmhead, str(args.steps)],
                                     env=dict(env, **extra), capture_output=True, text=True)
                if res.returncode:
                    sys.exit(f"{isa} {dtype} {lmhead} failed:\n{res.stderr[-2000:]}")
                row = dict(json.loads(res.stdout.strip().splitlines()[-1]), isa=isa)
                rows.append(row)
                print(f"{isa:10s} {dtype} {lmhead:13s} {row['cpu_s_per_step_median']:7.3f} CPU s/step   first losses "
                      + " ".join(f"{x:.6f}" for x in row["losses"][:3]), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
