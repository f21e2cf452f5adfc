"""Time QLoRA training steps on one GPU: finetune.py's own step beside two plain-library references and each lever.

    python bench/bench_train.py --model CKPT_DIR --data PACKED_DIR --configs textbook,noupcast,fast --seq 8192 \
        --out results.jsonl [--profile fast]

Configurations (CONFIGS below) are built from the same 4-bit NF4 base loaded with from_pretrained:
  textbook   the notebook recipe: prepare_model_for_kbit_training (norms, embeddings, lm_head upcast to fp32;
             gradient checkpointing on every block), peft LoRA (fp32 adapters, peft's default), sdpa attention over
             the whole row (documents NOT kept apart, as a notebook would do), HF's loss (fp32 logits), paged 8-bit AdamW
  noupcast   the same without the fp32 upcast
  +levers    noupcast with one more lever each (bf16 LoRA compute, Liger fused linear-CE, Liger RMSNorm/SwiGLU/RoPE,
             flex attention with a document mask, fused SwiGLU+down, fewer checkpointed blocks)
  finetune   finetune.py's own model setup, data path and step (qlora.model / qlora.data), as the user runs it
Each configuration runs warm-up steps, then timed steps (CUDA-synchronised wall clock per optimizer step); we report
the median tokens/s, peak allocated / reserved memory over the whole run, the step-0 loss (same first batch for all),
and MFU from the FLOP count in `flops_per_step` (written out term by term; the recomputed and the input-gradient
matmuls counted separately).

Configs that do not need a fresh model share one loaded base: LoRA is added and removed (peft unload) around each, and
memory peaks are reset in between (after emptying the allocator cache). textbook (which casts the base) and finetune
(its own loader) each get their own process. Results go to --out as JSON lines, one per configuration.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> recipe. Keys: upcast (prepare_model_for_kbit_training), attn (sdpa|flex_attention), doc_mask (position ids
# restart per document, so attention keeps documents apart), adapters (fp32|bf16 storage), fast_lora, liger (norm,
# swiglu, rope), fused_mlp, loss (hf|liger), ckpt (-1 all blocks, N first N blocks, 0 none), reentrant.
BASE_REF = dict(upcast=False, attn="sdpa", doc_mask=False, adapters="fp32", fast_lora=False, liger=False,
                fused_mlp=False, loss="hf", ckpt=-1, reentrant=True)
FAST = dict(BASE_REF, attn="flex_attention", doc_mask=True, fast_lora=True, liger=True, fused_mlp=True, loss="liger",
            reentrant=False)
CONFIGS = {
    "textbook": dict(BASE_REF, upcast=True),
    "noupcast": dict(BASE_REF),
    "noupcast_docmask": dict(BASE_REF, doc_mask=True),                      # sdpa + 4D document mask
    "lever_bf16_lora": dict(BASE_REF, fast_lora=True),                       # bf16 LoRA compute, one addmm
    "lever_flce": dict(BASE_REF, fast_lora=True, loss="liger"),
    "lever_liger": dict(BASE_REF, fast_lora=True, loss="liger", liger=True),
    "lever_flex_docmask": dict(BASE_REF, fast_lora=True, loss="liger", liger=True, attn="flex_attention",
                               doc_mask=True, reentrant=False),
    "lever_fused_mlp": dict(FAST),                                           # all blocks checkpointed
    "fast_ckpt16": dict(FAST, ckpt=16),
    "fast_ckpt8": dict(FAST, ckpt=8),
    "fast_ckpt4": dict(FAST, ckpt=4),
    "fast_ckpt0": dict(FAST, ckpt=0),
    "liger_only_ckpt0": dict(BASE_REF, fast_lora=True, loss="liger", liger=True, attn="flex_attention",
                             doc_mask=True, reentrant=False, ckpt=0),
    # torch.compile of each decoder block (inductor fuses the elementwise work and removes most Python overhead)
    "compile_fast_ckpt0": dict(FAST, ckpt=0, compile=True),                 # with Liger's kernels inside
    "compile_noliger_ckpt0": dict(FAST, ckpt=0, liger=False, fused_mlp=False, compile=True),  # inductor's own fusion
}


# ----------------------------------------------------------------------------------------------------------------
# FLOP count (per optimizer step). Multiply-add = 2 FLOPs. Frozen 4-bit weights get no weight gradient; their
# backward is one input-gradient matmul of the same size as the forward. A checkpointed block runs its forward twice.
# ----------------------------------------------------------------------------------------------------------------
def flops_per_step(cfg: dict, *, tokens: int, segments_rows: list[list[int]], ckpt_blocks: int, lora_r: int = 64,
                   attn_bwd_factor: float = 2.5) -> dict:
    """FLOPs of one step over `tokens` positions. segments_rows: per row, the lengths attention treats as separate
    causal sequences ([seq] for plain causal attention; the documents plus the padding tail with a document mask)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * (h // heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out) of the 7 projections
    block_params = sum(i * o for i, o in shapes)
    lora_params = sum(lora_r * (i + o) for i, o in shapes)
    pairs = sum(n * (n + 1) // 2 for row in segments_rows for n in row)  # causal (query, key) pairs computed
    attn_fwd = 4 * pairs * h * layers           # QK^T and PV: 2 FLOPs x head_dim x heads per pair, each
    f = {}
    f["block_matmul_fwd"] = 2 * block_params * layers * tokens
    f["block_matmul_recompute"] = 2 * block_params * ckpt_blocks * tokens
    f["block_matmul_bwd_input_grad"] = 2 * block_params * layers * tokens      # frozen: no weight gradient
    f["lora_fwd"] = 2 * lora_params * layers * tokens
    f["lora_recompute"] = 2 * lora_params * ckpt_blocks * tokens
    f["lora_bwd_input_and_weight_grad"] = 4 * lora_params * layers * tokens
    f["attention_fwd"] = attn_fwd
    f["attention_recompute"] = attn_fwd * ckpt_blocks // layers
    f["attention_bwd"] = int(attn_bwd_factor * attn_fwd)  # flash-style: recompute QK^T, then dV, dP, dQ, dK
    f["lm_head_fwd"] = 2 * h * v * tokens
    f["lm_head_bwd_input_grad"] = 2 * h * v * tokens       # frozen lm_head: no weight gradient
    f["model_flops"] = sum(val for k, val in f.items() if "recompute" not in k)   # what MFU counts
    f["hardware_flops"] = f["model_flops"] + f["block_matmul_recompute"] + f["lora_recompute"] + f["attention_recompute"]
    f["per_token_gflop_model"] = f["model_flops"] / tokens / 1e9
    f["per_token_gflop_hardware"] = f["hardware_flops"] / tokens / 1e9
    return f


def attention_segments(batch: dict, seq: int, doc_mask: bool) -> list[list[int]]:
    if not doc_mask:
        return [[seq] for _ in batch["doc_lens"]]
    return [list(r) + ([seq - sum(r)] if seq > sum(r) else []) for r in batch["doc_lens"]]


# ----------------------------------------------------------------------------------------------------------------
def load_rows(data_dir: str, n_rows: int, seq: int):
    """First n_rows packed rows of the train split (contract 3 parquet), as lists."""
    import pyarrow.parquet as pq

    shards = sorted((Path(data_dir) / "train").glob("shard-*.parquet"))
    rows = []
    for shard in shards:
        t = pq.read_table(shard, columns=["input_ids", "labels", "doc_lens"]).to_pylist()
        rows.extend(t)
        if len(rows) >= n_rows:
            break
    if len(rows) < n_rows:
        raise SystemExit(f"{data_dir}: only {len(rows)} rows, need {n_rows}")
    if any(len(r["input_ids"]) != seq for r in rows):
        raise SystemExit(f"{data_dir}: rows are not {seq} tokens long")
    return rows[:n_rows]


def _cuda():
    import torch

    return torch.cuda.is_available()


def _sync():
    import torch

    if _cuda():
        torch.cuda.synchronize()


def _mem():
    """(peak allocated, peak reserved) bytes; zeros on CPU (smoke runs)."""
    import torch

    return (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if _cuda() else (0, 0)


def _reset_mem():
    import torch

    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make_batch(rows, device):
    import torch

    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    pos = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        start = 0
        for n in list(r["doc_lens"]) + [ids.shape[1] - sum(r["doc_lens"])]:
            if n > 0:
                pos[b, start:start + n] = torch.arange(n)
                start += n
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device),
            "doc_lens": [list(r["doc_lens"]) for r in rows]}


def load_base(model_dir: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0 if _cuda() else "cpu"}, attn_implementation=attn)
    model.config.use_cache = False
    return model, time.time() - t0


