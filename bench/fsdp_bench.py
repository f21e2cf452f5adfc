"""Issue 12 on one GPU: QLoRA under FSDP2 (qlora/fsdp.py) checked and measured, against qlora/memory.py's estimate.

    python bench/fsdp_bench.py --out OUT [--layers 4] [--budget-s 400]      (bash bench/device_run.sh fsdp)

1. probe: do gloo's all-gather and reduce-scatter (average) work on CUDA tensors? FSDP over 2 processes on one GPU
   needs them (NCCL refuses two ranks on one device).
2. equality on the fast path: a small Llama-3-shaped model (hidden 512, 4 untied blocks, rows of 512 tokens) with
   Liger's kernels, the fused SwiGLU+down, bf16 LoRA addmm, flex attention, the fused linear-CE and 2 of 4 blocks
   recomputed: one process with grad-accum 2 against 2 FSDP ranks on cuda:0 (gloo), 4 steps (tests/fsdp_driver.py);
   and, to tell the sharding from the rest, FSDP over a group of one and one process with the 4-bit bytes stored
   as bf16 (uint8 otherwise), each with grad-accum 2. --check-gathered compares every weight the 2 ranks gather
   with the weight before sharding, --trace-first-forward every module's output with one process's (where they
   part), --equality-variants the same pair on other paths.
   Should the 2 ranks fail (the first H200 call's SIGSEGV; bench/fsdp_diag.py bisects it), they run once more with
   FSDP's collectives staged through CPU tensors (fsdp_driver.py --stage-through-cpu, a harness device only), and the
   70B-wide FSDP run below does the same; the table says so.
3. Llama-3-70B's width with --layers of its 80 blocks (bench/build_8b_checkpoint.py --shape 70b; a whole random
   70B does not fit the machine's disk), seq 8192, LoRA r=64 on the 7 projections, paged 8-bit AdamW, fast path,
   no recompute: one process (tokens/s, MFU, peak memory; --skip-big-one leaves it out) and FSDP over 2 processes on
   cuda:0 with 0 and 2 blocks recomputed (peak memory per process, by part of the step, and the peak while loading;
   its speed through gloo and one shared GPU means nothing). Each measured
   peak is set beside estimate_memory for the same configuration (target: within 10%).
Prints a table last and writes OUT/fsdp.json; every run's output goes to OUT/fsdp_runs.log.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
DRIVER = ROOT / "tests" / "fsdp_driver.py"
GiB = 2**30
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, datasheet

PROBE = r'''
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.cuda.set_device(0)
r, w = dist.get_rank(), dist.get_world_size()
x = torch.arange(4, dtype=torch.float32, device="cuda") + 10 * r
gathered = torch.empty(4 * w, device="cuda")
dist.all_gather_into_tensor(gathered, x)
out = torch.empty(4 // w, device="cuda")
dist.reduce_scatter_tensor(out, x, op=dist.ReduceOp.AVG)
want = (torch.arange(4, dtype=torch.float32) + 10 * (w - 1) / 2)[r * 4 // w:(r + 1) * 4 // w]
assert torch.equal(out.cpu(), want) and gathered.numel() == 4 * w, (out, want)
from torch.distributed.device_mesh import init_device_mesh
mesh = init_device_mesh("cuda", (w,))  # what qlora.fsdp.shard builds on
print(f"probe rank {r}: gloo all_gather_into_tensor and reduce_scatter_tensor(AVG) on CUDA: ok; "
      f"mesh backend {dist.get_backend(mesh.get_group())}")
dist.destroy_process_group()
'''


class Runner:
    """Subprocesses under one deadline, their output appended to one log."""

    def __init__(self, log: Path, budget_s: float):
        self.log, self.start, self.deadline = log, time.time(), time.time() + budget_s
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "4",
                    "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's Python stack

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, cmd: list, limit_s: float) -> tuple[int, str]:
        limit = min(limit_s, self.left())
        if limit < 30:
            return -1, f"skipped: {self.left():.0f} s of the budget left"
        t0 = time.time()
        # a session of its own: on timeout the whole group goes (torchrun's workers too, and their GPU memory)
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            text, _ = p.communicate(timeout=limit)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            text, _ = p.communicate()
            rc, text = 124, f"{text}\ntimed out after {limit:.0f} s"
        with open(self.log, "a") as f:
            f.write(f"\n===== {name} (rc {rc}, {time.time() - t0:.0f} s): {' '.join(map(str, cmd))}\n{text}")
        print(f"[fsdp_bench +{time.time() - self.start:.0f}s] {name}: rc {rc} in "
              f"{time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            print("\n".join(text.strip().splitlines()[-15:]), flush=True)
        return rc, text


def torchrun(n: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def driver_result(out: Path) -> dict | None:
    f = out / "result.json"
    return json.loads(f.read_text()) if f.is_file() else None


def compare_runs(one: dict, two: dict, a_dir: Path, b_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    la, lb = one["losses"], two["losses"]
    rel = max(abs(la[s] - lb[s]) / abs(la[s]) for s in la)
    wa = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    scale = max(float(t.abs().max()) for t in wa.values())
    return {"losses_one_process": la, "losses_fsdp": lb, "max_rel_loss_diff": rel, "max_abs_lora_diff": diff,
            "max_abs_lora": scale, "same_keys": wa.keys() == wb.keys(),
            "lora_b_trained": any(float(t.abs().max()) > 0 for k, t in wa.items() if "lora_B" in k),
            "torch_equal_all": all(torch.equal(wa[k], wb[k]) for k in wa)}


def model_flops_per_token(cfg: dict, data_dir: Path, lora_r: int) -> float:
    """bench_train.py's count (no recompute), attention over the documents of the data's rows."""
    import pyarrow.parquet as pq

    from bench_train import flops_per_step

    seq = json.loads((data_dir / "metadata.json").read_text())["max_len"]
    segments = []
    for shard in sorted((data_dir / "train").glob("*.parquet")):
        for lens in pq.read_table(shard, columns=["doc_lens"]).column("doc_lens").to_pylist():
            segments.append(list(lens) + ([seq - sum(lens)] if seq > sum(lens) else []))
    f = flops_per_step(cfg, tokens=seq * len(segments), segments_rows=segments, ckpt_blocks=0, lora_r=lora_r)
    return f["model_flops"] / (seq * len(segments))


def step1_rows(res: dict) -> list:
    """Step 1's loss sums of each row, in stream order (rank 0's micro-batches, then rank 1's)."""
    return [x for rank in res["micro_losses_per_rank"] for x in rank.get("1", [])]


