#!/usr/bin/env python
"""QLoRA fine-tuning of a local Llama-3 base on pretokenize.py's packed parquet shards.

    python finetune.py --model Meta-Llama-3-8B --data tok --output-dir runs/r1 --epochs 1
    torchrun --nproc_per_node=4 finetune.py --model ... (one process per GPU, same flags: DDP, or FSDP when the
        model does not fit one GPU, e.g. Llama-3-70B on 4 x 40 GB)
    python finetune.py --config recipe.yaml --max-steps 2000     (command line overrides the YAML file)
    python finetune.py --estimate-memory --seq-len 16384 --nproc 4 --gpu-memory-gib 40
        (peak GPU memory plan, nothing loaded; exit status 0 if it fits, 1 and the settings to change if not)

Recipe (defaults) and what each choice costs:
  * base in 4-bit NF4 + double quantization, bf16 compute (fp32 on the CPU, where bf16 is slow; --compute-dtype):
    ~5.7 GB of weights for 8B instead of 16 GB; every matmul dequantises on the fly (slower than bf16 weights).
    Norms/embeddings/lm_head stay in the compute dtype and frozen. We do NOT call
    peft.prepare_model_for_kbit_training: its fp32 upcast of the norms runs the whole 8B network in fp32 on the GPU,
    several times slower and about twice the memory (bench/RESULTS.md, table 1).
  * LoRA r=64, alpha=16, dropout 0 on q/k/v/o/gate/up/down of every block (167,772,160 params on Llama-3-8B);
    LoRA weights kept in fp32 (small), all matmuls in bf16 (on the GPU fast path the LoRA pair and its scaled add
    run as one bf16 addmm instead of peft's fp32 matmuls and extra passes over each output; bench/RESULTS.md).
  * paged 8-bit AdamW: 2 bytes/param of optimizer state instead of 8, paged to CPU on memory spikes.
  * gradient checkpointing (non-reentrant) of as many blocks as memory needs (--checkpoint-layers auto, planned
    from qlora/memory.py's estimate): each recomputed block costs a third more of its matmuls and saves ~0.8 GiB
    at seq 8192 on Llama-3-8B. On a 40 GB card one process at seq 8192 needs none (the fastest setting,
    bench/RESULTS.md); --low-memory recomputes every block (~10 GiB).
  * packed rows keep documents apart: position ids restart at every document, attention_mask=None, so
    transformers builds a per-document causal mask; no loss on padding, masked prompts or across documents.
  * several processes: DDP (a whole model per GPU, no weight traffic: faster) when the estimate fits one GPU with every
    block recomputed, else FSDP2 (--parallelism; qlora/fsdp.py): each of N processes holds 1/N of the 4-bit weights,
    embeddings, LoRA, gradients and 8-bit optimizer state and gathers one block at a time. Checkpoints then hold each
    rank's shards (resumed by the same number of processes); the final adapter is the same PEFT adapter.
  * loss = sum of token cross-entropies / label tokens of the whole global batch (all micro-batches, all ranks):
    N processes give the same update as one process with the same global batch. The [tokens x 128256] logits
    never exist whole: Liger's fused linear-cross-entropy on the GPU fast path (-10 GiB at seq 8192), chunks of
    --loss-chunk-size tokens (qlora/loss.py) on the plain path and on CPU.
  * warm-up + cosine LR, gradient clipping, gradient accumulation; checkpoints (adapter, optimizer, scheduler,
    RNG, data position, and a manifest of their sizes and sha256) every --save-every steps.
  * resume: --resume auto continues from the checkpoint written last (write order, not step; resuming from one
    counts as writing it, so after a rewind with --resume RUN/checkpoints/step-N that one and those written since
    are the newest), passing over damaged ones with a warning. The --keep-checkpoints written last are kept, and
    always the one this run resumed from. Settings outside the fingerprint may change between runs and apply from
    the resumed step: --lr, --weight-decay, --adam-beta1/2, --max-grad-norm and the schedule (--warmup-*,
    --min-lr-ratio, and --max-steps/--epochs, which set the cosine's length: the LR moves to the new schedule's
    value at that step); --seed (it fixes the data order) may not.
  * a non-finite loss, gradient norm or validation loss stops the run before the update (status "failed"): nothing
    non-finite is saved.
  * stop protocol: RUN/stop_requested or SIGUSR1 -> checkpoint at the next step boundary, status "stopped", exit 0.
Outputs in --output-dir (qlora/rundir.py): config.json, metrics.jsonl, tensorboard/, checkpoints/step-NNNNNNN/,
adapter/, status.json.
"""
from __future__ import annotations