def hf_loss_sum(model, batch, use_doc_mask):
    """The plain-library loss: HF computes fp32 logits for every position and its shifted cross-entropy."""
    kw = {"position_ids": batch["position_ids"]} if use_doc_mask else {}
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **kw)
    n = (batch["labels"][:, 1:] != -100).sum()
    return out.loss * n, n


def liger_loss_sum(model, batch, use_doc_mask):
    import torch.nn.functional as F

    from qlora.speed import fused_linear_ce_sum

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = {"position_ids": batch["position_ids"]} if use_doc_mask else {}
    hidden = inner.model(input_ids=batch["input_ids"], use_cache=False, **kw).last_hidden_state
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    n = (targets != -100).sum()
    return fused_linear_ce_sum(hidden, inner.lm_head.weight, targets), n


def run_steps(step_fn, batches, warmup, steps, profile_path=None):
    import torch

    times, losses = [], []
    _sync()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step_fn(batches[i % len(batches)])
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    prof_table = None
    if profile_path:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step_fn(batches[0])
            _sync()
        ka = prof.key_averages()
        prof_table = ka.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
        Path(profile_path).write_text(prof_table)
    return times, losses


def bench_config(name, recipe, base, cfg_dict, args, batches):
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora import speed
    from qlora.llama3 import LORA_TARGETS

    torch.manual_seed(0)
    model = base
    if recipe["upcast"]:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    model.set_attn_implementation(recipe["attn"])
    lcfg = LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg, autocast_adapter_dtype=(recipe["adapters"] == "fp32"))
    if not recipe["upcast"]:
        if recipe["ckpt"] != 0 and recipe["reentrant"]:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    ckpt_blocks = cfg_dict["num_hidden_layers"]
    if not recipe["reentrant"]:
        ckpt_blocks = speed.checkpoint_layers(model, recipe["ckpt"])
    elif recipe["ckpt"] == 0:
        ckpt_blocks = 0
    if recipe["fast_lora"]:
        speed.apply_fast_lora(model)
    if recipe["liger"]:
        speed.apply_liger(model)
    if recipe["fused_mlp"]:
        speed.apply_fused_mlp(model)
    if recipe.get("compile"):
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 64
        for layer in speed.decoder_layers(model):
            layer.compile()
    model.train()
    loss_fn = liger_loss_sum if recipe["loss"] == "liger" else hf_loss_sum
    params = [p for p in model.parameters() if p.requires_grad]
    import bitsandbytes as bnb

    opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4, weight_decay=0.0) if _cuda() else torch.optim.AdamW(params, lr=1e-4)

    def step(batch):
        loss_sum, n = loss_fn(model, batch, recipe["doc_mask"])
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss_sum.detach() / n)

    _reset_mem()
    steps = args.steps_slow if recipe["upcast"] else args.steps
    warm = 1 if recipe["upcast"] else args.warmup
    prof = os.path.join(args.profile_dir, f"profile_{name}_s{args.seq}.txt") if name in args.profile else None
    times, losses = run_steps(step, batches, warm, steps, prof)
    peak_alloc, peak_res = _mem()
    tok = args.seq * args.mb
    med = statistics.median(times[warm:])
    # FLOPs averaged over the batches the timed steps cycled through
    fls = [flops_per_step(cfg_dict, tokens=tok, segments_rows=attention_segments(b, args.seq, recipe["doc_mask"]),
                          ckpt_blocks=ckpt_blocks, lora_r=args.lora_r) for b in batches]
    fl = {k: sum(f[k] for f in fls) / len(fls) for k in fls[0]}
    res = dict(config=name, recipe=recipe, seq=args.seq, mb=args.mb, ckpt_blocks=ckpt_blocks,
               tokens_per_s=tok / med, step_s_median=med, step_s=times, step0_loss=losses[0], losses=losses,
               peak_alloc_gib=peak_alloc / 2**30, peak_reserved_gib=peak_res / 2**30,
               model_tflops_per_s=fl["model_flops"] / med / 1e12, hw_tflops_per_s=fl["hardware_flops"] / med / 1e12,
               flops=fl, trainable=sum(p.numel() for p in params))
    # undo: drop optimizer, adapters and patches so the base serves the next configuration
    del opt, params
    base_back = model.unload()
    for m in base_back.modules():
        for attr in ("forward", "_plain_forward", "_fused_mlp", "_peft_forward", "_plain_attn_forward"):
            if attr in m.__dict__:
                delattr(m, attr)
    speed.checkpoint_layers(base_back, 0)
    if hasattr(base_back, "disable_input_require_grads"):
        base_back.disable_input_require_grads()
    if recipe.get("compile"):
        for layer in speed.decoder_layers(base_back):
            layer._compiled_call_impl = None
    del model
    _reset_mem()
    return res, base_back


