"""Building blocks of finetune.py's training loop: the optimizer, the LR schedule, batches on the device, and the
validation loss over all ranks."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .data import PackedShards, eval_micro_batches
from .distributed import Dist
from .fsdp import even_eval_batches


def make_optimizer(params, cfg: TrainConfig):
    """--optimizer over the LoRA weights: bitsandbytes' 8-bit/paged AdamW (the recipe), or torch's AdamW."""
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw": bnb.optim.PagedAdamW}[cfg.optimizer]
    return cls(params, **kw)


@torch.no_grad()
def clip_gradients(params, max_norm: float, all_reduce=None) -> float:
    """Scale the gradients so that their global L2 norm is at most max_norm (0: none); returns the norm before.

    By hand, not torch's clip_grad_norm_: on FSDP's sharded gradients it takes each tensor's norm shard by shard,
    which rounds the norm, and so the clip coefficient, differently from one process's in the last bit. The bf16 copy
    of the updated LoRA weights then rounds a few of them the other way, and the losses drift apart within steps
    (measured, H100: 1e-4 relative after 5 steps under FSDP, with 32-bit Adam too). Squares summed in fp64 make the
    same fp32 coefficient however the gradients are split (over the ranks' shards summed by one all-reduce:
    `all_reduce`, torch.distributed.all_reduce unless given, sums a tensor over the ranks in place).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if not local:
        return 0.0
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in local]).sum()
    if any(isinstance(g, DTensor) for g in grads):  # each rank holds a part of every gradient
        (all_reduce or dist.all_reduce)(squares)
    norm = float(squares.sqrt())
    if max_norm and norm > max_norm:
        torch._foreach_mul_(local, max_norm / (norm + 1e-6))  # torch's coefficient (a scalar, applied in fp32)
    return norm


def apply_settings(optimizer, scheduler, cfg: TrainConfig) -> None:
    """This run's --lr, --weight-decay and --adam-beta1/2 on a restored optimizer and scheduler, from the resumed
    step on. A checkpoint's optimizer state carries the values it was saved with and its scheduler state the old
    --lr (base_lrs): loaded as they are, they would win over the command line. The schedule's shape (warm-up, cosine
    length, floor) is this run's already, `scheduler` having been built from its settings (LambdaLR saves no
    function); stepping it back and forth recomputes the resumed step's LR from the new base LR."""
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler.last_epoch -= 1
    scheduler.step()


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """LR multiplier of optimizer step `step`: linear warm-up to 1, then cosine down to min_ratio at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def to_device(batch: dict, device) -> dict:
    """A batch of numpy arrays (qlora.data) as tensors on `device`."""
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(train_step: torch.nn.Module, val: PackedShards, cfg: TrainConfig, dist: Dist, *,
             sharded: bool = False) -> tuple[float, int]:
    """(mean loss per label token, label tokens) over the validation rows, split across ranks and summed.

    train_step: qlora.model.TrainStep (forward_loss as a module; sharded in place under FSDP, sharded=True).
    """
    batches = list(eval_micro_batches(val, cfg.micro_batch_size, dist.rank, dist.world, cfg.eval_max_rows))
    if sharded:  # every forward gathers weights with all ranks: every rank runs as many, some on a label-less filler
        rows = min(len(val), cfg.eval_max_rows or len(val))
        per_rank = math.ceil(math.ceil(rows / cfg.micro_batch_size) / dist.world)
        filler = next(eval_micro_batches(val, cfg.micro_batch_size, 0, 1, cfg.eval_max_rows))
        batches = even_eval_batches(batches, per_rank, filler)
    train_step.eval()
    loss_sum, n_tokens = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            loss, n = train_step(**to_device(batch, dist.device))
            loss_sum += float(loss)
            n_tokens += float(n)
    train_step.train()
    loss_sum, n_tokens = dist.all_reduce_sum([loss_sum, n_tokens])
    return (loss_sum / n_tokens if n_tokens else float("nan")), int(n_tokens)