import signal

# SIGUSR1 asks for the stop protocol. Its default action ends the process, and the imports below take seconds:
# the handler comes first, and a request made while they run is kept for the training loop.
_stop_signal = {"received": False}


def _on_sigusr1(signum, frame) -> None:
    _stop_signal["received"] = True


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _on_sigusr1)

import contextlib  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

# Expandable segments: the allocator grows segments in place instead of leaving ~2-3 GiB fragmented at the peak
# (measured, bench/RESULTS.md). Must be set before CUDA initialises; an explicit setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
from qlora.cpu_kernels import pin_cpu_code_paths  # noqa: E402

pin_cpu_code_paths()  # the same numbers on AVX2-only and AVX-512 CPUs (qlora/cpu_kernels.py says why)
import torch  # noqa: E402

from qlora.atomic import atomic_dir, write_json_atomic
from qlora.checkpoint import (capture_rng, check_fingerprint, check_resume_parallelism, check_seed, checkpoint_damage,
                              load_checkpoint, load_sharded_checkpoint, mark_resumed, newest_intact_checkpoint,
                              read_trainer_state, run_fingerprint, save_checkpoint, save_sharded_checkpoint)
from qlora.config import RESUMABLE_KEYS, TrainConfig, as_dict, resolve_config
from qlora.data import PackedShards, StreamOrder, check_data, step_micro_batches
from qlora.distributed import Dist, lora_digest
from qlora.errors import UserError, run_main
from qlora.fsdp import gather_lora_state, offload_embeddings, shard, shard_optimizer
from qlora.llama3 import load_tokenizer
from qlora.loss import count_label_tokens
from qlora.model import (TrainStep, apply_lora, check_bitsandbytes, check_vocab_size, count_parameters, dtype_name,
                         load_base_model, read_model_config, resolve_attn_implementation, resolve_compute_dtype,
                         validate_model_dir)
from qlora.plan import MemoryPlan, check_fits, fit_advice, plan_memory
from qlora.rundir import RunDir, check_run_dir, git_commit, library_versions, list_checkpoints
from qlora.shards import read_shard_metadata
from qlora.training import apply_settings, clip_gradients, evaluate, lr_lambda, make_optimizer, to_device

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def main(argv=None) -> int:
    cfg = resolve_config(argv, __doc__)
    if cfg.estimate_memory:
        return estimate_memory_only(cfg)
    signal.signal(signal.SIGUSR1, _on_sigusr1)  # for callers that import finetune; the script has it already
    dist = Dist(cfg.device)
    try:
        return train(cfg, dist)
    except UserError:
        if not dist.is_main:  # every rank hits the same input error; let rank 0 alone print it
            sys.exit(2)
        raise
    except torch.OutOfMemoryError as e:
        raise UserError(
            f"CUDA out of memory on {dist.device} (micro-batch {cfg.micro_batch_size} x seq "
            f"{cfg_max_len(cfg)}): lower --micro-batch-size, pretokenize with a smaller --max-len, keep "
            f"--gradient-checkpointing on with --checkpoint-layers all, or use --low-memory") from e
    finally:
        _stop_signal["received"] = False  # a stop request is answered by the run it stopped
        dist.close()


def cfg_max_len(cfg: TrainConfig):
    with contextlib.suppress(Exception):
        return read_shard_metadata(cfg.data)["max_len"]
    return "?"


# ----------------------------------------------------------------------------------------------- the run's state
@dataclass
class TrainingRun:
    """What one training run holds, built by setup(); the loop moves step, data position and loss forward."""
    cfg: TrainConfig
    dist: Dist
    run_dir: RunDir
    tokenizer: object
    model: torch.nn.Module               # peft model: LoRA on the (4-bit) base
    trainable: list                      # the LoRA weights: what the optimizer updates and checkpoints compare
    train_step: torch.nn.Module          # TrainStep(model): (loss sum, label tokens); sharded in place under FSDP
    loss_module: torch.nn.Module         # what the loop calls: train_step (in DDP when several DDP ranks)
    sharded: bool                        # FSDP (qlora/fsdp.py): every rank holds 1/N of the model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: StreamOrder                   # the seeded row order; the data position is rows_consumed
    validation: PackedShards | None
    writer: object                       # TensorBoard SummaryWriter on rank 0, else None
    pbar: object
    stop_signal: dict                    # {"received": bool}, set by SIGUSR1
    fingerprint: str
    fingerprint_parts: dict
    resume_path: Path | None             # the checkpoint this run resumed from: rotation never deletes it
    settings: dict                       # RESUMABLE_KEYS as this run applies them, recorded in each checkpoint
    max_steps: int
    rows_per_step: int
    tokens_per_step: int
    n_train_rows: int
    step: int = 0
    rows_consumed: int = 0
    tokens_seen: int = 0
    loss: float | None = None

    @property
    def epoch(self) -> float:
        return self.rows_consumed / self.n_train_rows


