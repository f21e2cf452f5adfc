"""GPU fast path for QLoRA training: the pieces that make one step faster or smaller, each optional.

Every piece computes the same function as the plain transformers/peft/bitsandbytes code it replaces (tests/test_gpu.py
compares losses and gradients); each was measured on its own in bench/RESULTS.md. None needs FP8 or Hopper-only
instructions: Liger's kernels are plain Triton and run on sm_80 (A100).

- fast_lora (`apply_fast_lora`): peft's 4-bit LoRA forward clones the base output, casts x to the adapter's fp32
  dtype, runs the two small matmuls in fp32 and adds with two more elementwise passes over the (tokens x out)
  output. We keep the fp32 master weights but compute in bf16 and fold scale and add into one GEMM epilogue
  (`addmm`). Trade-off: bf16 LoRA matmuls (fp32 accumulate), the standard mixed-precision choice.
- liger (`apply_liger`): Liger-Kernel's Triton RMSNorm ("llama" casting: bit-for-bit the same math), SwiGLU and
  RoPE. Fewer passes over memory, and RMSNorm saves its bf16 input instead of an fp32 copy.
- fused_mlp (`apply_fused_mlp`): SiLU(gate)*up and down_proj (4-bit base + LoRA) as one autograd function that saves
  only gate and up and recomputes SiLU(gate)*up in the backward: 28 KiB less saved per token and block
  (230 MiB per block at 8192 tokens) for one cheap elementwise pass. More blocks then fit without recompute.
- checkpointing of only the first N blocks (`checkpoint_layers`): recompute costs a third of a block's matmuls; we
  recompute only as many blocks as the memory budget needs (qlora/memory.py chooses N).
- fused linear + cross-entropy (`fused_linear_ce_sum`): Liger's chunked kernel on CUDA, so the 8192 x 128256 logits
  never exist (they are 2 GiB in bf16, 4 GiB in fp32); callers pass the plain chunked version for CPU.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .llama3 import IGNORE_INDEX


def _lora_parts(module):
    """(adapter name, A weight, B weight, scaling) of a peft LoRA layer in plain use, else None (fall back)."""
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return None
    active = list(getattr(module, "active_adapters", []))
    if len(active) != 1 or active[0] not in module.lora_A:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None  # DoRA or dropout: keep peft's own path
    return name, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]


def _fast_lora_forward(self, x, *args, **kwargs):
    parts = _lora_parts(self) if not args and not kwargs else None
    if parts is None:
        return self._peft_forward(x, *args, **kwargs)
    _, wa, wb, scaling = parts
    result = self.base_layer(x)
    dt = result.dtype
    a = F.linear(x.to(dt), wa.to(dt))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), (wb.to(dt) * scaling).t())
    return out.view(result.shape)


def apply_fast_lora(model) -> int:
    """Route every peft bitsandbytes 4-bit LoRA layer through `_fast_lora_forward`. Returns how many were patched."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    n = 0
    for m in model.modules():
        if isinstance(m, LoraLinear4bit) and not hasattr(m, "_peft_forward"):
            m._peft_forward = m.forward
            m.forward = types.MethodType(_fast_lora_forward, m)
            n += 1
    return n


def _liger_rms_forward(self, hidden_states):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", True)


def _liger_mlp_forward(self, x):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


_ROPE = {"depth": 0, "orig": None}


def _rope_dispatch(q, k, cos, sin, *args, **kwargs):
    """Module-level apply_rotary_pos_emb of transformers' Llama: Liger's kernel inside a patched attention module only.

    Liger's Triton autograd function directly, like the other kernels here: its public liger_rotary_pos_emb goes
    through Liger's backend dispatcher, which on first use imports every backend declared for RoPE (CuTe DSL, Ascend)
    and logs a "Backend impl ... could not be imported" warning for each one not installed, before picking this
    same Triton function.
    """
    if _ROPE["depth"]:
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction.apply(q, k, cos, sin)
    return _ROPE["orig"](q, k, cos, sin, *args, **kwargs)


def _attention_with_liger_rope(self, *args, **kwargs):
    _ROPE["depth"] += 1
    try:
        return self._plain_attn_forward(*args, **kwargs)
    finally:
        _ROPE["depth"] -= 1


