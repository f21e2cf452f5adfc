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