# ----------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, dist: Dist) -> TrainingRun | None:
    """Check the inputs, plan memory, prepare RUN/ and find the resume point (all before loading the model: fast,
    one-line errors), then load model and optimizer, restore the checkpoint and record the run. None if RUN/
    already reached --max-steps."""
    check_run_dir(cfg.output_dir, {"--model": cfg.model, "--data": cfg.data})
    model_config = validate_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    check_vocab_size(cfg.model, model_config, tokenizer)
    meta, train_rows, val_rows = _setup_data(cfg, model_config, tokenizer)
    max_len = int(meta["max_len"])
    rows_per_step = cfg.micro_batch_size * cfg.grad_accum * dist.world
    tokens_per_step = rows_per_step * max_len
    max_steps = cfg.max_steps or math.ceil((cfg.epochs or 1.0) * len(train_rows) / rows_per_step)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * max_steps)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, dist.device)
    attn, plan = _plan(cfg, dist, model_config, max_len)
    sharded = plan.parallelism == "fsdp"
    fp, fp_parts = run_fingerprint(cfg, model_config, meta, len(train_rows))
    settings = {**{k: getattr(cfg, k) for k in RESUMABLE_KEYS}, "warmup_steps": warmup, "max_steps": max_steps}

    run_dir = _open_run_dir(cfg, dist)
    resume_path = _resume_point(cfg, run_dir, dist)
    changed = {}
    if resume_path is not None:
        check_fingerprint(resume_path, fp, fp_parts)
        check_seed(resume_path, cfg.seed)
        check_resume_parallelism(resume_path, plan.parallelism, dist.world)
        if _already_finished(dist, run_dir, resume_path, max_steps):
            return None
        saved = read_trainer_state(resume_path).get("settings", {})
        changed = {k: [saved[k], v] for k, v in settings.items() if k in saved and saved[k] != v}

    model, train_step, (n_trainable, n_base) = _setup_model(cfg, dist, compute_dtype, attn, plan)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _setup_optimizer(cfg, trainable, warmup, max_steps, sharded)
    start_step, rows_consumed, tokens_seen = _restore(cfg, dist, resume_path, model, optimizer, scheduler, sharded)

    resolved = {"max_steps": max_steps, "warmup_steps": warmup, "world_size": dist.world, "device": str(dist.device),
                "parallelism": plan.parallelism,
                "compute_dtype": dtype_name(compute_dtype), "attn_implementation": attn, "kernels": plan.kernels,
                "checkpoint_layers": plan.checkpoint_layers, "gpu_memory_gib": plan.gpu_gib,
                "max_len": max_len, "rows_per_step": rows_per_step,
                "tokens_per_step": tokens_per_step, "epochs": max_steps * rows_per_step / len(train_rows),
                "train_rows": len(train_rows), "validation_rows": len(val_rows) if val_rows else 0,
                "trainable_params": n_trainable, "base_params": n_base,
                "trainable_percent": 100.0 * n_trainable / n_base}
    if dist.is_main:
        if resume_path is not None:
            mark_resumed(resume_path, run_dir.path)
        print_recipe(cfg, resolved, plan, resume_path, start_step, changed)
        write_json_atomic(run_dir.config_path, {
            "config": as_dict(cfg), "resolved": resolved, "versions": library_versions(), "git_commit": git_commit(),
            "fingerprint": fp, "fingerprint_parts": fp_parts, "data_metadata": meta, "model_config": model_config,
            "resumed_from": str(resume_path) if resume_path else None, "changed_at_resume": changed,
            "command": sys.argv, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, allow_nan=False)
        run_dir.truncate_metrics(start_step)

    loss_module = train_step if sharded else _wrap_for_ddp(train_step, dist)
    writer, pbar = _setup_loggers(dist, run_dir, start_step, max_steps)
    run_dir.set_status(state="running", step=start_step, max_steps=max_steps, world_size=dist.world, pid=os.getpid())
    return TrainingRun(cfg=cfg, dist=dist, run_dir=run_dir, tokenizer=tokenizer, model=model, trainable=trainable,
                       train_step=train_step, loss_module=loss_module, sharded=sharded, optimizer=optimizer,
                       scheduler=scheduler,
                       order=StreamOrder(train_rows, seed=cfg.seed), validation=val_rows, writer=writer, pbar=pbar,
                       stop_signal=_stop_signal, fingerprint=fp, fingerprint_parts=fp_parts,
                       resume_path=resume_path, settings=settings, max_steps=max_steps,
                       rows_per_step=rows_per_step, tokens_per_step=tokens_per_step,
                       n_train_rows=len(train_rows), step=start_step, rows_consumed=rows_consumed,
                       tokens_seen=tokens_seen)


def _setup_data(cfg: TrainConfig, model_config: dict, tokenizer):
    meta = check_data(cfg.data, cfg.model, model_config, tokenizer)
    train_rows = PackedShards(cfg.data, "train", meta)
    val_rows = PackedShards(cfg.data, "validation", meta) if "validation" in meta["splits"] else None
    return meta, train_rows, val_rows


def _plan(cfg: TrainConfig, dist: Dist, model_config: dict, max_len: int) -> tuple[str, MemoryPlan]:
    """Attention kernel, fast-path kernels, DDP or FSDP and recomputed blocks; refuse before loading what cannot
    fit."""
    attn = resolve_attn_implementation(cfg.attn_implementation, dist.device)
    if attn == "flex_attention" and dist.device.type != "cuda":
        raise UserError("--attn-implementation flex_attention: PyTorch has no flex-attention backward on the CPU; "
                        "use sdpa or eager there")
    on_gpu = dist.device.type == "cuda"
    plan = plan_memory(cfg, model_config=model_config, max_len=max_len, world_size=dist.world,
                       device_type=dist.device.type,
                       gpu_total_bytes=torch.cuda.get_device_properties(dist.device).total_memory if on_gpu else None)
    if plan.parallelism == "fsdp" and dist.world == 1:
        raise UserError("--parallelism fsdp shards the model over the processes torchrun starts (torchrun "
                        "--nproc_per_node N finetune.py ...); one process holds it whole: use --parallelism ddp or auto")
    if on_gpu:
        check_fits(plan)
    return attn, plan


def _open_run_dir(cfg: TrainConfig, dist: Dist) -> RunDir:
    """RUN/, with the stop protocol's file cleared: RUN/stop_requested (or SIGUSR1) asks for a checkpoint and a
    clean exit."""
    run_dir = RunDir(cfg.output_dir, enabled=dist.is_main)
    if dist.is_main:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.clear_stale_stop_request()
        if not run_dir.status_path.exists():  # marks RUN/ as a run directory before anything else is written
            run_dir.set_status(state="running", step=0, pid=os.getpid())
    dist.barrier()
    return run_dir


def _resume_point(cfg: TrainConfig, run_dir: RunDir, dist: Dist) -> Path | None:
    """The checkpoint to resume from. Rank 0 alone reads and checks the checkpoints (their digests cover every
    byte) and every rank gets its answer, or its one-line error."""
    answer = None
    if dist.is_main:
        try:
            answer = (_find_resume_point(cfg, run_dir), None)
        except UserError as e:
            answer = (None, str(e))
    resume_path, error = dist.gather(answer)[0]
    if error is not None:
        raise UserError(error)
    return resume_path


def _find_resume_point(cfg: TrainConfig, run_dir: RunDir) -> Path | None:
    """--resume auto: the intact checkpoint written last (damaged ones passed over with a warning); never: none,
    refused where checkpoints exist; a directory: that checkpoint, refused if damaged."""
    if cfg.resume == "auto":
        return newest_intact_checkpoint(run_dir.path, warn=lambda line: print(f"finetune.py: warning: {line}",
                                                                               file=sys.stderr, flush=True))
    if cfg.resume == "never":
        if list_checkpoints(run_dir.path):
            raise UserError(f"--resume never: {run_dir.path} already has checkpoints; use a new --output-dir "
                            f"or --resume auto")
        return None
    resume_path = Path(cfg.resume)
    if not resume_path.is_dir():
        raise UserError(f"--resume {resume_path}: no such checkpoint directory")
    damage = checkpoint_damage(resume_path)
    if damage is not None:
        raise UserError(f"--resume {resume_path}: damaged checkpoint ({damage}); resume from another one "
                        f"(--resume auto takes the newest intact checkpoint)")
    return resume_path


def _already_finished(dist: Dist, run_dir: RunDir, resume_path: Path, max_steps: int) -> bool:
    """True, saying so and marking RUN/ finished, when its adapter is written and the checkpoint is at --max-steps."""
    step = read_trainer_state(resume_path)["step"]
    if step < max_steps or not run_dir.adapter_path.is_dir():
        return False
    if dist.is_main:
        print(f"finetune.py: {run_dir.path} already finished at step {step} (--max-steps {max_steps}); "
              f"give a larger --max-steps to continue")
        run_dir.set_status(state="finished", step=step, max_steps=max_steps)
    return True


def _setup_model(cfg: TrainConfig, dist: Dist, compute_dtype: torch.dtype, attn: str, plan: MemoryPlan):
    """The peft model, its TrainStep (sharded in place under FSDP) and the (trainable, base) parameter counts, taken
    before sharding hides the 4-bit weights' shapes."""
    if cfg.quantize == "nf4" or cfg.optimizer != "adamw_torch":
        check_bitsandbytes(dist.device)
    sharded = plan.parallelism == "fsdp"
    torch.manual_seed(cfg.seed)
    base = load_base_model(cfg.model, quantize=cfg.quantize, attn_implementation=attn, device=dist.device,
                           compute_dtype=compute_dtype)
    if sharded:
        offload_embeddings(base)
    model = apply_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       target_modules=cfg.lora_target_modules, gradient_checkpointing=cfg.gradient_checkpointing,
                       seed=cfg.seed, checkpoint_layers=plan.checkpoint_layers, kernels=plan.kernels)
    model.train()
    counts = count_parameters(model)
    train_step = TrainStep(model, loss_chunk_size=cfg.loss_chunk_size)
    if sharded:
        shard(train_step, dist.device)
        if dist.device.type == "cuda":  # the peaks logged every step are training's, not loading's (whole model)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dist.device)
    return model, train_step, counts


