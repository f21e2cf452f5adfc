"""Test harness for qlora/fsdp.py: a few optimizer steps of finetune.py's step, one process or N under FSDP2.

    python tests/fsdp_driver.py --model M --data D --out OUT --steps 5 --grad-accum 2          (one process)
    torchrun --nproc_per_node 2 tests/fsdp_driver.py --model M --data D --out OUT --steps 5     (FSDP, gloo)

Not a trainer: it runs exactly the pieces finetune.py's loop is made of (qlora.data's per-rank micro-batches,
qlora.model's load_base_model / apply_lora / TrainStep, loss scaled by world / label tokens of the global batch,
gradient clipping, bitsandbytes' 8-bit AdamW, a warm-up LambdaLR, qlora.checkpoint's save and load) so that tests
can compare one process with N sharded ones on the same rows. Writes OUT/result.json (per-step losses, peak memory,
tokens/s) and OUT/adapter (the gathered LoRA as a PEFT adapter); --save-at STEP writes a checkpoint into
OUT/checkpoints, --resume CKPT continues from one.

--device cuda --same-gpu puts every rank on cuda:0 (gloo carries the collectives: NCCL refuses two ranks on one GPU),
the GPU equality check of bench/device_run.sh's fsdp phase. --stage-through-cpu runs every collective of the step on
CPU copies (gloo's CPU path instead of its CUDA one): FSDP's all-gathers and reduce-scatters, the gradient norm of
the clipping and the final gather of the adapter. It is the fallback of that check, should gloo's CUDA path fail
under FSDP (bench/fsdp_diag.py finds out); a test-harness device only, never the product's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def staged_through_cpu_comms():
    """(AllGather, ReduceScatter) for FSDPModule.set_custom_all_gather / set_custom_reduce_scatter that run gloo's CPU
    collectives on host copies of FSDP's CUDA buffers (synchronous; FSDP's streams order the copies)."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    class Allocate:
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

    class StagedAllGather(Allocate, AllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            host = torch.empty(output_tensor.shape, dtype=output_tensor.dtype)
            dist.all_gather_into_tensor(host, input_tensor.cpu(), group=group)
            output_tensor.copy_(host)

    class StagedReduceScatter(Allocate, ReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            host = torch.empty(output_tensor.shape, dtype=output_tensor.dtype)
            dist.reduce_scatter_tensor(host, input_tensor.cpu(), op=op, group=group)
            output_tensor.copy_(host)

    return StagedAllGather(), StagedReduceScatter()


def stage_through_cpu(root: torch.nn.Module) -> int:
    """Give every FSDP unit under `root` the CPU-staged collectives; the number of units."""
    from torch.distributed.fsdp import FSDPModule

    all_gather, reduce_scatter = staged_through_cpu_comms()
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_custom_all_gather(all_gather)
        m.set_custom_reduce_scatter(reduce_scatter)
    return len(units)


def all_reduce_through_cpu(tensor: torch.Tensor) -> None:
    """Sum `tensor` over the ranks in place, through a CPU copy (for the clipping norm)."""
    import torch.distributed as dist

    on_cpu = tensor.cpu()
    dist.all_reduce(on_cpu)
    tensor.copy_(on_cpu)


def lora_staged_through_cpu(peft_model) -> dict:
    """The whole LoRA weights on every rank, each gathered as CPU copies of the dim-0 shards in rank order."""
    import torch.distributed as dist

    state = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, p.to_local().detach().cpu())
            state[name] = torch.cat(parts)
    return state


def check_gathered(peft_model):
    """Before sharding: a copy of every weight. Returns ({weight name: differing elements}, install): install(), once
    sharded, adds forward pre-hooks (after FSDP's gather) that fill the dict at the first forward of each block and of
    the embeddings, comparing bit for bit (LoRA masters after their cast to the compute dtype)."""
    base = peft_model.get_base_model()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    counts: dict = {}

    def hook(module, _args):
        if getattr(module, "_checked", False):
            return
        module._checked = True
        for name, p in module.named_parameters():
            full = module._prefix + name
            want = before[full].to(p.device)  # the embeddings were copied while offloaded to the CPU
            if want.is_floating_point() and want.dtype != p.dtype:
                want = want.to(p.dtype)
            got = p.detach()
            if got.shape != want.shape:
                counts[full] = f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
                continue
            width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
            counts[full] = int((got.contiguous().view(width) != want.contiguous().view(width)).sum())

    def install():
        from qlora.speed import decoder_layers

        named = dict(peft_model.named_modules())
        for module in [*decoder_layers(base), base.get_input_embeddings()]:
            module._prefix = next(k for k, m in named.items() if m is module) + "."
            module.register_forward_pre_hook(hook)

    return counts, install


def trace_outputs(peft_model):
    """({micro-batch index: [[module, sha1 of the output's bytes, float64 sum], ...]}, start): start(i) records, in
    execution order, the output of every module that computes (embeddings, decoder blocks, attention, MLP, norms,
    4-bit linears) during micro-batch i's forward, each module once (the backward's recomputes are left out);
    start(None) stops. The first entry where 2 FSDP ranks differ from one process is where they part."""
    import hashlib

    trace: dict = {}
    current = {"i": None}

    def hook(module, _args, output):
        i = current["i"]
        out = output[0] if isinstance(output, tuple) else output
        if i is None or not torch.is_tensor(out):
            return
        seen = trace.setdefault(i, [])
        if any(name == module._trace_name for name, _, _ in seen):
            return
        raw = out.detach().contiguous().cpu()
        digest = hashlib.sha1(raw.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        seen.append([module._trace_name, digest, float(raw.double().sum())])

    kinds = ("Embedding", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "Linear4bit")
    for name, module in peft_model.named_modules():
        if type(module).__name__ in kinds:
            module._trace_name = name
            module.register_forward_hook(hook)

    def start(i):
        current["i"] = i

    return trace, start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-8bit-size", type=int, default=512,
                    help="bitsandbytes keeps tensors smaller than this in 32-bit state; 512 puts the tiny model's "
                         "LoRA shards on the 8-bit path too")
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--same-gpu", action="store_true", help="every rank on cuda:0")
    ap.add_argument("--stage-through-cpu", action="store_true",
                    help="FSDP's collectives on CPU copies of its buffers (gloo's CPU path)")
    ap.add_argument("--kernels", default="none", choices=["none", "liger"])
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--checkpoint-layers", type=int, default=-1)
    ap.add_argument("--compute-dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--fsdp", action="store_true",
                    help="shard even as one process (a group of one): FSDP's code path without a second rank")
    ap.add_argument("--whole-embeddings", action="store_true",
                    help="keep the input embeddings whole on every rank (qlora.fsdp.shard shards them by default)")
    ap.add_argument("--check-gathered", action="store_true",
                    help="sharded: compare every weight FSDP gathers for the first forward with the weight before "
                         "sharding, bit for bit (LoRA masters after their cast to the compute dtype)")
    ap.add_argument("--trace-first-forward", action="store_true",
                    help="record a hash and the sum of every module's output in step 1's forwards (result.json's "
                         "first_forward_trace_per_rank), to find where 2 ranks part from one process")
    ap.add_argument("--quant-storage", default="uint8", choices=["uint8", "compute"],
                    help="dtype of the packed 4-bit bytes: uint8 (bitsandbytes' default, what qlora.fsdp.shard "
                         "takes) or the compute dtype (one process only: the storage alone changes nothing)")
    args = ap.parse_args()

    import bitsandbytes as bnb
    import torch.distributed as dist

    from qlora import fsdp
    from qlora.checkpoint import (capture_rng, load_checkpoint, load_sharded_checkpoint, save_checkpoint,
                                  save_sharded_checkpoint)
    from qlora.data import PackedShards, StreamOrder, step_micro_batches
    from qlora.loss import count_label_tokens
    from qlora.model import TrainStep, apply_lora, load_base_model, resolve_compute_dtype
    from qlora.shards import read_shard_metadata
    from qlora.training import clip_gradients

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        device = torch.device("cuda", 0 if args.same_gpu else int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    sharded = world > 1 or args.fsdp
    if sharded:
        dist.init_process_group("gloo", **({} if world > 1 else dict(init_method="tcp://127.0.0.1:0", rank=0,
                                                                          world_size=1)))
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    def all_reduce_sum(values):
        t = torch.tensor(values, dtype=torch.float64)
        if sharded:
            dist.all_reduce(t)
        return t.tolist()

    meta = read_shard_metadata(args.data)
    rows = PackedShards(args.data, "train", meta)
    order = StreamOrder(rows, seed=args.seed)
    rows_per_step = args.micro_batch_size * args.grad_accum * world

    torch.manual_seed(args.seed)
    compute_dtype = resolve_compute_dtype(args.compute_dtype, device)
    storage = {"uint8": torch.uint8, "compute": compute_dtype}[args.quant_storage]
    base = load_base_model(args.model, attn_implementation=args.attn, device=device, compute_dtype=compute_dtype,
                           quant_storage=storage)
    if sharded:
        fsdp.offload_embeddings(base)
    model = apply_lora(base, r=args.lora_r, alpha=16, seed=args.seed, checkpoint_layers=args.checkpoint_layers,
                       kernels=args.kernels)
    step_fn = TrainStep(model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def build(params):
        return bnb.optim.PagedAdamW8bit(params, lr=args.lr, min_8bit_size=args.min_8bit_size)

    trace, trace_start = trace_outputs(model) if args.trace_first_forward else ({}, lambda i: None)
    if sharded:
        mismatches, install = check_gathered(model) if args.check_gathered else (None, None)
        step_fn = fsdp.shard(step_fn, device, shard_embeddings=not args.whole_embeddings)
        if install:
            install()
        if args.stage_through_cpu:
            stage_through_cpu(step_fn)
        trainable = [p for p in model.parameters() if p.requires_grad]  # now DTensors
        optimizer = fsdp.shard_optimizer(trainable, build)
    else:
        optimizer = build(trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    if device.type == "cuda":  # loading (the whole 4-bit model, before sharding) apart from training
        load_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        after_load = torch.cuda.memory_allocated(device)

    step, rows_consumed = 0, 0
    if args.resume:
        load = load_sharded_checkpoint if sharded else load_checkpoint
        state = load(args.resume, peft_model=model, optimizer=optimizer, scheduler=scheduler, rank=rank,
                     **({"world_size": world} if sharded else {}))
        step, rows_consumed = state["step"], state["rows_consumed"]

    phase_peaks = {}  # GiB: the highest allocated / reserved seen in each part of a step, every step

    def mark(phase):
        if device.type != "cuda":
            return
        got = phase_peaks.setdefault(phase, [0.0, 0.0])
        got[0] = max(got[0], torch.cuda.max_memory_allocated(device) / 2**30)
        got[1] = max(got[1], torch.cuda.max_memory_reserved(device) / 2**30)
        torch.cuda.reset_peak_memory_stats(device)

    losses, times, micro_losses = {}, [], {}
    while step < args.steps:
        t0 = time.perf_counter()
        micro = step_micro_batches(order, rows_consumed, args.micro_batch_size, args.grad_accum, rank, world)
        local_labels = sum(count_label_tokens(torch.from_numpy(b["labels"]), torch.from_numpy(b["position_ids"]))
                           for b in micro)
        (global_labels,) = all_reduce_sum([local_labels])
        scale = world / max(global_labels, 1.0)  # FSDP's reduce-scatter averages over ranks, as DDP's all-reduce
        local_loss = 0.0
        for i, mb in enumerate(micro):
            trace_start(i if step == 0 else None)
            loss_sum, _ = step_fn(**{k: torch.from_numpy(v).to(device) for k, v in mb.items()})
            trace_start(None)
            mark("forward")
            (loss_sum * scale).backward()
            mark("backward")
            micro_losses.setdefault(step + 1, []).append(float(loss_sum.detach()))
            local_loss += micro_losses[step + 1][-1]
        # finetune.py's clipping (until 2026-12-07 torch's clip_grad_norm_: the bench results of that day)
        clip_gradients(trainable, 1.0, all_reduce_through_cpu if args.stage_through_cpu else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mark("clip + optimizer")
        step += 1
        rows_consumed += rows_per_step
        (total_loss,) = all_reduce_sum([local_loss])
        losses[step] = total_loss / max(global_labels, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if args.save_at and step == args.save_at:
            rng = [capture_rng()]
            if sharded:
                rng = [None] * world
                dist.all_gather_object(rng, capture_rng())
            trainer_state = {"rows_consumed": rows_consumed, "world_size": world, "loss": losses[step]}
            if sharded:
                save_sharded_checkpoint(out, step, peft_model=model, optimizer=optimizer,
                                        scheduler=scheduler, trainer_state=trainer_state, rng_states=rng, keep=2,
                                        rank=rank)
            else:
                save_checkpoint(out, step, peft_model=model, optimizer=optimizer, scheduler=scheduler,
                                trainer_state=trainer_state, rng_states=rng, keep=2)

    if sharded:
        if args.stage_through_cpu:
            lora = lora_staged_through_cpu(model)
            if rank == 0:
                model.save_pretrained(str(out / "adapter"), state_dict=lora)
        else:
            fsdp.save_adapter(model, out / "adapter", is_main=rank == 0)
    else:
        model.save_pretrained(str(out / "adapter"))
    mem = {}
    if device.type == "cuda":
        mark("gather adapter")
        mem = {"peak_allocated_gib": max(a for a, _ in phase_peaks.values()),
               "peak_reserved_gib": max(r for _, r in phase_peaks.values()),
               "phase_peaks_gib": {k: {"allocated": a, "reserved": r} for k, (a, r) in phase_peaks.items()},
               "load_peak_allocated_gib": load_peak / 2**30, "after_load_allocated_gib": after_load / 2**30}
    mine = {"memory": mem, "micro_losses": micro_losses, "rank": rank, "trace": trace}
    if sharded and args.check_gathered:
        mine["gathered_mismatches"] = mismatches
    per_rank = [mine]
    if sharded:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
    if rank == 0:
        seq = int(meta["max_len"])
        timed = times[1:] or times  # the first step compiles kernels and warms the allocator
        (out / "result.json").write_text(json.dumps({
            "world_size": world, "losses": {str(k): v for k, v in losses.items()},
            "memory_per_rank": [r["memory"] for r in per_rank],
            "micro_losses_per_rank": [r["micro_losses"] for r in per_rank],
            "gathered_mismatches_per_rank": [r.get("gathered_mismatches") for r in per_rank],
            "first_forward_trace_per_rank": [r["trace"] for r in per_rank],
            "step_times_s": times, "tokens_per_s": rows_per_step * seq * len(timed) / sum(timed),
            "resumed_from": args.resume, "staged_through_cpu": args.stage_through_cpu}, indent=2) + "\n")
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
