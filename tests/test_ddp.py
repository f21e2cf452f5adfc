"""finetune.py under `torchrun --nproc_per_node=2` (gloo, CPU) against one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune
from run_metrics import metric_records

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, finetune_task_data, tmp_path):
    """2 ranks x micro-batch 1 x grad-accum 2 == 1 process x micro-batch 1 x grad-accum 4 (4 rows a step).

    Tolerances: per-step train loss and validation loss 1e-4 relative. Final LoRA weights: 99.9% within 1e-5
    absolute and all within 5e-4, a tenth of one update at lr 5e-3 (only summation order differs: gradients are
    all-reduced instead of accumulated in one process; measured 1.9e-6 at most on one install, while on another and
    on the CI host 2 of 262,144 weights moved 5.0e-5: Adam's update m/(sqrt(v)+eps) turns a last-bit difference in a
    gradient near eps into a visible one). Across the two ranks the LoRA weights must be bit-identical (sha256 of
    their bytes, checked at every checkpoint). The optimizer is plain AdamW: the default 8-bit AdamW rounds its
    state to 256-level blocks, so a gradient that differs in the 8th digit can move one weight by a whole level
    (seen: one of 16,384 weights by 1.5e-4 at lr 5e-3); that compares the optimizer's rounding, not DDP. The 8-bit
    optimizer under DDP is covered by the bit-identical ranks here and in the GPU test (tests/test_gpu.py).
    """
    common = ["--model", tiny_model_dir, "--data", finetune_task_data, "--micro-batch-size", 1, "--max-steps", 3,
              "--save-every", 2, "--eval-every", 3, "--lr", "5e-3", "--seed", 0, "--device", "cpu",
              "--optimizer", "adamw_torch"]
    common = [str(c) for c in common]
    run2, run1 = tmp_path / "ddp2", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "finetune.py"), *common, "--output-dir", str(run2), "--grad-accum", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert finetune.main([*common, "--output-dir", str(run1), "--grad-accum", "4"]) == 0

    cfg2 = json.loads((run2 / "config.json").read_text())["resolved"]
    assert cfg2["world_size"] == 2 and cfg2["rows_per_step"] == 4
    for step in (2, 3):
        state = json.loads((run2 / f"checkpoints/step-{step:07d}/trainer_state.json").read_text())
        digests = state["lora_sha256_per_rank"]
        assert len(digests) == 2 and digests[0] == digests[1], f"ranks diverged at step {step}"
        assert state["rows_consumed"] == 4 * step

    train2, train1 = metric_records(run2, "loss"), metric_records(run1, "loss")
    assert sorted(train2) == sorted(train1) == [1, 2, 3]
    for step in train1:
        print(f"step {step}: 2 ranks {train2[step]['loss']:.9f}  1 process {train1[step]['loss']:.9f}")
        assert train2[step]["label_tokens"] == train1[step]["label_tokens"]  # same rows, split across ranks
        assert train2[step]["loss"] == pytest.approx(train1[step]["loss"], rel=1e-4)
    # control: steps that see other rows differ by far more than the tolerance, so a rank on the wrong rows would show
    assert all(train1[s]["loss"] != pytest.approx(train1[s + 1]["loss"], rel=1e-3) for s in (1, 2))
    val2, val1 = metric_records(run2, "val_loss"), metric_records(run1, "val_loss")
    assert val2[3]["val_label_tokens"] == val1[3]["val_label_tokens"]
    assert val2[3]["val_loss"] == pytest.approx(val1[3]["val_loss"], rel=1e-4)

    w2 = load_file(str(run2 / "adapter" / "adapter_model.safetensors"))
    w1 = load_file(str(run1 / "adapter" / "adapter_model.safetensors"))
    assert w2.keys() == w1.keys()
    differences = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1])
    print(f"LoRA weights: largest difference {float(differences.max()):.3g}, "
          f"{int((differences > 1e-5).sum())} of {differences.numel()} above 1e-5")
    assert float(differences.max()) <= 5e-4 and int((differences > 1e-5).sum()) <= differences.numel() // 1000
    assert json.loads((run2 / "status.json").read_text())["state"] == "finished"