def _setup_optimizer(cfg: TrainConfig, trainable: list, warmup: int, max_steps: int, sharded: bool):
    # bitsandbytes' optimizers take plain tensors: under FSDP each rank's own shards (qlora/fsdp.py)
    optimizer = (shard_optimizer(trainable, lambda shards: make_optimizer(shards, cfg)) if sharded
                 else make_optimizer(trainable, cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, max_steps, cfg.min_lr_ratio))
    return optimizer, scheduler


def _restore(cfg: TrainConfig, dist: Dist, resume_path: Path | None, model, optimizer, scheduler, sharded: bool):
    """(step, rows consumed, tokens seen) to start from: the checkpoint's, with its weights, optimizer state,
    scheduler and this rank's RNG restored, and this run's settings applied from there on; zeros for a fresh
    start."""
    if resume_path is None:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout masks differ per rank; LoRA init above is shared
        return 0, 0, 0
    if sharded:  # every rank reads its own shards
        state = load_sharded_checkpoint(resume_path, peft_model=model, optimizer=optimizer, scheduler=scheduler,
                                        rank=dist.rank, world_size=dist.world)
    else:
        state = load_checkpoint(resume_path, peft_model=model, optimizer=optimizer, scheduler=scheduler,
                                rank=dist.rank)
        if state.get("world_size", dist.world) != dist.world:
            torch.manual_seed(cfg.seed + 1000 * state["step"] + dist.rank)  # no saved RNG stream for this layout
    apply_settings(optimizer, scheduler, cfg)
    return state["step"], state["rows_consumed"], state["tokens_seen"]


