"""Where do 2 FSDP ranks on one GPU (gloo) crash? A short bisection for bench/device_run.sh's fsdp_diag phase.

    python bench/fsdp_diag.py --out OUT [--budget-s 170]
    python bench/fsdp_diag.py --out OUT --device cpu --stages linear,head_old,model_plain   (the code, on a CPU)

The H200 call of 2026-12-02 saw both 2-ranks-on-cuda:0 runs of tests/fsdp_driver.py die with SIGSEGV just after
FSDP's warning that the lm_head "did not run forward before backward". torch prints that warning when a backward
ends (FSDPState._finalize_backward, called from the root's post-backward callback), so the first backward's
reduce-scatters had been issued; the crash is at the end of that backward, in the gradient clipping (a DTensor
all-reduce), in the optimizer step or in the next step. Each stage below is a fresh `torchrun --nproc_per_node 2` on
cuda:0 over gloo: two training steps, a marker printed after every part (forward, backward, clip, optimizer step),
under PYTHONFAULTHANDLER=1 (a Python traceback of every thread on SIGSEGV) and TORCH_DISTRIBUTED_DEBUG=DETAIL
(every collective checked across ranks). From the plainest FSDP2 to ours:

  linear         3 nn.Linear (fp32), fully_shard each + the root, torch AdamW      FSDP2's backward over gloo on CUDA
  linear_mp      the same under a bf16-param, fp32-reduce policy    casts, fp32 reduce-scatter (qlora/fsdp.py's
                 policy until 2026-12-07; it now casts nothing: param_dtype=None)
  linear_staged  linear_mp with every collective on CPU copies: FSDP's and the clipping's norm
                 (tests/fsdp_driver.py --stage-through-cpu, the harness fallback)
  frozen_8bit    units of a frozen bf16 weight + a trainable fp32 LoRA pair; bitsandbytes' paged 8-bit AdamW on
                 each rank's shards (qlora.fsdp.shard_optimizer)                     our optimizer path
  head_old       a final norm + a head in one unit, the head used by its weight only (the arrangement that warned)
  model_plain    a tiny untied Llama, 4-bit + LoRA, through qlora.fsdp.shard; kernels none, sdpa
  model_fast     the same on the fast path (Liger, fused SwiGLU+down, flex attention), fsdp_bench's equality run
  model_staged   model_fast with FSDP's collectives staged through CPU                the harness fallback, end to end

Prints a table (stage, exit status, the last marker of each rank, seconds) and writes OUT/fsdp_diag.json; the whole
output of every stage goes to OUT/fsdp_diag.log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
STAGES = ("linear", "linear_mp", "linear_staged", "frozen_8bit", "head_old", "model_plain", "model_fast",
          "model_staged")
MARK = re.compile(r"\[diag (\w+) rank (\d)\] ([^\[\n]*)")  # the two ranks' lines may interleave


# ----------------------------------------------------------------------------------------------- one stage (a rank)
def run_stage(stage: str, work: Path, device_type: str) -> None:
    import warnings

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    dist.init_process_group("gloo")
    on_gpu = device_type == "cuda"
    if on_gpu:
        torch.cuda.set_device(0)
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()

    def mark(text: str) -> None:
        print(f"[diag {stage} rank {rank}] {text}", flush=True)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    mark(f"torch {torch.__version__}, gloo over {world} processes on "
         f"{torch.cuda.get_device_name() if on_gpu else 'the CPU'}")
    mesh = init_device_mesh(device_type, (world,))
    ours = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    torch.manual_seed(0)

    if stage.startswith("linear"):
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(3)]).to(device)
        kw = dict(mesh=mesh, mp_policy=ours if stage != "linear" else MixedPrecisionPolicy())
        for layer in model:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        if stage == "linear_staged":
            from fsdp_driver import stage_through_cpu

            mark(f"{stage_through_cpu(model)} units staged through CPU")
        x = (torch.randn(16, 512, device=device) + rank).to(torch.float32 if stage == "linear" else torch.bfloat16)

        def loss_fn():
            return model(x).float().square().mean()
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    elif stage == "frozen_8bit":
        import bitsandbytes as bnb

        from qlora.fsdp import shard_optimizer

        class Block(torch.nn.Module):  # a frozen base weight and a LoRA pair in one unit, as in a decoder block
            def __init__(self):
                super().__init__()
                self.base = torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16).requires_grad_(False)
                self.lora_a = torch.nn.Parameter(torch.randn(64, 4096) / 64)
                self.lora_b = torch.nn.Parameter(torch.randn(4096, 64) / 64)

            def forward(self, x):
                return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)

        model = torch.nn.Sequential(Block(), Block()).to(device)
        for block in model:
            fully_shard(block, mesh=mesh, mp_policy=ours)
        fully_shard(model, mesh=mesh, mp_policy=ours)
        x = torch.randn(64, 4096, device=device, dtype=torch.bfloat16)

        def loss_fn():
            return model(x).float().square().mean()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = shard_optimizer(params, lambda shards: bnb.optim.PagedAdamW8bit(shards, lr=1e-3))
        mark(f"paged 8-bit AdamW on {len(params)} local shards of {params[0].to_local().numel()} elements and more")
    elif stage == "head_old":
        class Head(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Linear(512, 512)
                self.norm = torch.nn.RMSNorm(512)
                self.head = torch.nn.Linear(512, 4096, bias=False).requires_grad_(False)

            def forward(self, x):  # the head by its weight, as forward_loss does
                h = self.norm(self.body(x))
                return torch.nn.functional.linear(h, self.head.weight).float().logsumexp(-1).sum()

        model = Head().to(device)
        fully_shard(model.body, mesh=mesh, mp_policy=ours)
        fully_shard([model.norm, model.head], mesh=mesh, mp_policy=ours, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, mp_policy=ours)
        x = torch.randn(16, 512, device=device, dtype=torch.bfloat16)

        def loss_fn():
            return model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    else:
        import bitsandbytes as bnb

        from qlora import fsdp
        from qlora.model import TrainStep, apply_lora, load_base_model

        fast = stage in ("model_fast", "model_staged")
        base = load_base_model(work / "model", device=device, compute_dtype=torch.bfloat16,
                               attn_implementation="flex_attention" if fast else "sdpa")
        fsdp.offload_embeddings(base)
        peft_model = apply_lora(base, r=16, checkpoint_layers=1, kernels="liger" if fast else "none")
        step = fsdp.shard(TrainStep(peft_model), device)
        if stage == "model_staged":
            from fsdp_driver import stage_through_cpu

            mark(f"{stage_through_cpu(step)} units staged through CPU")
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = fsdp.shard_optimizer(params, lambda s: bnb.optim.PagedAdamW8bit(s, lr=1e-3, min_8bit_size=512))
        gen = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, 1000, (1, 256), generator=gen)
        batch = {"input_ids": ids.to(device), "labels": ids.to(device),
                 "position_ids": torch.arange(256)[None].to(device)}

        def loss_fn():
            loss_sum, n = step(**batch)
            return loss_sum / n

    for i in (1, 2):
        loss = loss_fn()
        sync()
        mark(f"step {i}: forward (loss {float(loss):.4f})")
        loss.backward()
        sync()
        mark(f"step {i}: backward")
        if stage.endswith("_staged"):
            from fsdp_driver import all_reduce_through_cpu
            from qlora.training import clip_gradients

            norm = torch.tensor(clip_gradients(params, 1.0, all_reduce_through_cpu))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        sync()
        mark(f"step {i}: clip_grad_norm_ ({float(norm):.4f})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        mark(f"step {i}: optimizer step")
    dist.barrier()
    mark("PASS")
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- the launcher
def prepare(work: Path) -> None:
    """The tiny untied Llama of the model stages (CPU, a few seconds)."""
    from qlora.tiny_model import build_tiny_llama3

    if not (work / "model" / "config.json").is_file():
        build_tiny_llama3(work / "model", layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2,
                          tie_word_embeddings=False)


def launch(stage: str, work: Path, limit_s: float, log: Path, device_type: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "2",
           "PYTHONFAULTHANDLER": "1", "TORCH_DISTRIBUTED_DEBUG": "DETAIL", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--stage", stage, "--work", str(work), "--device", device_type]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        text, _ = p.communicate(timeout=limit_s)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        text, _ = p.communicate()
        rc, text = 124, f"{text}\ntimed out after {limit_s:.0f} s"
    seconds = time.time() - t0
    with open(log, "a") as f:
        f.write(f"\n===== {stage} (rc {rc}, {seconds:.0f} s): {' '.join(cmd)}\n{text}")
    last = {0: "(none)", 1: "(none)"}
    for m in MARK.finditer(text):
        if m.group(1) == stage:
            last[int(m.group(2))] = m.group(3).strip()
    signals = sorted(set(re.findall(r"Signal (\d+) \((\w+)\)", text)))
    # faulthandler's dump (every thread's Python stack, the crashing one first) says where
    fault = text.find("Fatal Python error")
    crash = text[fault:].splitlines()[:30] if fault >= 0 else []
    return {"stage": stage, "rc": rc, "seconds": round(seconds, 1), "last_rank0": last[0], "last_rank1": last[1],
            "passed": rc == 0 and last[0] == "PASS" and last[1] == "PASS",
            "signals": [f"{n} {name}" for n, name in signals], "faulthandler": crash}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--work", default="/tmp/fsdp-diag")
    ap.add_argument("--budget-s", type=float, default=170)
    ap.add_argument("--stage", choices=STAGES, help="(internal) run one stage as a torchrun worker")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    work = Path(args.work)
    if args.stage:
        run_stage(args.stage, work, args.device)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    deadline = time.time() + args.budget_s
    results = []
    for stage in args.stages.split(","):
        left = deadline - time.time()
        if left < 15:
            results.append({"stage": stage, "rc": None, "skipped": f"{left:.0f} s of the budget left"})
            continue
        limit = min(left, 75 if stage.startswith("model") else 40)
        r = launch(stage, work, limit, out / "fsdp_diag.log", args.device)
        results.append(r)
        print(f"[fsdp_diag] {stage}: rc {r['rc']} in {r['seconds']} s; rank 0 reached '{r['last_rank0']}', "
              f"rank 1 '{r['last_rank1']}' {' '.join(r['signals'])}", flush=True)
    (out / "fsdp_diag.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| stage | rc | rank 0 reached | rank 1 reached | s |\n|---|---|---|---|---|")
    for r in results:
        if r.get("skipped"):
            print(f"| {r['stage']} | skipped | {r['skipped']} | | |")
        else:
            print(f"| {r['stage']} | {r['rc']} | {r['last_rank0']} | {r['last_rank1']} | {r['seconds']} |")
    for r in results:  # where it crashed, from faulthandler (the whole output is in fsdp_diag.log)
        if r.get("faulthandler"):
            print(f"\n{r['stage']} ({' '.join(r['signals'])}):\n" + "\n".join(r["faulthandler"]))


if __name__ == "__main__":
    main()
