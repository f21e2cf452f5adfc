"""Summed next-token cross-entropy from the last hidden states, computed chunk by chunk through the lm_head.

Llama-3's vocabulary is 128,256: the fp32 logits of one 8192-token row alone are 4.2 GB, plus as much again for
their gradient. Here only tokens that have a label go through the lm_head, a chunk at a time, and the gradient with
respect to the hidden states is computed in the same pass (the lm_head is frozen, so that is the only gradient it
needs): at most one chunk of logits exists at once, and the backward neither recomputes the logits nor keeps them.
Liger's fused linear cross-entropy does the same on the GPU fast path, but it is a Triton kernel (CUDA only); these
few lines of torch are that idea for the CPU and the plain GPU path, where transformers would materialise all logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .llama3 import IGNORE_INDEX


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


def labelled_rows(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [..., d] and targets [...] flattened to the tokens that have a target: the lm_head (a third of the
    8B model's matmul work at seq 8192) and the loss run on those alone, e.g. only the answers of chat data with
    masked prompts."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # bf16 matmul under autocast, fp32 softmax (log-sum-exp over 128k needs it)
    return F.cross_entropy(logits, targets, reduction="sum")


class _FrozenLinearCrossEntropySum(torch.autograd.Function):
    """sum_t CE(hidden[t] @ weight.T, targets[t]) for a frozen weight, d/d hidden computed chunk by chunk in the forward.

    Per chunk: log-probabilities, then turned in place into softmax - one_hot and multiplied by the weight: two
    matmuls a chunk instead of the three of a checkpointed chunk (forward, recompute, backward).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for i in range(0, targets.numel(), chunk_size):
            h, t = hidden[i:i + chunk_size], targets[i:i + chunk_size]
            logprobs = torch.log_softmax(F.linear(h, weight).float(), dim=-1)
            total -= logprobs.gather(1, t[:, None]).sum()
            if grad_hidden is not None:
                probs = logprobs.exp_()
                probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad_hidden[i:i + chunk_size] = probs.to(h.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_size: int = 1024) -> torch.Tensor:
    """sum_t CE(hidden[t] @ weight.T, targets[t]) over targets != -100, as an fp32 scalar.

    hidden [..., d], weight [vocab, d], targets [...] (already shifted). Returns 0 (still differentiable) when
    there is no target.
    """
    hidden, targets = labelled_rows(hidden, targets)
    if targets.numel() == 0:  # keep the graph connected: DDP needs every rank to produce (zero) gradients
        return (hidden.sum() * 0.0).float()
    if not weight.requires_grad:
        return _FrozenLinearCrossEntropySum.apply(hidden, weight, targets, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, targets.numel(), chunk_size):
        part = (hidden[i:i + chunk_size], weight, targets[i:i + chunk_size])
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, *part, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(*part)
    return total