def _wrap_for_ddp(loss_module: TrainStep, dist: Dist) -> torch.nn.Module:
    if dist.world == 1:
        return loss_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(loss_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
               broadcast_buffers=False)


def _setup_loggers(dist: Dist, run_dir: RunDir, start_step: int, max_steps: int):
    """TensorBoard writer (rank 0) and the progress bar (shown on rank 0 only)."""
    from tqdm import tqdm

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir.tensorboard_path), purge_step=start_step + 1)
    # ASCII bars in log files: srun/torchrun relay stdout and stderr in chunks, and a line printed between two chunks
    # of a bar could split one of its multi-byte block characters, leaving the SLURM log invalid UTF-8 (seen in CI).
    pbar = tqdm(total=max_steps, initial=start_step, disable=not dist.is_main, unit="step", dynamic_ncols=True,
                desc="train", ascii=not sys.stderr.isatty())
    return writer, pbar


# ----------------------------------------------------------------------------------------------- training loop
def train(cfg: TrainConfig, dist: Dist) -> int:
    run = setup(cfg, dist)
    if run is None:  # RUN/ already reached --max-steps
        return 0
    stopping = False
    try:
        while run.step < run.max_steps and not stopping:
            record, stopping = train_step(run)
            log_step(run, record)
            if not stopping and evaluation_due(run):
                validate(run)
            if stopping or run.step % cfg.save_every == 0 or run.step == run.max_steps:
                save(run)
        run.pbar.close()  # before any message, so it starts on a line of its own
        return finish(run, stopping)
    except BaseException as e:
        run.pbar.close()
        record_failure(run, e)
        raise
    finally:
        if run.writer is not None:
            run.writer.close()