def first_divergence(one: dict, two: dict) -> list:
    """Per FSDP rank: the first module (in execution order) whose step-1 output differs from one process's output for
    the same row (fsdp_driver --trace-first-forward), with both sums, and how many of the outputs differ."""
    one_trace = (one.get("first_forward_trace_per_rank") or [{}])[0]
    found = []
    for rank, trace in enumerate(two.get("first_forward_trace_per_rank") or []):
        a, b = one_trace.get(str(rank), []), trace.get("0", [])
        differing = [(x, y) for x, y in zip(a, b) if x[1] != y[1] or x[0] != y[0]]
        first = differing[0] if differing else None
        found.append({"rank": rank, "modules": len(a), "modules_fsdp": len(b), "differing": len(differing),
                      "first": None if first is None else {"one_process": first[0], "fsdp": first[1]}})
    return found


def equality_variants(runner: Runner, work: Path, small: Path, rows512: Path, eq_one: Path, wanted: list) -> dict:
    """--equality-variants: step-1 row losses and the whole comparison for each variant (see its help)."""
    common = ["--device", "cuda", "--steps", 4, "--lora-r", 16, "--model", small, "--data", rows512]
    paths = {"plain": ["--kernels", "none", "--attn", "sdpa", "--checkpoint-layers", 0],
             "fast_sdpa": ["--kernels", "liger", "--attn", "sdpa", "--checkpoint-layers", 2]}
    found = {}
    for name, flags in paths.items():
        if name not in wanted:
            continue
        one, two = work / f"var_{name}_one", work / f"var_{name}_fsdp"
        runner.run(f"variant {name}: 1 process, grad-accum 2",
                   [sys.executable, DRIVER, *common, *flags, "--out", one, "--grad-accum", 2, "--trace-first-forward"],
                   120)
        runner.run(f"variant {name}: 2 FSDP ranks on cuda:0",
                   [*torchrun(2), DRIVER, *common, *flags, "--out", two, "--same-gpu", "--check-gathered",
                    "--trace-first-forward"], 150)
        a, b = driver_result(one), driver_result(two)
        if a and b:
            found[name] = {**compare_runs(a, b, one, two), "rows_one": step1_rows(a), "rows_fsdp": step1_rows(b),
                           "first_divergence": first_divergence(a, b),
                           "gathered_mismatches": [sum(1 for v in (r or {}).values() if v)
                                                   for r in b.get("gathered_mismatches_per_rank") or []]}
    if "concurrent" not in wanted:
        return found
    fast = ["--kernels", "liger", "--attn", "flex_attention", "--checkpoint-layers", 2, "--grad-accum", 2]
    together = [work / "var_concurrent_a", work / "var_concurrent_b"]
    cmds = [" ".join(map(str, [sys.executable, DRIVER, *common, *fast, "--out", d])) for d in together]
    runner.run("variant concurrent: two 1-process runs at once", ["bash", "-c", " & ".join(cmds) + " & wait"], 150)
    alone = driver_result(eq_one)
    for d in together:
        res = driver_result(d)
        if alone and res:
            found[d.name] = {**compare_runs(alone, res, eq_one, d), "rows_one": step1_rows(alone),
                             "rows_fsdp": step1_rows(res)}
    return found


