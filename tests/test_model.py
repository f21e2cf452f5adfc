"""qlora/model.py + qlora/loss.py on the tiny Llama-3 model (CPU): 4-bit base, LoRA placement, compute dtype,
document isolation in packed rows, label masking, chunked loss, learning on a repeated batch."""
from __future__ import annotations

import json
import shutil
import warnings

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qlora.data import packed_position_ids
from qlora.errors import UserError
from qlora.llama3 import BOS_ID, END_OF_TEXT_ID, IGNORE_INDEX, LORA_TARGETS, PAD_ID
from qlora.loss import linear_cross_entropy_sum, shift_labels
from qlora.model import (apply_lora, check_lora_placement, count_parameters, cpu_has_native_bf16, forward_loss,
                         load_base_model, resolve_compute_dtype, validate_model_dir)
from shard_fixtures import pack_row, random_doc


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The CPU default: fp32 compute (resolve_compute_dtype)."""
    return apply_lora(load_base_model(tiny_model_dir, quantize="nf4"), r=8, alpha=16, seed=0)


@pytest.fixture(scope="module")
def bf16_lora_model(tiny_model_dir):
    """The GPU recipe's dtype, forced on the CPU (kept to tiny inputs: bf16 is emulated on AVX2-only CPUs)."""
    return apply_lora(load_base_model(tiny_model_dir, quantize="nf4", compute_dtype=torch.bfloat16), r=8, alpha=16,
                      seed=0)


def batch_of(rows):
    ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    labels = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
    pos = torch.from_numpy(np.stack([packed_position_ids(r[2], len(r[0])) for r in rows]))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def test_base_is_nf4_double_quant_and_lora_on_every_target_of_every_block(lora_model, tiny_model_dir):
    base = lora_model.get_base_model()
    n_layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(base.model.layers) == n_layers
    expected_trainable = 0
    for block in base.model.layers:
        for name in LORA_TARGETS:
            parent = block.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
            module = getattr(parent, name)
            assert isinstance(module.base_layer, bnb.nn.Linear4bit), name
            qs = module.base_layer.weight.quant_state
            assert qs.quant_type == "nf4" and qs.nested, "NF4 with double quantization (nested constants)"
            assert module.base_layer.compute_dtype == torch.float32
            a, b = module.lora_A["default"], module.lora_B["default"]
            assert a.weight.requires_grad and b.weight.requires_grad
            expected_trainable += 8 * (module.in_features + module.out_features)
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * n_layers * len(LORA_TARGETS)
    assert count_parameters(lora_model)[0] == expected_trainable
    # the frozen base is in the one compute dtype, fp32 on the CPU (on the GPU: bf16, test_compute_dtype_reaches...)
    frozen_float = {p.dtype for p in lora_model.parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen_float == {torch.float32}
    norms = [m for n, m in base.named_modules() if n.endswith("norm")]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)


def test_lora_placement_check_catches_bad_targets(lora_model):
    with pytest.raises(UserError, match="not projections"):
        check_lora_placement(lora_model, ("q_proj", "no_such_proj"))
    w = lora_model.get_base_model().model.norm.weight
    w.requires_grad_(True)
    try:
        with pytest.raises(AssertionError, match="non-LoRA parameter is trainable"):
            check_lora_placement(lora_model)
    finally:
        w.requires_grad_(False)