def train_step(run: TrainingRun) -> tuple[dict, bool]:
    """One optimizer step over this rank's micro-batches; its metrics, and whether a stop was requested."""
    cfg, dist = run.cfg, run.dist
    t0 = time.perf_counter()
    micro_batches = step_micro_batches(run.order, run.rows_consumed, cfg.micro_batch_size, cfg.grad_accum,
                                       dist.rank, dist.world)
    local_labels = sum(count_label_tokens(torch.from_numpy(b["labels"]), torch.from_numpy(b["position_ids"]))
                       for b in micro_batches)
    (global_labels,) = dist.all_reduce_sum([local_labels])
    # DDP averages gradients over ranks; scaling by world/global makes the result sum/global_labels.
    scale = dist.world / max(global_labels, 1.0)
    local_loss = 0.0
    for i, mb in enumerate(micro_batches):
        # FSDP reduce-scatters after every micro-batch (each rank then accumulates only its shard): no no_sync
        sync = run.sharded or dist.world == 1 or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else run.loss_module.no_sync()):
            loss_sum, _ = run.loss_module(**to_device(mb, dist.device))
            (loss_sum * scale).backward()
        local_loss += float(loss_sum.detach())
    grad_norm = clip_gradients(run.trainable, cfg.max_grad_norm)
    stop_here = float(run.run_dir.stop_path.exists() or run.stop_signal["received"])
    # one all-reduce: the loss, the stop votes, and any rank's non-finite gradient norm, so every rank decides alike
    total_loss, stop_votes, nonfinite = dist.all_reduce_sum([local_loss, stop_here,
                                                             float(not math.isfinite(grad_norm))])
    loss = total_loss / max(global_labels, 1.0)
    if nonfinite or not math.isfinite(loss):
        raise diverged(run, f"step {run.step + 1}: loss {loss}, gradient norm {grad_norm}")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.rows_consumed += run.rows_per_step
    run.tokens_seen += run.tokens_per_step
    run.loss = loss
    stopping = stop_votes > 0 and run.step < run.max_steps  # at the last step, finishing is as quick
    return step_record(run, lr, grad_norm, global_labels, time.perf_counter() - t0), stopping


def diverged(run: TrainingRun, what: str) -> UserError:
    """The one-line error that stops a run whose numbers are no longer finite, before anything of them is saved."""
    last = run.run_dir.status.get("checkpoint") or run.resume_path
    rerun = (f"the new settings apply from the last checkpoint, {last} (should the run diverge again at once, its "
             f"weights are past saving: --resume an earlier checkpoint or use a new --output-dir)" if last else
             "there is no checkpoint yet, so it starts afresh")
    return UserError(f"training diverged at {what}; stopped before saving anything non-finite. Lower --lr (now "
                     f"{run.cfg.lr:g}) or raise --warmup-steps and rerun: {rerun}")


def check_weights_finite(run: TrainingRun) -> None:
    """Every rank's LoRA weights (its shards, under FSDP) finite, checked before they are written: a finite loss
    and gradient can still give an update that overflows."""
    local = all(bool(torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all())
                for p in run.trainable)
    (bad,) = run.dist.all_reduce_sum([float(not local)])
    if bad:
        raise diverged(run, f"step {run.step}: LoRA weights not finite after the update")