def print_equality(report: dict) -> None:
    for key, label in (("equality", "2 FSDP ranks vs 1 process"),
                       ("fsdp_2_ranks_vs_1_rank", "2 FSDP ranks vs FSDP over 1 rank"),
                       ("fsdp_1_rank_vs_no_fsdp", "FSDP over 1 rank vs 1 process"),
                       ("float_vs_uint8_storage", "1 process: bf16-stored vs uint8-stored 4-bit")):
        eq = report.get(key)
        if eq:
            first_a, first_b = eq["losses_one_process"]["1"], eq["losses_fsdp"]["1"]
            print(f"fast path, {label} (4 steps): max relative loss difference {eq['max_rel_loss_diff']:.2e} "
                  f"(step 1: {abs(first_a - first_b) / first_a:.2e}), "
                  f"max |LoRA difference| {eq['max_abs_lora_diff']:.2e} of weights up to {eq['max_abs_lora']:.3f}; "
                  f"bit-identical adapters: {eq['torch_equal_all']}")
        else:
            print(f"fast path, {label}: not measured (see OUT/fsdp_runs.log)")
    mism = report.get("gathered_mismatches_per_rank")
    if mism and all(mism):
        for rank, counts in enumerate(mism):
            bad = {k: v for k, v in counts.items() if v}
            print(f"rank {rank}: {len(counts)} gathered weights checked bit for bit at their first forward; "
                  f"differing: {len(bad)}" + (f" {dict(list(bad.items())[:8])}" if bad else ""))
    rows = report.get("row_losses")
    if rows and rows.get("one_process") and rows.get("fsdp_2_ranks"):
        one, two = rows["one_process"][0], rows["fsdp_2_ranks"]
        for step in sorted(one, key=int)[:2]:
            print(f"step {step} loss sums per row: 1 process {one[step]}; FSDP ranks {[r.get(step) for r in two]}")
    for d in report.get("first_divergence") or []:
        print(f"fast path, rank {d['rank']}: {d['differing']} of {d['modules']} step-1 module outputs differ from one "
              f"process's; first: {d['first']}")
    for name, eq in (report.get("variants") or {}).items():
        for d in eq.get("first_divergence") or []:
            print(f"variant {name}, rank {d['rank']}: {d['differing']} of {d['modules']} outputs differ; "
                  f"first: {d['first']}")
        print(f"variant {name}: max relative loss difference {eq['max_rel_loss_diff']:.2e}, bit-identical "
              f"adapters {eq['torch_equal_all']}; step-1 rows {eq['rows_one']} vs {eq['rows_fsdp']}"
              + (f"; gathered weights differing per rank {eq['gathered_mismatches']}" if "gathered_mismatches" in eq
                 else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/fsdp-bench")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the 70B-wide model (1.7 GB of bf16 each on disk)")
    ap.add_argument("--budget-s", type=float, default=400, help="stop starting runs after this long")
    ap.add_argument("--fsdp-runs", default="0,2,0w",
                    help="the 70B-wide FSDP runs: blocks recomputed, 'w' for the input embeddings whole (0, 2, 0w)")
    ap.add_argument("--skip-isolation", action="store_true",
                    help="leave out the runs that tell sharding from FSDP's code path and the 4-bit storage")
    ap.add_argument("--equality-only", action="store_true",
                    help="only the probe and the equality of 2 FSDP ranks with 1 process")
    ap.add_argument("--equality-variants", default="",
                    help="after the equality run, find what makes 2 ranks differ from 1 process, comma-separated: "
                         "plain (the same pair without Liger, fused SwiGLU or flex attention), fast_sdpa (the fast "
                         "path with sdpa), concurrent (two independent 1-process runs at once on the GPU, no FSDP, "
                         "against the one run alone)")
    ap.add_argument("--skip-big-one", action="store_true",
                    help="leave out the 70B-wide one-process run (speed and MFU), e.g. when measured in an earlier call")
    args = ap.parse_args()
    import torch

    from qlora.memory import ALLOCATOR_SLACK_BYTES, CUDA_CONTEXT_BYTES, estimate_memory
    from qlora.tiny_model import build_tiny_llama3
    from shard_fixtures import random_rows, write_rows

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(out / "fsdp_runs.log", args.budget_s)
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 989.0)
    report: dict = {"gpu": gpu, "peak_tflops": peak, "torch": torch.__version__}

    # 1. gloo on CUDA tensors
    (work / "probe.py").write_text(PROBE)
    rc, text = runner.run("probe", [*torchrun(2), work / "probe.py"], 120)
    report["gloo_cuda_ok"] = rc == 0
    if rc != 0:
        report["gloo_cuda_error"] = [ln for ln in text.splitlines() if "Error" in ln][-3:]

    # 2. equality on the fast path
    small = work / "small"
    if not (small / "config.json").is_file():
        build_tiny_llama3(small, layers=4, hidden=512, intermediate=1024, heads=4, kv_heads=2,
                          tie_word_embeddings=False, tokenizer_style="meta")
    rows512 = work / "rows512"
    if not (rows512 / "metadata.json").is_file():
        write_rows(rows512, small, 512, random_rows(small, 24, 512, seed=1))
    fast = ["--device", "cuda", "--kernels", "liger", "--attn", "flex_attention", "--checkpoint-layers", 2,
            "--steps", 4, "--lora-r", 16, "--model", small, "--data", rows512]
    eq1, eq2 = work / "eq_one", work / "eq_fsdp"
    eq1_float, eq_fsdp1 = work / "eq_one_float_storage", work / "eq_fsdp_one_rank"
    runner.run("equality: 1 process, grad-accum 2", [sys.executable, DRIVER, *fast, "--out", eq1, "--grad-accum", 2,
                                                     "--trace-first-forward"], 120)
    staged = []  # becomes ["--stage-through-cpu"] if gloo's CUDA path fails under FSDP and the staged one does not
    if report["gloo_cuda_ok"]:
        rc, _ = runner.run("equality: 2 FSDP ranks on cuda:0", [*torchrun(2), DRIVER, *fast, "--out", eq2,
                                                                 "--same-gpu", "--check-gathered",
                                                                 "--trace-first-forward"], 150)
        if rc != 0:
            eq2 = work / "eq_fsdp_staged"
            rc, _ = runner.run("equality: 2 FSDP ranks on cuda:0, collectives staged through CPU",
                               [*torchrun(2), DRIVER, *fast, "--out", eq2, "--same-gpu", "--stage-through-cpu",
                                "--trace-first-forward"], 150)
            staged = ["--stage-through-cpu"] if rc == 0 else []
    # Should the two differ: is it the sharding (2 ranks vs FSDP over a group of one), or FSDP's code path itself
    # (one rank vs no FSDP), or only the 4-bit bytes stored as bf16 (no FSDP either way)?
    if not (args.equality_only or args.skip_isolation):
        runner.run("equality: FSDP over 1 rank, grad-accum 2", [sys.executable, DRIVER, *fast, "--out", eq_fsdp1,
                                                                 "--grad-accum", 2, "--fsdp"], 120)
        runner.run("equality: 1 process, grad-accum 2, 4-bit bytes stored as bf16",
                   [sys.executable, DRIVER, *fast, "--out", eq1_float, "--grad-accum", 2, "--quant-storage",
                    "compute"], 120)
    report["fsdp_collectives_staged_through_cpu"] = bool(staged)
    pairs = {"equality": (eq1, eq2), "fsdp_2_ranks_vs_1_rank": (eq_fsdp1, eq2),
             "fsdp_1_rank_vs_no_fsdp": (eq1, eq_fsdp1), "float_vs_uint8_storage": (eq1, eq1_float)}
    for key, (a, b) in pairs.items():
        if driver_result(a) and driver_result(b):
            report[key] = compare_runs(driver_result(a), driver_result(b), a, b)
    res1, res2 = driver_result(eq1), driver_result(eq2)
    if res2:
        report["gathered_mismatches_per_rank"] = res2.get("gathered_mismatches_per_rank")
        if res1:
            report["first_divergence"] = first_divergence(res1, res2)
        report["row_losses"] = {"one_process": (res1 or {}).get("micro_losses_per_rank"),
                                "fsdp_2_ranks": res2.get("micro_losses_per_rank")}
    if args.equality_variants:
        report["variants"] = equality_variants(runner, work, small, rows512, eq1, args.equality_variants.split(","))
    (out / "fsdp.json").write_text(json.dumps(report, indent=2) + "\n")  # so far, should the call run out of time
    if args.equality_only:
        print_equality(report)
        return

    # 3. 70B width, few blocks
    big = work / f"llama3-70b-width-{args.layers}"
    if not (big / "model.safetensors.index.json").is_file():
        runner.run("build 70B-wide checkpoint", [sys.executable, ROOT / "bench" / "build_8b_checkpoint.py", big,
                                                 "--shape", "70b", "--layers", args.layers], 150)
    cfg = json.loads((big / "config.json").read_text()) if (big / "config.json").is_file() else None
    rows8k = work / "rows8192"
    if cfg and not (rows8k / "metadata.json").is_file():
        write_rows(rows8k, big, 8192, random_rows(big, 12, 8192, seed=2))
    recipe = dict(seq_len=8192, micro_batch_size=1, lora_r=64, checkpoint_layers=0, kernels="liger", fused_mlp=True,
                  fused_loss=True, optimizer="paged_adamw_8bit")
    flags = ["--device", "cuda", "--kernels", "liger", "--attn", "flex_attention", "--checkpoint-layers", 0,
             "--lora-r", 64, "--min-8bit-size", 4096, "--lr", "1e-4", "--model", big, "--data", rows8k]
    measured = []
    if cfg:
        one = work / "big_one"
        if not args.skip_big_one:
            runner.run("70B-wide: 1 process", [sys.executable, DRIVER, *flags, "--steps", 4, "--out", one], 180)
        # (blocks recomputed, embeddings whole) -> run directory; qlora.fsdp shards the input embeddings, the third
        # run measures keeping them whole (no estimate: the estimator plans what finetune.py does)
        fsdp_runs = {(0, False): work / "big_fsdp", (2, False): work / "big_fsdp_ckpt2",
                     (0, True): work / "big_fsdp_whole_embeddings"}
        wanted = [(int(k.rstrip("w")), k.endswith("w")) for k in args.fsdp_runs.split(",") if k]
        fsdp_runs = {k: v for k, v in fsdp_runs.items() if k in wanted}
        if report["gloo_cuda_ok"]:
            for (n_ckpt, whole_emb), run_dir in fsdp_runs.items():
                runner.run(f"70B-wide: FSDP, 2 processes on cuda:0, {n_ckpt} blocks recomputed"
                           + (", embeddings whole" if whole_emb else ""),
                           [*torchrun(2), DRIVER, *flags, "--checkpoint-layers", n_ckpt, "--steps", 3,
                            "--out", run_dir, "--same-gpu", *staged, *(["--whole-embeddings"] if whole_emb else [])],
                           240)
        flops_tok = model_flops_per_token(cfg, rows8k, 64)
        configs = [("1 process", one, 1, "ddp", 0, False)] + [
            (f"FSDP 2 processes, {n} blocks recomputed" + (", embeddings whole" if e else ""), d, 2, "fsdp", n, e)
            for (n, e), d in fsdp_runs.items()]
        for name, run_dir, world, parallelism, n_ckpt, whole_emb in configs:
            res = driver_result(run_dir)
            if not res:
                continue
            est = estimate_memory(cfg, world_size=world, parallelism=parallelism, **{**recipe, "checkpoint_layers": n_ckpt})
            mem = res["memory_per_rank"]
            entry = {"config": name, "world_size": world, "tokens_per_s": res["tokens_per_s"],
                     "step_times_s": res["step_times_s"], "losses": res["losses"],
                     "peak_reserved_gib": max(m["peak_reserved_gib"] for m in mem),
                     "peak_allocated_gib": max(m["peak_allocated_gib"] for m in mem),
                     "load_peak_allocated_gib": max(m["load_peak_allocated_gib"] for m in mem),
                     "phase_peaks_gib": [m.get("phase_peaks_gib") for m in mem],
                     "est_peak_reserved_gib": None if whole_emb else est.peak_reserved_bytes / GiB,
                     "est_peak_allocated_gib": None if whole_emb else est.peak_allocated_bytes / GiB,
                     # load_bytes counts the allocator slack and the CUDA context: compare what torch allocated
                     "est_load_allocated_gib": ((est.load_bytes - ALLOCATOR_SLACK_BYTES - CUDA_CONTEXT_BYTES) / GiB
                                                if est.load_bytes else None),
                     "estimate_table": est.table(140)}
            if world == 1:
                entry["model_gflop_per_token"] = flops_tok / 1e9
                entry["mfu"] = flops_tok * res["tokens_per_s"] / (peak * 1e12)
            measured.append(entry)
    report["measured"] = measured
    (out / "fsdp.json").write_text(json.dumps(report, indent=2) + "\n")

    # the table, last
    print(f"\nFSDP bench on {gpu} (torch {torch.__version__}); gloo on CUDA: "
          f"{'ok' if report['gloo_cuda_ok'] else 'FAILED ' + str(report.get('gloo_cuda_error'))}"
          + ("; FSDP's collectives STAGED THROUGH CPU (the plain 2-rank run failed)" if staged else ""))
    print_equality(report)
    print(f"\n| 70B width, {args.layers} blocks, seq 8192 | tokens/s | MFU | peak reserved GiB (est, diff) | "
          f"peak allocated GiB (est, diff) | load peak allocated GiB (est) |")
    print("|---|---|---|---|---|---|")
    for m in measured:
        def cell(meas, est):
            return f"{meas:.2f} ({est:.2f}, {100 * (est - meas) / meas:+.1f}%)" if est is not None else f"{meas:.2f}"
        mfu = f"{100 * m['mfu']:.1f}%" if "mfu" in m else "n/a (gloo)"
        tps = f"{m['tokens_per_s']:.0f}" if m["world_size"] == 1 else "n/a (gloo)"
        load = (f"{m['load_peak_allocated_gib']:.2f} ({m['est_load_allocated_gib']:.2f})"
                if m.get("est_load_allocated_gib") else f"{m['load_peak_allocated_gib']:.2f}")
        print(f"| {m['config']} | {tps} | {mfu} | {cell(m['peak_reserved_gib'], m['est_peak_reserved_gib'])} | "
              f"{cell(m['peak_allocated_gib'], m['est_peak_allocated_gib'])} | {load} |")
    for m in measured:
        phases = (m.get("phase_peaks_gib") or [None])[0]
        if phases:
            print(f"{m['config']}, rank 0, peak allocated / reserved GiB by part of the step: "
                  + ", ".join(f"{k} {v['allocated']:.2f} / {v['reserved']:.2f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
