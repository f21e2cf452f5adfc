"""qlora/speed.py pieces that also run on CPU: the bf16 one-GEMM LoRA forward and partial checkpointing.

(The Triton pieces, Liger kernels and the fused SwiGLU+down, are GPU-only: tests/test_gpu.py.) Tolerance: both paths
run the LoRA matmuls in bf16 (peft under forward_loss's autocast, ours explicitly) but add in a different order, so
losses agree to ~1e-5 relative (measured 1.3e-5); we allow 1e-4 and a gradient cosine similarity of 0.999 (measured
0.99984). The control, the LoRA scale doubled, must fail both (measured 2.6e-4 and 0.26).
"""
from __future__ import annotations

import pytest
import torch

from qlora import speed


def _model(model_dir, dropout=0.0, layers_ckpt=-1):
    from qlora.model import apply_lora, load_base_model

    base = load_base_model(model_dir, quantize="nf4", attn_implementation="sdpa", device="cpu")
    model = apply_lora(base, r=8, alpha=16, dropout=dropout, checkpoint_layers=layers_ckpt)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 120000, (1, 64), generator=g)
    labels = ids.clone()
    labels[0, 0] = labels[0, 40] = -100
    pos = torch.cat([torch.arange(40), torch.arange(24)]).unsqueeze(0)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _loss_grads(model):
    from qlora.model import forward_loss

    model.zero_grad(set_to_none=True)
    loss, n = forward_loss(model, _batch())
    (loss / n).backward()
    return float(loss.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_fast_lora_matches_peft(tiny_model_dir):
    model = _model(tiny_model_dir)
    l_ref, g_ref = _loss_grads(model)
    assert speed.apply_fast_lora(model) == 2 * 7  # every 4-bit LoRA projection of both blocks
    l_fast, g_fast = _loss_grads(model)
    assert l_fast == pytest.approx(l_ref, rel=1e-4)
    assert _min_cosine(g_ref, g_fast) >= 0.999
    # control: the same forward with the LoRA scale doubled must fail both tolerances
    for m in model.modules():
        if hasattr(m, "_peft_forward"):
            m.scaling = {k: 2 * v for k, v in m.scaling.items()}
    l_bad, g_bad = _loss_grads(model)
    print(f"fast vs peft: loss rel {abs(l_fast - l_ref) / l_ref:.1e}, gradient cosine {_min_cosine(g_ref, g_fast):.5f}; "
          f"scale x2: {abs(l_bad - l_ref) / l_ref:.1e}, {_min_cosine(g_ref, g_bad):.5f}")
    assert l_bad != pytest.approx(l_ref, rel=1e-4) and _min_cosine(g_ref, g_bad) < 0.999


def _min_cosine(a: dict, b: dict) -> float:
    return min(float(torch.nn.functional.cosine_similarity(a[k].flatten(), b[k].flatten(), dim=0)) for k in a)


def test_fast_lora_keeps_peft_path_with_dropout(tiny_model_dir):
    model = _model(tiny_model_dir, dropout=0.1)
    speed.apply_fast_lora(model)
    lora = next(m for m in model.modules() if hasattr(m, "_peft_forward"))
    assert speed._lora_parts(lora) is None  # dropout: our forward defers to peft's own


def test_checkpoint_layers_first_n(tiny_model_dir):
    model = _model(tiny_model_dir, layers_ckpt=1)
    assert [bool(layer.gradient_checkpointing) for layer in speed.decoder_layers(model)] == [True, False]
    assert speed.checkpoint_layers(model, 0) == 0
    assert not any(layer.gradient_checkpointing for layer in speed.decoder_layers(model))
    assert speed.checkpoint_layers(model, -1) == 2
    l_all, g_all = _loss_grads(model)
    speed.checkpoint_layers(model, 0)
    l_none, g_none = _loss_grads(model)
    assert l_all == pytest.approx(l_none, rel=1e-5)
    assert all(torch.allclose(g_all[k], g_none[k], rtol=1e-3, atol=1e-6) for k in g_all)