def child(args):
    import torch
    import transformers

    names = args.configs.split(",")
    rows = load_rows(args.data, args.mb * max(2, args.batches), args.seq)
    batches = [make_batch(rows[i * args.mb:(i + 1) * args.mb], "cuda" if _cuda() else "cpu") for i in range(len(rows) // args.mb)]
    cfg_dict = json.loads((Path(args.model) / "config.json").read_text())
    base, load_s = load_base(args.model, "sdpa")
    print(f"[bench] loaded base in {load_s:.0f}s; torch {torch.__version__} transformers {transformers.__version__}",
          flush=True)
    for name in names:
        recipe = CONFIGS[name]
        t0 = time.time()
        try:
            res, base = bench_config(name, recipe, base, cfg_dict, args, batches)
        except torch.cuda.OutOfMemoryError as e:
            res = dict(config=name, recipe=recipe, seq=args.seq, mb=args.mb, error=f"OOM: {str(e)[:200]}",
                       peak_alloc_gib=_mem()[0] / 2**30)
            print(f"[bench] {name}: OOM", flush=True)
            # a half-built configuration cannot be undone reliably: stop this process, the parent starts another
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
            sys.exit(3)
        except Exception as e:  # record and stop: the shared base may be in an unknown state
            traceback.print_exc()
            res = dict(config=name, recipe=recipe, seq=args.seq, mb=args.mb, error=f"{type(e).__name__}: {e}"[:400])
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
            sys.exit(4)
        res.update(wall_s=time.time() - t0, load_s=load_s,
                   device=torch.cuda.get_device_name() if _cuda() else "cpu",
                   torch=torch.__version__, transformers=transformers.__version__)
        print(f"[bench] {name} seq={args.seq} mb={args.mb}: {res['tokens_per_s']:.0f} tok/s, "
              f"alloc {res['peak_alloc_gib']:.1f} GiB, reserved {res['peak_reserved_gib']:.1f} GiB, "
              f"loss0 {res['step0_loss']:.4f}, {res['model_tflops_per_s']:.0f} model TFLOP/s", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


# finetune.py's own step: name -> extra flags. --gpu-memory-gib 40 plans for an A100-40GB whatever GPU runs it.
FINETUNE = {
    "finetune": ["--gpu-memory-gib", "40"],
    "finetune_lowmem": ["--low-memory"],
    "finetune_plain": ["--kernels", "none", "--checkpoint-layers", "all"],
    "finetune_adamw8bit": ["--gpu-memory-gib", "40", "--optimizer", "adamw_8bit"],   # not paged
    # the code before the lm_head ran on labelled tokens only: Liger's fused linear-CE over every position of the row
    "finetune_lmhead_all": ["--gpu-memory-gib", "40"],
}
# finetune.py with qlora.loss.labelled_rows flattening without dropping unlabelled positions (the reference above)
LMHEAD_ALL = ("import runpy, sys, qlora.loss as L\n"
              "L.labelled_rows = lambda h, t: (h.reshape(-1, h.shape[-1]), t.reshape(-1))\n"
              "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_finetune(name: str, args) -> dict:
    """Run finetune.py itself for warm-up + timed optimizer steps (grad-accum 1) and read RUN/metrics.jsonl."""
    import shutil

    run = Path(args.finetune_dir) / name
    shutil.rmtree(run, ignore_errors=True)
    flags = FINETUNE[name] + args.finetune_args.split()
    launcher = ["-c", LMHEAD_ALL] if name.endswith("_lmhead_all") else []
    cmd = [sys.executable] + launcher + [str(ROOT / "finetune.py"), "--model", args.model, "--data", args.data, "--output-dir",
           str(run), "--max-steps", str(args.warmup + args.steps), "--grad-accum", "1", "--micro-batch-size",
           str(args.mb), "--eval-every", "0", "--eval-max-rows", "1", "--save-every", "100000", "--log-every", "1",
           "--warmup-steps", "0"] + flags
    print("[bench] " + " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.group_timeout)
    out = proc.stdout + proc.stderr
    Path(args.profile_dir, f"finetune_{name}_s{args.seq}_mb{args.mb}.log").write_text(out[-20000:])
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")] if (run / "metrics.jsonl").exists() else []
    recs = [r for r in recs if "tokens_per_s" in r]  # training steps, not validation records
    if proc.returncode != 0 or len(recs) < args.warmup + 1:
        return dict(config=name, seq=args.seq, mb=args.mb, error=f"rc {proc.returncode}: {out[-300:]}")
    timed = recs[args.warmup:]
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    cfg_dict = json.loads((Path(args.model) / "config.json").read_text())
    resolved = json.loads((run / "config.json").read_text())
    ckpt_n = int(resolved["resolved"]["checkpoint_layers"])
    ckpt_blocks = cfg_dict["num_hidden_layers"] if ckpt_n < 0 else ckpt_n
    all_rows = []  # FLOPs averaged over this data set's rows (documents kept apart)
    import pyarrow.parquet as pq
    for shard in sorted((Path(args.data) / "train").glob("shard-*.parquet")):
        all_rows += pq.read_table(shard, columns=["doc_lens"]).to_pylist()
    segs = [list(r["doc_lens"]) + ([args.seq - sum(r["doc_lens"])] if args.seq > sum(r["doc_lens"]) else [])
            for r in all_rows]
    fls = [flops_per_step(cfg_dict, tokens=args.seq, segments_rows=[sg], ckpt_blocks=ckpt_blocks,
                          lora_r=args.lora_r) for sg in segs]
    fl = {k: sum(f[k] for f in fls) / len(fls) * args.mb for k in fls[0]}
    fl["per_token_gflop_model"] /= args.mb
    fl["per_token_gflop_hardware"] /= args.mb
    med = args.seq * args.mb / tok_s
    est_line = next((line.strip() for line in out.splitlines() if "estimated peak GPU mem" in line), "")
    return dict(config=name, recipe={"finetune_flags": flags}, seq=args.seq, mb=args.mb, ckpt_blocks=ckpt_blocks,
                tokens_per_s=tok_s, step_s_median=med, step_s=[r["step_time_s"] for r in recs],
                step0_loss=recs[0]["loss"], losses=[r["loss"] for r in recs],
                peak_alloc_gib=max(r.get("gpu_mem_allocated_gib", 0) for r in recs),
                peak_reserved_gib=max(r.get("gpu_mem_reserved_gib", 0) for r in recs),
                model_tflops_per_s=fl["model_flops"] / med / 1e12, hw_tflops_per_s=fl["hardware_flops"] / med / 1e12,
                flops=fl, estimate=est_line, resolved=resolved.get("resolved"), wall_s=time.time() - t0,
                kernels=resolved["resolved"].get("kernels"), command=" ".join(cmd[1:]))


def parent(args):
    """Run the configurations in groups (one process per group) and keep going after a failed group."""
    groups, shared = [], []
    for name in args.configs.split(","):
        if name in FINETUNE:
            try:
                res = run_finetune(name, args)
            except Exception as e:  # record and go on with the rest
                res = dict(config=name, seq=args.seq, mb=args.mb, error=f"{type(e).__name__}: {e}"[:400])
            print(f"[bench] {name}: " + (res.get("error") or f"{res['tokens_per_s']:.0f} tok/s, reserved "
                                         f"{res['peak_reserved_gib']:.1f} GiB, loss0 {res['step0_loss']:.4f}"), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
            continue
        if name == "textbook":
            groups.append([name])
        else:
            shared.append(name)
    if shared:
        groups.append(shared)
    for group in groups:
        todo = list(group)
        while todo:
            done_before = _done(args.out)
            cmd = [sys.executable, __file__, "--child"] + [a for a in sys.argv[1:] if a != "--child"]
            i = cmd.index("--configs")
            cmd[i + 1] = ",".join(todo)
            print(f"[bench] running {todo}", flush=True)
            try:
                subprocess.run(cmd, timeout=args.group_timeout)
            except subprocess.TimeoutExpired:
                print(f"[bench] group {todo} timed out", flush=True)
            done = _done(args.out) - done_before
            todo = [n for n in todo if n not in done]
            if todo and not done:
                # the first one failed without a record: record and skip it
                with open(args.out, "a") as f:
                    f.write(json.dumps(dict(config=todo[0], seq=args.seq, mb=args.mb, error="no result")) + "\n")
                todo = todo[1:]


def _done(path):
    if not os.path.exists(path):
        return set()
    return {json.loads(line)["config"] for line in open(path) if line.strip()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Llama-3-8B-shaped checkpoint dir (bench/build_8b_checkpoint.py)")
    ap.add_argument("--data", required=True, help="pretokenize.py output dir (packed rows)")
    ap.add_argument("--configs", default="textbook,noupcast,fast_ckpt8", help="comma list of: " + ",".join(CONFIGS))
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--mb", type=int, default=1, help="micro-batch (rows per step)")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    ap.add_argument("--steps-slow", type=int, default=3, help="timed steps for the (slow) textbook recipe")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    ap.add_argument("--profile", default="", help="comma list of configs to profile one extra step of")
    ap.add_argument("--profile-dir", default=".")
    ap.add_argument("--out", required=True, help="JSON lines file results are appended to")
    ap.add_argument("--group-timeout", type=int, default=900)
    ap.add_argument("--finetune-args", default="", help="extra finetune.py flags for the finetune configs")
    ap.add_argument("--finetune-dir", default="/tmp/bench_runs", help="run directories of the finetune configs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.profile = [p for p in args.profile.split(",") if p]
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