@pytest.mark.parametrize("model_fixture, dtype", [("lora_model", torch.float32), ("bf16_lora_model", torch.bfloat16)])
def test_compute_dtype_reaches_the_4bit_matmuls(request, model_fixture, dtype):
    lora_model = request.getfixturevalue(model_fixture)
    seen = []

    def hook(module, inputs, output):
        seen.append((inputs[0].dtype, output.dtype))

    handles = [m.register_forward_hook(hook) for m in lora_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    try:
        rows = [pack_row([random_doc(np.random.default_rng(0), 20)], 32)]
        loss, n = forward_loss(lora_model, batch_of(rows))
        loss.backward()  # recompute under checkpointing runs the hooks again: still the same dtype
    finally:
        for h in handles:
            h.remove()
        lora_model.zero_grad(set_to_none=True)
    n_modules = sum(isinstance(m, bnb.nn.Linear4bit) for m in lora_model.modules())
    assert len(seen) >= 2 * n_modules  # forward + checkpoint recompute
    assert set(seen) == {(dtype, dtype)}


def test_compute_dtype_is_bf16_on_cuda_and_fp32_on_every_cpu():
    for native in (True, False):  # both answers of the CPU capability check
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto and fp32 never warn
            assert resolve_compute_dtype("auto", "cpu", native_cpu_bf16=native) == torch.float32
            assert resolve_compute_dtype("fp32", "cpu", native_cpu_bf16=native) == torch.float32
            assert resolve_compute_dtype("auto", "cuda", native_cpu_bf16=native) == torch.bfloat16
            assert resolve_compute_dtype("bf16", "cuda:1", native_cpu_bf16=native) == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_compute_dtype("bf16", "cpu", native_cpu_bf16=True) == torch.bfloat16
    with pytest.warns(UserWarning, match="emulated"):
        assert resolve_compute_dtype("bf16", "cpu", native_cpu_bf16=False) == torch.bfloat16
    with pytest.raises(UserError, match="fp32 runs on the CPU only"):
        resolve_compute_dtype("fp32", "cuda")
    with pytest.raises(UserError, match="choose auto, bf16 or fp32"):
        resolve_compute_dtype("fp16", "cpu")
    assert isinstance(cpu_has_native_bf16(), bool)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_logits_in_a_packed_row_equal_the_document_alone(tiny_model_dir, attn):
    """Tolerance: max |diff| <= 0.02 on bf16 logits (std ~0.5 here); without isolation the diff is far larger."""
    model = load_base_model(tiny_model_dir, quantize="nf4", attn_implementation=attn)
    model.eval()
    rng = np.random.default_rng(1)
    doc_a, doc_b = random_doc(rng, 23), random_doc(rng, 17)
    max_len = 48
    row = pack_row([doc_a, doc_b], max_len)
    ids = torch.from_numpy(row[0].astype(np.int64))[None]
    pos = torch.from_numpy(packed_position_ids(row[2], max_len))[None]

    def logits(input_ids, position_ids):
        with torch.no_grad():
            return model(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                         use_cache=False).logits.float()

    packed = logits(ids, pos)
    alone_b = logits(torch.tensor([doc_b]), torch.arange(len(doc_b))[None])
    alone_a = logits(torch.tensor([doc_a]), torch.arange(len(doc_a))[None])
    b0, b1 = len(doc_a), len(doc_a) + len(doc_b)
    assert (packed[0, b0:b1] - alone_b[0]).abs().max() <= 0.02
    assert (packed[0, :b0] - alone_a[0]).abs().max() <= 0.02
    # The same row without restarting positions (doc B sees doc A): must differ clearly, or the test proves nothing.
    leaky = logits(ids, torch.arange(max_len)[None])
    assert (leaky[0, b0:b1] - alone_b[0]).abs().max() > 0.1


def test_label_masking_reaches_the_loss(lora_model):
    """Loss = sum of CE exactly over positions whose next token has a label inside the same document."""
    rng = np.random.default_rng(2)
    prompt_doc = random_doc(rng, 20)
    masked_prompt = [i < 12 for i in range(len(prompt_doc))]  # like a chat prompt: first 12 tokens unlabelled
    other = random_doc(rng, 10)
    row = pack_row([prompt_doc, other], 40, masked=[masked_prompt, [False] * len(other)])
    batch = batch_of([row])
    with torch.no_grad():
        loss_sum, n = forward_loss(lora_model, batch)
        base = lora_model.get_base_model()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = base.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False).last_hidden_state
            full_logits = base.lm_head(hidden).float()[0]
    labels = batch["labels"][0]
    expect_positions = [t for t in range(39) if labels[t + 1] != IGNORE_INDEX]
    # prompt (next label masked), the doc-boundary position (next = BOS of doc 2, masked) and padding are excluded
    assert expect_positions == list(range(11, 19)) + list(range(20, 29))
    ref = F.cross_entropy(full_logits[expect_positions], labels[[t + 1 for t in expect_positions]], reduction="sum")
    assert int(n) == len(expect_positions)
    torch.testing.assert_close(loss_sum, ref, rtol=2e-3, atol=1e-2)
    # A shard that forgot to mask a document's first label still gets no loss across the boundary.
    leaky_labels = batch["labels"].clone()
    leaky_labels[0, 20] = BOS_ID
    assert int((shift_labels(leaky_labels, batch["position_ids"]) != IGNORE_INDEX).sum()) == len(expect_positions)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_chunked_linear_cross_entropy_matches_full_logits(dtype, tol):
    """The frozen-lm_head path computes d/d hidden in its forward; it must equal autograd through full logits, scaled
    by the upstream gradient (the training step multiplies the loss by world/global label tokens)."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = IGNORE_INDEX
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_size=4)
    (loss * 0.37).backward()
    g = hidden.grad.clone()
    hidden.grad = None
    ref = F.cross_entropy(F.linear(hidden, weight).float().reshape(-1, 50), targets.reshape(-1), reduction="sum")
    (ref * 0.37).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g, hidden.grad, rtol=tol, atol=tol)
    assert not torch.equal(g[0, :4], g[0, 4:8])  # control: masked positions get zero gradient, labelled ones do not
    assert float(g[0, :4].abs().sum()) == 0.0
    # a trainable weight takes the checkpointed path: same loss, and gradients for both inputs
    w = weight.clone().requires_grad_(True)
    hidden.grad = None
    loss_w = linear_cross_entropy_sum(hidden, w, targets, chunk_size=4)
    loss_w.backward()
    torch.testing.assert_close(loss_w, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad * 0.37, g, rtol=tol, atol=tol)
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
    # no target at all: zero loss that still backpropagates (DDP needs a gradient from every rank)
    empty = linear_cross_entropy_sum(hidden, weight, torch.full((3, 11), IGNORE_INDEX))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_loss_decreases_on_a_repeated_batch(tiny_model_dir):
    model = apply_lora(load_base_model(tiny_model_dir), r=8, alpha=16, seed=0)
    rows = [pack_row([random_doc(np.random.default_rng(3), 24)], 32)]
    batch = batch_of(rows)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss_sum, n = forward_loss(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss_sum / n))
    assert losses[-1] < losses[0] - 1.0, losses  # a frozen model would stay at ~ln(128256)=11.8


def test_model_dir_validation_lists_every_missing_file(tiny_model_dir, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"missing: tokenizer\.json, \*\.safetensors"):
        validate_model_dir(broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (broken / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"missing: tokenizer\.json, model-00002-of-00002\.safetensors$"):
        validate_model_dir(broken)
    with pytest.raises(UserError, match="no such directory"):
        validate_model_dir(tmp_path / "nope")


def test_packed_position_ids_restart_per_document_and_for_padding():
    assert packed_position_ids([3, 2], 8).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert packed_position_ids([4], 4).tolist() == [0, 1, 2, 3]
    assert PAD_ID == END_OF_TEXT_ID
