#!/usr/bin/env python
"""QLoRA fine-tuning of a local Llama-3 base on pretokenize.py's packed parquet shards.

    python finetune.py --model Meta-Llama-3-8B --data tok --output-dir runs/r1 --epochs 1
    torchrun --nproc_per_node=4 finetune.py --model ... (DDP: one process per GPU, same flags)
    python finetune.py --config recipe.yaml --max-steps 2000     (command line overrides the YAML file)
    python finetune.py --estimate-memory --seq-len 16384 --nproc 4 --gpu-memory-gib 40
        (peak GPU memory plan, nothing loaded; exit status 0 if it fits, 1 and the settings to change if not)

Recipe (defaults) and what each choice costs:
  * base in 4-bit NF4 + double quantization, bf16 compute (fp32 on the CPU, where bf16 is slow; --compute-dtype): ~5.7 GB of weights for 8B instead of 16 GB; every
    matmul dequantises on the fly (slower than bf16 weights). Norms/embeddings/lm_head stay bf16 and frozen. We do
    NOT call peft.prepare_model_for_kbit_training: its fp32 upcast of the norms ran the whole 8B network in fp32,
    4.4x slower and 2x larger.
  * LoRA r=64, alpha=16, dropout 0 on q/k/v/o/gate/up/down of every block (167,772,160 params on Llama-3-8B);
    LoRA weights kept in fp32 (small), all matmuls in bf16 (on the GPU fast path the LoRA pair and its scaled add
    run as one bf16 addmm: +40% over peft's fp32 adapters, bench/RESULTS.md).
  * paged 8-bit AdamW: 2 bytes/param of optimizer state instead of 8, paged to CPU on memory spikes.
  * gradient checkpointing (non-reentrant) of as many blocks as memory needs (--checkpoint-layers auto, planned
    from qlora/memory.py's estimate): each recomputed block costs a third more of its matmuls and saves ~0.8 GiB
    at seq 8192 on Llama-3-8B. On a 40 GB card one process at seq 8192 needs none (+33% over recomputing all);
    --low-memory recomputes every block (~10 GiB).
  * packed rows keep documents apart: position ids restart at every document, attention_mask=None, so
    transformers builds a per-document causal mask; no loss on padding, masked prompts or across documents.
  * loss = sum of token cross-entropies / label tokens of the whole global batch (all micro-batches, all ranks):
    N processes give the same update as one process with the same global batch. The [tokens x 128256] logits
    never exist whole: Liger's fused linear-cross-entropy on the GPU fast path (-10 GiB at seq 8192), chunks of
    --loss-chunk-size tokens (qlora/loss.py) on the plain path and on CPU.
  * warm-up + cosine LR, gradient clipping, gradient accumulation; checkpoints (adapter, optimizer, scheduler,
    RNG, data position) every --save-every steps, last --keep-checkpoints kept; --resume auto continues.
  * stop protocol: RUN/stop_requested or SIGUSR1 -> checkpoint at the next step boundary, status "stopped", exit 0.
Outputs in --output-dir: config.json, metrics.jsonl, tensorboard/, checkpoints/step-NNNNNNN/, adapter/,
status.json.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

# Expandable segments: the allocator grows segments in place instead of leaving ~2-3 GiB fragmented at the peak
# (measured, bench/RESULTS.md). Must be set before CUDA initialises; an explicit setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

from qlora.atomic import atomic_dir, write_json_atomic
from qlora.checkpoint import (capture_rng, check_fingerprint, is_checkpoint, load_checkpoint, read_trainer_state,
                              run_fingerprint, save_checkpoint)
from qlora.config import TrainConfig, as_dict, resolve_config
from qlora.data import PackedShards, StreamOrder, check_data, read_metadata, step_micro_batches
from qlora.distributed import Dist, lora_digest
from qlora.errors import UserError, run_main
from qlora.loss import count_label_tokens
from qlora.model import (TrainStep, apply_lora, check_bitsandbytes, count_parameters, dtype_name, load_base_model,
                         resolve_attn_implementation, resolve_compute_dtype, validate_model_dir)
from qlora.plan import check_fits, fit_advice, plan_memory
from qlora.rundir import RunDir, git_commit, library_versions, list_checkpoints
from qlora.training import evaluate, lr_lambda, make_optimizer, to_device

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def estimate_memory_only(cfg: TrainConfig) -> int:
    """--estimate-memory: print the table; 0 if it fits, 1 with the knobs to turn if not (training would refuse)."""
    model_config = validate_model_dir(cfg.model) if cfg.model else None
    data_len = int(read_metadata(cfg.data)["max_len"]) if cfg.data else None
    seq_len = cfg.seq_len or data_len or 8192
    if cfg.seq_len and data_len and cfg.seq_len != data_len:
        print(f"finetune.py: planning for --seq-len {cfg.seq_len}, not the max_len {data_len} of {cfg.data}")
    world = cfg.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    # as training plans: this machine's GPU when it has one (--gpu-memory-gib wins), else 40 GiB
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    plan = plan_memory(cfg, model_config=model_config, max_len=seq_len, world_size=world, gpu_total_bytes=gpu_bytes)
    print(plan.estimate.table(plan.gpu_gib), flush=True)
    advice = fit_advice(plan, table_shown=True)
    if advice:
        print(f"finetune.py: {advice}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    cfg = resolve_config(argv, __doc__)
    if cfg.estimate_memory:
        return estimate_memory_only(cfg)
    env = Dist(cfg.device)
    try:
        return train(cfg, env)
    except UserError:
        if not env.is_main:  # every rank hits the same input error; let rank 0 alone print it
            sys.exit(2)
        raise
    except torch.OutOfMemoryError as e:
        raise UserError(
            f"CUDA out of memory on {env.device} (micro-batch {cfg.micro_batch_size} x seq "
            f"{cfg_max_len(cfg)}): lower --micro-batch-size, pretokenize with a smaller --max-len, keep "
            f"--gradient-checkpointing on with --checkpoint-layers all, or use --low-memory") from e
    finally:
        env.close()


def cfg_max_len(cfg: TrainConfig):
    with contextlib.suppress(Exception):
        return read_metadata(cfg.data)["max_len"]
    return "?"


def train(cfg: TrainConfig, env: Dist) -> int:
    from qlora.llama3 import load_tokenizer

    # ---- validate everything that can be checked before loading the model (fast, one-line errors)
    model_config = validate_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    meta = check_data(cfg.data, cfg.model, model_config, tokenizer)
    train_rows = PackedShards(cfg.data, "train", meta)
    val_rows = PackedShards(cfg.data, "validation", meta) if "validation" in meta["splits"] else None
    max_len = int(meta["max_len"])
    rows_per_step = cfg.micro_batch_size * cfg.grad_accum * env.world
    max_steps = cfg.max_steps or math.ceil((cfg.epochs or 1.0) * len(train_rows) / rows_per_step)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * max_steps)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, env.device)
    attn = resolve_attn_implementation(cfg.attn_implementation, env.device)
    if attn == "flex_attention" and env.device.type != "cuda":
        raise UserError("--attn-implementation flex_attention: PyTorch has no flex-attention backward on the CPU; "
                        "use sdpa or eager there")
    # fast-path kernels and checkpointed blocks, from the memory estimate; refuse before loading what cannot fit
    plan = plan_memory(
        cfg, model_config=model_config, max_len=max_len, world_size=env.world, device_type=env.device.type,
        gpu_total_bytes=torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else None)
    if env.device.type == "cuda":
        check_fits(plan)

    fp, fp_parts = run_fingerprint(cfg, model_config, meta, len(train_rows))

    # ---- run directory, stop protocol, resume point
    run = RunDir(cfg.output_dir, enabled=env.is_main)
    if env.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.stop_path.unlink(missing_ok=True)  # a stale request from the previous job must not stop this one
    env.barrier()
    stop_signal = {"received": False}
    signal.signal(signal.SIGUSR1, lambda *_: stop_signal.update(received=True))

    checkpoints = list_checkpoints(run.path)
    if cfg.resume == "auto":
        resume_path = checkpoints[-1][1] if checkpoints else None
    elif cfg.resume == "never":
        if checkpoints:
            raise UserError(f"--resume never: {run.path} already has checkpoints; use a new --output-dir "
                            f"or --resume auto")
        resume_path = None
    else:
        resume_path = Path(cfg.resume)
        if not is_checkpoint(resume_path):
            raise UserError(f"--resume {resume_path}: not a complete checkpoint directory")
    if resume_path is not None:
        check_fingerprint(resume_path, fp, fp_parts)
        if read_trainer_state(resume_path)["step"] >= max_steps and run.adapter_path.is_dir():
            step = read_trainer_state(resume_path)["step"]
            if env.is_main:
                print(f"finetune.py: {run.path} already finished at step {step} (--max-steps {max_steps}); "
                      f"give a larger --max-steps to continue")
                run.set_status(state="finished", step=step, max_steps=max_steps)
            return 0

    # ---- model, LoRA, optimizer
    if cfg.quantize == "nf4" or cfg.optimizer != "adamw_torch":
        check_bitsandbytes(env.device)
    torch.manual_seed(cfg.seed)
    base = load_base_model(cfg.model, quantize=cfg.quantize, attn_implementation=attn, device=env.device,
                           compute_dtype=compute_dtype)
    peft_model = apply_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target_modules=cfg.lora_target_modules,
                            gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed,
                            checkpoint_layers=plan.checkpoint_layers, kernels=plan.kernels)
    peft_model.train()
    trainable_params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable_params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, max_steps, cfg.min_lr_ratio))
    start_step, rows_consumed, tokens_seen = 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, peft_model=peft_model, optimizer=optimizer, scheduler=scheduler,
                                rank=env.rank)
        start_step, rows_consumed, tokens_seen = state["step"], state["rows_consumed"], state["tokens_seen"]
        if state.get("world_size", env.world) != env.world:
            torch.manual_seed(cfg.seed + 1000 * start_step + env.rank)  # no saved RNG stream for this rank layout
    else:
        torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ per rank; LoRA init above is shared

    n_trainable, n_base = count_parameters(peft_model)
    tokens_per_step = rows_per_step * max_len
    resolved = {"max_steps": max_steps, "warmup_steps": warmup, "world_size": env.world, "device": str(env.device),
                "compute_dtype": dtype_name(compute_dtype), "attn_implementation": attn, "kernels": plan.kernels,
                "checkpoint_layers": plan.checkpoint_layers, "gpu_memory_gib": plan.gpu_gib,
                "max_len": max_len, "rows_per_step": rows_per_step,
                "tokens_per_step": tokens_per_step, "epochs": max_steps * rows_per_step / len(train_rows),
                "train_rows": len(train_rows), "validation_rows": len(val_rows) if val_rows else 0,
                "trainable_params": n_trainable, "base_params": n_base,
                "trainable_percent": 100.0 * n_trainable / n_base}
    est = plan.estimate
    mem = (est.summary(plan.gpu_gib), est.table(plan.gpu_gib)) if env.device.type == "cuda" else None
    if env.is_main:
        print_recipe(cfg, resolved, mem, resume_path, start_step, env)
        write_json_atomic(run.config_path, {
            "config": as_dict(cfg), "resolved": resolved, "versions": library_versions(), "git_commit": git_commit(),
            "fingerprint": fp, "fingerprint_parts": fp_parts, "data_metadata": meta, "model_config": model_config,
            "resumed_from": str(resume_path) if resume_path else None, "command": sys.argv,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        run.truncate_metrics(start_step)

    # ---- DDP
    train_step = TrainStep(peft_model, loss_chunk_size=cfg.loss_chunk_size)
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_step = DDP(train_step, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                         broadcast_buffers=False)

    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.tensorboard_path), purge_step=start_step + 1)
    from tqdm import tqdm

    # ASCII bars in log files: srun/torchrun relay stdout and stderr in chunks, and a line printed between two chunks
    # of a bar could split one of its multi-byte block characters, leaving the SLURM log invalid UTF-8 (seen in CI).
    pbar = tqdm(total=max_steps, initial=start_step, disable=not env.is_main, unit="step", dynamic_ncols=True,
                desc="train", ascii=not sys.stderr.isatty())
    order = StreamOrder(train_rows, seed=cfg.seed)
    run.set_status(state="running", step=start_step, max_steps=max_steps, world_size=env.world, pid=os.getpid())

    def checkpoint(step: int, loss: float | None) -> Path | None:
        gathered = env.gather((capture_rng(), lora_digest(trainable_params)))
        rng_states, digests = [g[0] for g in gathered], [g[1] for g in gathered]
        if len(set(digests)) != 1:  # DDP keeps replicas bit-identical; anything else is a bug worth stopping for
            raise RuntimeError(f"LoRA weights differ across ranks at step {step}: {digests}")
        path = None
        if env.is_main:
            path = save_checkpoint(run.path, step, peft_model=peft_model, optimizer=optimizer, scheduler=scheduler,
                                   trainer_state={"rows_consumed": rows_consumed, "tokens_seen": tokens_seen,
                                                  "epoch": rows_consumed / len(train_rows), "loss": loss,
                                                  "seed": cfg.seed, "world_size": env.world,
                                                  "lora_sha256_per_rank": digests,
                                                  "fingerprint": fp, "fingerprint_parts": fp_parts},
                                   rng_states=rng_states, keep=cfg.keep_checkpoints)
            run.set_status(checkpoint=str(path))
        env.barrier()
        return path

    step, loss, stopping = start_step, None, False
    try:
        while step < max_steps and not stopping:
            t0 = time.perf_counter()
            micro_batches = step_micro_batches(order, rows_consumed, cfg.micro_batch_size, cfg.grad_accum,
                                               env.rank, env.world)
            local_labels = sum(count_label_tokens(torch.from_numpy(b["labels"]), torch.from_numpy(b["position_ids"]))
                               for b in micro_batches)
            (global_labels,) = env.all_reduce_sum([local_labels])
            # DDP averages gradients over ranks; scaling by world/global makes the result sum/global_labels.
            scale = env.world / max(global_labels, 1.0)
            local_loss = 0.0
            for i, mb in enumerate(micro_batches):
                sync = env.world == 1 or i == len(micro_batches) - 1
                with (contextlib.nullcontext() if sync else train_step.no_sync()):
                    loss_sum, _ = train_step(**to_device(mb, env.device))
                    (loss_sum * scale).backward()
                local_loss += float(loss_sum.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params, cfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rows_consumed += rows_per_step
            tokens_seen += tokens_per_step
            stop_here = float(run.stop_path.exists() or stop_signal["received"])
            total_loss, stop_votes = env.all_reduce_sum([local_loss, stop_here])
            loss = total_loss / max(global_labels, 1.0)
            stopping = stop_votes > 0 and step < max_steps  # at the last step, finishing is as quick
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                      "label_tokens": int(global_labels), "tokens": tokens_per_step,
                      "tokens_per_s": tokens_per_step / dt, "tokens_per_s_per_process": tokens_per_step / dt / env.world,
                      "epoch": rows_consumed / len(train_rows), "step_time_s": dt}
            if env.device.type == "cuda":
                record["gpu_mem_reserved_gib"] = torch.cuda.max_memory_reserved(env.device) / 2**30
                record["gpu_mem_allocated_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            if env.is_main:
                if step % cfg.log_every == 0 or step == max_steps:
                    run.log_metrics(record)
                    for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        writer.add_scalar(f"train/{k}", record[k], step)
                postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if "gpu_mem_reserved_gib" in record:
                    postfix["mem"] = f"{record['gpu_mem_reserved_gib']:.1f}G"
                pbar.set_postfix(postfix, refresh=False)
                pbar.update(1)
                run.set_status(state="running", step=step, loss=loss, epoch=record["epoch"])
            if not stopping and val_rows is not None and len(val_rows) and (
                    step == max_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                val_loss, val_tokens = evaluate(peft_model, val_rows, cfg, env)
                if env.is_main:
                    run.log_metrics({"step": step, "val_loss": val_loss, "val_label_tokens": val_tokens})
                    writer.add_scalar("val/loss", val_loss, step)
                    pbar.write(f"step {step}: validation loss {val_loss:.4f} ({val_tokens} label tokens)")
                    run.set_status(val_loss=val_loss)
            if stopping or step % cfg.save_every == 0 or step == max_steps:
                checkpoint(step, loss)
        pbar.close()  # before any message, so it starts on a line of its own
        if stopping:
            if env.is_main:
                print(f"finetune.py: stop requested; checkpoint at step {step} written, rerun the same command "
                      f"to resume")
                run.set_status(state="stopped", step=step)
            return 0
        if env.is_main:
            with atomic_dir(run.adapter_path) as tmp:
                peft_model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            print(f"finetune.py: finished {step} steps; adapter in {run.adapter_path}")
            run.set_status(state="finished", step=step)
        env.barrier()
        return 0
    except BaseException as e:
        pbar.close()
        if env.is_main and not (isinstance(e, SystemExit) and not e.code):
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            run.set_status(state="failed", step=step, message=f"{type(e).__name__}: {msg}")
        raise
    finally:
        if writer is not None:
            writer.close()


def print_recipe(cfg: TrainConfig, resolved: dict, mem, resume_path, start_step: int, env: Dist) -> None:
    lines = ["finetune.py resolved recipe:"]
    for k, v in as_dict(cfg).items():
        lines.append(f"  {k:24s} {','.join(v) if isinstance(v, list) else v}")
    r = resolved
    lines += [
        f"  {'processes':24s} {r['world_size']} on {r['device']} (compute: {r['compute_dtype']}, attention: "
        f"{r['attn_implementation']})",
        f"  {'trainable params':24s} {r['trainable_params']:,} ({r['trainable_percent']:.2f}% of "
        f"{r['base_params']:,} base parameters)",
        f"  {'tokens per step':24s} {r['tokens_per_step']:,} ({r['rows_per_step']} rows of {r['max_len']} = "
        f"micro-batch {cfg.micro_batch_size} x grad-accum {cfg.grad_accum} x {r['world_size']} processes)",
        f"  {'steps':24s} {r['max_steps']} (= {r['epochs']:.2f} epochs of {r['train_rows']} rows), warm-up "
        f"{r['warmup_steps']}",
    ]
    if env.device.type != "cuda":
        lines.append(f"  {'estimated peak GPU mem':24s} n/a (training on {env.device})")
    elif mem is None:
        lines.append(f"  {'estimated peak GPU mem':24s} n/a (the estimator qlora/memory.py is not in this checkout)")
    else:
        lines.append(f"  {'estimated peak GPU mem':24s} {mem[0]}")
    lines.append(f"  {'resume':24s} " + (f"from {resume_path} (step {start_step})" if resume_path else "fresh start"))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    run_main(main)
