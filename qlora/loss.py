"""Summed next-token cross-entropy from the last hidden states, computed chunk by chunk through the lm_head.

Llama-3's vocabulary is 128,256: the fp32 logits of one 8192-token row alone are 4.2 GB, plus as much again for
their gradient. Here only tokens that have a label go through the lm_head, a chunk at a time, and each chunk is
checkpointed, so at most one chunk of logits exists at once, forward or backward. Hand-written (a few lines)
because transformers materialises all logits; a fused kernel (e.g. Liger's fused linear cross-entropy) can replace
`linear_cross_entropy_sum` behind the same signature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Target of position t is the label of token t+1 of the same row; the last position of a row has none.

    With position_ids, a position whose next token starts a new segment (position 0) gets no target either, so no
    loss crosses a document boundary even if a shard forgot to mask a document's first label.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        shifted[:, :-1][position_ids[:, 1:] == 0] = IGNORE_INDEX
    return shifted


def count_label_tokens(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> int:
    return int((shift_labels(labels, position_ids) != IGNORE_INDEX).sum())


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # bf16 matmul, fp32 softmax (log-sum-exp over 128k needs it)
    return F.cross_entropy(logits, targets, reduction="sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_size: int = 1024) -> torch.Tensor:
    """sum_t CE(hidden[t] @ weight.T, targets[t]) over targets != -100, as an fp32 scalar.

    hidden [..., d], weight [vocab, d], targets [...] (already shifted). Returns 0 (still differentiable) when
    there is no target.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    if targets.numel() == 0:  # keep the graph connected: DDP needs every rank to produce (zero) gradients
        return (hidden.sum() * 0.0).float()
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, targets.numel(), chunk_size):
        part = (hidden[i:i + chunk_size], weight, targets[i:i + chunk_size])
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, *part, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(*part)
    return total