def apply_liger(model, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True) -> dict:
    """Liger's Triton kernels on a Llama model's modules (instance patches; other models in the process untouched)."""
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for m in model.modules():
        cls = type(m).__name__
        if rms_norm and cls.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_liger_rms_forward, m)
            counts["rms_norm"] += 1
        elif swiglu and cls == "LlamaMLP" and not hasattr(m, "_fused_mlp"):
            m.forward = types.MethodType(_liger_mlp_forward, m)
            counts["swiglu"] += 1
    if rope:
        from transformers.models.llama import modeling_llama

        # The attention module calls a module-level function: route it through a dispatcher that uses Liger's kernel
        # only while one of this model's (patched) attention modules runs.
        if modeling_llama.apply_rotary_pos_emb is not _rope_dispatch:
            _ROPE["orig"] = modeling_llama.apply_rotary_pos_emb
            modeling_llama.apply_rotary_pos_emb = _rope_dispatch
        for m in model.modules():
            if type(m).__name__ == "LlamaAttention" and not hasattr(m, "_plain_attn_forward"):
                m._plain_attn_forward = m.forward
                m.forward = types.MethodType(_attention_with_liger_rope, m)
                counts["rope"] += 1
    return counts


class _SwiGLUDown4bitLoRA(torch.autograd.Function):
    """out = act @ W^T + (act @ A^T) @ (s*B)^T with act = silu(gate) * up and W the 4-bit base weight.

    Saves gate, up (needed for SwiGLU's backward anyway), the tiny (tokens x r) LoRA input, and not act.
    """

    @staticmethod
    def forward(ctx, gate, up, wa, wbs, weight4, quant_state):
        from bitsandbytes.functional import dequantize_4bit
        from liger_kernel.ops.swiglu import swiglu_forward

        gate, up = gate.contiguous(), up.contiguous()
        _, _, act = swiglu_forward(gate, up)
        act2 = act.view(-1, act.shape[-1])
        w = dequantize_4bit(weight4, quant_state).to(act.dtype)
        a = act2 @ wa.t()
        out = torch.addmm(act2 @ w.t(), a, wbs.t())
        del w, act, act2
        ctx.save_for_backward(gate, up, wa, wbs, a)
        ctx.weight4, ctx.quant_state = weight4, quant_state
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        from bitsandbytes.functional import dequantize_4bit
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward

        gate, up, wa, wbs, a = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        grad_wbs = g.t() @ a
        grad_a = g @ wbs
        _, _, act = swiglu_forward(gate, up)
        grad_wa = grad_a.t() @ act.view(-1, act.shape[-1])
        del act
        w = dequantize_4bit(ctx.weight4, ctx.quant_state).to(g.dtype)
        grad_act = torch.addmm(g @ w, grad_a, wa)
        del w
        grad_gate, grad_up = swiglu_backward(gate, up, grad_act.view(gate.shape))
        return grad_gate, grad_up, grad_wa, grad_wbs, None, None


def _fused_mlp_forward(self, x):
    down = self.down_proj
    parts = _lora_parts(down) if hasattr(down, "lora_A") else None
    if (parts is None or getattr(down.base_layer, "bias", None) is not None
            or getattr(down.base_layer.weight, "quant_state", None) is None):  # not 4-bit: plain path
        return self._plain_forward(x)
    _, wa, wb, scaling = parts
    gate, up = self.gate_proj(x), self.up_proj(x)
    dt = gate.dtype
    w4 = down.base_layer.weight
    return _SwiGLUDown4bitLoRA.apply(gate, up, wa.to(dt), wb.to(dt) * scaling, w4, w4.quant_state)


def apply_fused_mlp(model) -> int:
    """SwiGLU + 4-bit down_proj + LoRA as one function that does not save SiLU(gate)*up (see module doc)."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "LlamaMLP" and not hasattr(m, "_fused_mlp"):
            m._plain_forward = m.forward
            m._fused_mlp = True
            m.forward = types.MethodType(_fused_mlp_forward, m)
            n += 1
    return n


def decoder_layers(model):
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and type(m[0]).__name__.endswith("DecoderLayer"):
            return m
    raise ValueError("no decoder layers found")


def checkpoint_layers(model, n: int) -> int:
    """Gradient checkpointing (non-reentrant) on the first n decoder blocks only; n<0 or n>=blocks means all."""
    layers = decoder_layers(model)
    if n == 0:
        for layer in layers:
            layer.gradient_checkpointing = False
        return 0
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n = len(layers) if n < 0 else min(n, len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
    return n


def fused_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies of hidden @ weight^T against targets (IGNORE_INDEX skipped), logits never stored
    (Liger), computed for the labelled tokens only (Liger would run the lm_head over ignored positions too)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from .loss import labelled_rows

    hidden, targets = labelled_rows(hidden, targets)
    if targets.numel() == 0:  # keep the graph connected: DDP needs every rank to produce (zero) gradients
        return (hidden.sum() * 0.0).float()
    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def enable_fast_path(model) -> dict:
    """All of the above on a peft 4-bit LoRA model (CUDA): forward_loss then uses the fused linear-CE."""
    counts = {"fast_lora": apply_fast_lora(model), "fused_mlp": apply_fused_mlp(model)}
    counts.update(apply_liger(model, swiglu=True))
    model._qlora_fused_loss = True
    return counts