def step_record(run: TrainingRun, lr: float, grad_norm: float, global_labels: float, seconds: float) -> dict:
    record = {"step": run.step, "loss": run.loss, "lr": lr, "grad_norm": grad_norm,
              "label_tokens": int(global_labels), "tokens": run.tokens_per_step,
              "tokens_per_s": run.tokens_per_step / seconds,
              "tokens_per_s_per_process": run.tokens_per_step / seconds / run.dist.world,
              "epoch": run.epoch, "step_time_s": seconds}
    if run.dist.device.type == "cuda":
        record["gpu_mem_reserved_gib"] = torch.cuda.max_memory_reserved(run.dist.device) / 2**30
        record["gpu_mem_allocated_gib"] = torch.cuda.max_memory_allocated(run.dist.device) / 2**30
    return record


def log_step(run: TrainingRun, record: dict) -> None:
    """metrics.jsonl and TensorBoard every --log-every steps; progress bar and status.json every step (rank 0)."""
    if not run.dist.is_main:
        return
    if run.step % run.cfg.log_every == 0 or run.step == run.max_steps:
        run.run_dir.log_metrics(record)
        for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
            run.writer.add_scalar(f"train/{k}", record[k], run.step)
    postfix = {"loss": f"{run.loss:.4f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
    if "gpu_mem_reserved_gib" in record:
        postfix["mem"] = f"{record['gpu_mem_reserved_gib']:.1f}G"
    run.pbar.set_postfix(postfix, refresh=False)
    run.pbar.update(1)
    run.run_dir.set_status(state="running", step=run.step, loss=run.loss, epoch=record["epoch"])


def evaluation_due(run: TrainingRun) -> bool:
    if run.validation is None or not len(run.validation):
        return False
    return run.step == run.max_steps or bool(run.cfg.eval_every and run.step % run.cfg.eval_every == 0)


def validate(run: TrainingRun) -> None:
    val_loss, val_tokens = evaluate(run.train_step, run.validation, run.cfg, run.dist, sharded=run.sharded)
    if not math.isfinite(val_loss):  # all-reduced: every rank stops alike
        raise diverged(run, f"step {run.step}: validation loss {val_loss} over {val_tokens} label tokens")
    if run.dist.is_main:
        run.run_dir.log_metrics({"step": run.step, "val_loss": val_loss, "val_label_tokens": val_tokens})
        run.writer.add_scalar("val/loss", val_loss, run.step)
        run.pbar.write(f"step {run.step}: validation loss {val_loss:.4f} ({val_tokens} label tokens)")
        run.run_dir.set_status(val_loss=val_loss)


def save(run: TrainingRun) -> None:
    """A checkpoint of this step (every rank's RNG), its weights checked finite first. DDP: rank 0 writes it, after
    checking the replicas are identical. FSDP: every rank writes its own shards (qlora/checkpoint.py), no weights
    gathered."""
    check_weights_finite(run)
    gathered = run.dist.gather((capture_rng(), None if run.sharded else lora_digest(run.trainable)))
    rng_states, digests = [g[0] for g in gathered], [g[1] for g in gathered]
    trainer_state = {"rows_consumed": run.rows_consumed, "tokens_seen": run.tokens_seen, "epoch": run.epoch,
                     "loss": run.loss, "seed": run.cfg.seed, "world_size": run.dist.world,
                     "fingerprint": run.fingerprint, "fingerprint_parts": run.fingerprint_parts,
                     "settings": run.settings}
    path = None
    if run.sharded:
        path = save_sharded_checkpoint(run.run_dir.path, run.step, peft_model=run.model, optimizer=run.optimizer,
                                       scheduler=run.scheduler, trainer_state=trainer_state, rng_states=rng_states,
                                       keep=run.cfg.keep_checkpoints, rank=run.dist.rank, protect=run.resume_path)
    else:
        if len(set(digests)) != 1:  # DDP keeps replicas bit-identical; anything else is a bug worth stopping for
            raise RuntimeError(f"LoRA weights differ across ranks at step {run.step}: {digests}")
        if run.dist.is_main:
            path = save_checkpoint(run.run_dir.path, run.step, peft_model=run.model, optimizer=run.optimizer,
                                   scheduler=run.scheduler,
                                   trainer_state=dict(trainer_state, lora_sha256_per_rank=digests),
                                   rng_states=rng_states, keep=run.cfg.keep_checkpoints, protect=run.resume_path)
    if run.dist.is_main:
        run.run_dir.set_status(checkpoint=str(path))
    run.dist.barrier()


def finish(run: TrainingRun, stopped: bool) -> int:
    """Stopped: the checkpoint just written is where the next job resumes. Finished: the final adapter."""
    if stopped:
        if run.dist.is_main:
            print(f"finetune.py: stop requested; checkpoint at step {run.step} written, rerun the same command "
                  f"to resume")
            run.run_dir.set_status(state="stopped", step=run.step)
        return 0
    check_weights_finite(run)
    lora = gather_lora_state(run.model) if run.sharded else None  # FSDP: a collective, every rank gathers
    if run.dist.is_main:
        with atomic_dir(run.run_dir.adapter_path) as tmp:
            run.model.save_pretrained(tmp, state_dict=lora)  # a normal PEFT adapter either way
            run.tokenizer.save_pretrained(tmp)
        print(f"finetune.py: finished {run.step} steps; adapter in {run.run_dir.adapter_path}")
        run.run_dir.set_status(state="finished", step=run.step)
    run.dist.barrier()
    return 0


def record_failure(run: TrainingRun, e: BaseException) -> None:
    if run.dist.is_main and not (isinstance(e, SystemExit) and not e.code):
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        run.run_dir.set_status(state="failed", step=run.step, message=f"{type(e).__name__}: {msg}")


# ----------------------------------------------------------------------------------------------- reports
def print_recipe(cfg: TrainConfig, resolved: dict, plan: MemoryPlan, resume_path, start_step: int,
                 changed: dict) -> None:
    lines = ["finetune.py resolved recipe:"]
    for k, v in as_dict(cfg).items():
        lines.append(f"  {k:24s} {','.join(v) if isinstance(v, list) else v}")
    r = resolved
    sharing = ""
    if r["world_size"] > 1:
        sharing = (f", FSDP: each holds 1/{r['world_size']} of the model" if r["parallelism"] == "fsdp"
                   else ", DDP: a whole model each")
    lines += [
        f"  {'processes':24s} {r['world_size']} on {r['device']} (compute: {r['compute_dtype']}, attention: "
        f"{r['attn_implementation']}){sharing}",
        f"  {'trainable params':24s} {r['trainable_params']:,} ({r['trainable_percent']:.2f}% of "
        f"{r['base_params']:,} base parameters)",
        f"  {'tokens per step':24s} {r['tokens_per_step']:,} ({r['rows_per_step']} rows of {r['max_len']} = "
        f"micro-batch {cfg.micro_batch_size} x grad-accum {cfg.grad_accum} x {r['world_size']} processes)",
        f"  {'steps':24s} {r['max_steps']} (= {r['epochs']:.2f} epochs of {r['train_rows']} rows), warm-up "
        f"{r['warmup_steps']}",
    ]
    if torch.device(r["device"]).type == "cuda":
        lines.append(f"  {'estimated peak GPU mem':24s} {plan.estimate.summary(plan.gpu_gib)}")
    else:
        lines.append(f"  {'estimated peak GPU mem':24s} n/a (training on {r['device']})")
    lines.append(f"  {'resume':24s} " + (f"from {resume_path} (step {start_step})" if resume_path else "fresh start"))
    if changed:
        lines.append(f"  {'changed at resume':24s} " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in
                                                             changed.items()) + f" (from step {start_step + 1})")
    print("\n".join(lines), flush=True)


def estimate_memory_only(cfg: TrainConfig) -> int:
    """--estimate-memory: print the table; 0 if it fits, 1 with the knobs to turn if not (training would refuse)."""
    model_config = read_model_config(cfg.model) if cfg.model else None  # its config.json is all the plan needs
    data_len = int(read_shard_metadata(cfg.data)["max_len"]) if cfg.data else None
    seq_len = cfg.seq_len or data_len or 8192
    if cfg.seq_len and data_len and cfg.seq_len != data_len:
        print(f"finetune.py: planning for --seq-len {cfg.seq_len}, not the max_len {data_len} of {cfg.data}")
    world = cfg.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    # as training plans: this machine's GPU when it has one (--gpu-memory-gib wins), else 40 GiB
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    plan = plan_memory(cfg, model_config=model_config, max_len=seq_len, world_size=world, gpu_total_bytes=gpu_bytes)
    if cfg.parallelism == "auto" and world > 1:
        print(f"finetune.py: --parallelism auto chose {plan.parallelism.upper()} for {world} processes ("
              + ("one process per GPU fits with every block recomputed" if plan.parallelism == "ddp" else
                 "one process per GPU does not fit even with every block recomputed") + ")")
    print(plan.estimate.table(plan.gpu_gib), flush=True)
    advice = fit_advice(plan, table_shown=True)
    if advice:
        print(f"finetune.py: {advice}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
