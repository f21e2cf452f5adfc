"""GPU-only checks of the fast path (qlora/speed.py) against the plain reference path, on a small Llama-3-shaped model.

Run on a CUDA machine: `python -m pytest -q -m gpu tests/test_gpu.py` (skipped on CPU). Output recorded in
bench/RESULTS.md. Tolerances: both paths compute in bf16 with fp32 accumulation, in a different order (fused kernels,
one addmm instead of add chains, flex vs sdpa attention), so losses agree to ~1e-3 relative; we allow 1e-2 for the
loss and a gradient cosine similarity of at least 0.99. Tests that compare to a tighter tolerance say why next to
it, with a control that must land outside it.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

LOSS_RTOL = 1e-2


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from qlora.tiny_model import build_tiny_llama3

    # 4 blocks, hidden 512, 8 heads / 2 KV heads (head_dim 64), untied lm_head like Llama-3-8B
    return build_tiny_llama3(tmp_path_factory.mktemp("gpu") / "model", layers=4, hidden=512, intermediate=1024,
                             heads=8, kv_heads=2, tie_word_embeddings=False)


def make_model(model_dir, *, kernels, attn, checkpoint_layers=-1, seed=0):
    from qlora.model import apply_lora, load_base_model

    base = load_base_model(model_dir, quantize="nf4", attn_implementation=attn, device="cuda")
    model = apply_lora(base, r=16, alpha=16, dropout=0.0, gradient_checkpointing=checkpoint_layers != 0,
                       checkpoint_layers=checkpoint_layers, kernels=kernels, seed=seed)
    # non-zero B so the LoRA branch changes the output (peft initialises B to zero)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    model.train()
    return model


def packed_batch(doc_lens, seq, seed=0):
    from qlora.llama3 import BOS_ID, END_OF_TEXT_ID, PAD_ID

    g = torch.Generator().manual_seed(seed)
    ids, labels, pos = [], [], []
    for n in doc_lens:
        d = [BOS_ID] + torch.randint(1000, 120000, (n - 2,), generator=g).tolist() + [END_OF_TEXT_ID]
        ids += d
        labels += [-100] + d[1:]
        pos += list(range(n))
    pad = seq - len(ids)
    ids += [PAD_ID] * pad
    labels += [-100] * pad
    pos += list(range(pad))
    t = lambda x: torch.tensor([x], device="cuda")  # noqa: E731
    return {"input_ids": t(ids), "labels": t(labels), "position_ids": t(pos)}


def loss_and_grads(model, batch):
    from qlora.model import forward_loss

    model.zero_grad(set_to_none=True)
    loss_sum, n = forward_loss(model, batch)
    (loss_sum / n).backward()
    grads = {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.requires_grad}
    return float(loss_sum / n), grads


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_fast_path_loss_and_grads_match_reference(small_model_dir):
    batch = packed_batch([700, 300, 900, 100], 2048)
    ref = make_model(small_model_dir, kernels="none", attn="sdpa")
    fast = make_model(small_model_dir, kernels="liger", attn="flex_attention")
    assert getattr(fast, "_qlora_fused_loss", False) and not getattr(ref, "_qlora_fused_loss", False)
    l_ref, g_ref = loss_and_grads(ref, batch)
    l_fast, g_fast = loss_and_grads(fast, batch)
    print(f"reference loss {l_ref:.6f}, fast loss {l_fast:.6f}, rel diff {abs(l_fast - l_ref) / l_ref:.2e}")
    assert abs(l_fast - l_ref) <= LOSS_RTOL * abs(l_ref)
    cos = {k: cosine(g_ref[k], g_fast[k]) for k in g_ref}
    worst = min(cos, key=cos.get)
    print(f"gradient cosine similarity: min {cos[worst]:.5f} ({worst}), mean {sum(cos.values()) / len(cos):.5f}")
    assert cos[worst] >= 0.99


def test_partial_checkpointing_same_loss_and_grads(small_model_dir):
    batch = packed_batch([1000, 1048], 2048, seed=3)
    every = make_model(small_model_dir, kernels="liger", attn="flex_attention", checkpoint_layers=-1)
    l_all, g_all = loss_and_grads(every, batch)
    del every
    two = make_model(small_model_dir, kernels="liger", attn="flex_attention", checkpoint_layers=2)
    from qlora.speed import decoder_layers

    assert [bool(getattr(layer, "gradient_checkpointing", False)) for layer in decoder_layers(two)] == \
        [True, True, False, False]
    l_two, g_two = loss_and_grads(two, batch)
    assert l_two == pytest.approx(l_all, rel=1e-4)
    assert min(cosine(g_all[k], g_two[k]) for k in g_all) >= 0.999


# Document isolation: with random weights every loss sits near ln(vocab), so a leak moves the mean loss only a little
# (~8e-4 relative on this model on CPU); the isolated row matched to ~5e-6 on an H100. 1e-4 separates the two, and
# the leaking control below must land on the other side of it, or the test proves nothing.
ISOLATION_RTOL = 1e-4


@pytest.mark.parametrize("kernels,attn", [("liger", "flex_attention"), ("none", "flex_attention"), ("none", "sdpa")])
def test_document_isolation(small_model_dir, kernels, attn):
    """The loss of a document inside a packed row equals its loss alone (its neighbours' labels masked)."""
    model = make_model(small_model_dir, kernels=kernels, attn=attn)
    from qlora.model import forward_loss

    row = packed_batch([600, 500, 800], 2048, seed=5)
    alone = packed_batch([500], 2048, seed=99)  # one shape for all tests: flex attention compiles once
    # put the same 500-token document in the middle of the row
    row["input_ids"][0, 600:1100] = alone["input_ids"][0, :500]
    row["labels"][0, :] = -100
    row["labels"][0, 600:1100] = alone["labels"][0, :500]
    # the same row with positions running through it: one causal sequence, the document sees its left neighbour
    leaky = {**row, "position_ids": torch.arange(2048, device="cuda")[None]}
    with torch.no_grad():
        l_row, n_row = forward_loss(model, row)
        l_alone, n_alone = forward_loss(model, alone)
        l_leaky, n_leaky = forward_loss(model, leaky)
    assert int(n_row) == int(n_alone) == int(n_leaky) == 499
    rel = lambda x: abs(float(x) - float(l_alone)) / float(l_alone)  # noqa: E731
    print(f"{kernels}/{attn}: in row {float(l_row) / 499:.6f}, alone {float(l_alone) / 499:.6f} "
          f"(rel {rel(l_row):.1e}); leaking control {float(l_leaky) / 499:.6f} (rel {rel(l_leaky):.1e})")
    assert rel(l_row) <= ISOLATION_RTOL
    assert rel(l_leaky) > ISOLATION_RTOL


def test_bf16_reaches_4bit_matmuls_on_fast_path(small_model_dir):
    import bitsandbytes as bnb

    model = make_model(small_model_dir, kernels="liger", attn="flex_attention")
    seen = set()
    orig = bnb.functional.dequantize_4bit

    def spy(*a, **k):
        out = orig(*a, **k)
        seen.add(out.dtype)
        return out

    hooks = [m.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
             for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    bnb.functional.dequantize_4bit = spy
    try:
        loss_and_grads(model, packed_batch([512, 1536], 2048))
    finally:
        bnb.functional.dequantize_4bit = orig
        for h in hooks:
            h.remove()
    assert seen == {torch.bfloat16}


# The adapter saved from the fast path and loaded into plain peft gave the fast path's loss to 1.7e-7 relative on an
# H100 (11.853233 vs 11.853231, bench/RESULTS.md); 2e-6 leaves room for other GPUs. The control, the same adapter
# as it was before its two training steps (a save that lost the training), must land outside it (1.0e-4 on CPU).
ADAPTER_RTOL = 2e-6


def test_fast_path_adapter_loads_in_plain_peft(small_model_dir, tmp_path):
    """Train two steps on the fast path, save, load into a plain peft model: same loss on a new batch."""
    from peft import PeftModel

    from qlora.model import forward_loss, load_base_model

    fast = make_model(small_model_dir, kernels="liger", attn="flex_attention")
    fast.save_pretrained(tmp_path / "untrained")
    opt = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-3)
    for s in range(2):
        loss_and_grads(fast, packed_batch([1024, 1024], 2048, seed=10 + s))
        opt.step()
    fast.save_pretrained(tmp_path / "adapter")
    batch = packed_batch([700, 1348], 2048, seed=42)
    with torch.no_grad():
        l_fast, n = forward_loss(fast, batch)

    def plain_loss(adapter_dir):
        plain = PeftModel.from_pretrained(load_base_model(small_model_dir, quantize="nf4", attn_implementation="sdpa",
                                                          device="cuda"), adapter_dir)
        with torch.no_grad():
            loss_sum, n_plain = forward_loss(plain, batch)
        assert int(n_plain) == int(n)
        return float(loss_sum)

    l_plain, l_untrained = plain_loss(tmp_path / "adapter"), plain_loss(tmp_path / "untrained")
    rel = lambda x: abs(x - float(l_fast)) / float(l_fast)  # noqa: E731
    print(f"after 2 fast steps: fast-path loss {float(l_fast) / float(n):.6f}, plain peft {l_plain / float(n):.6f} "
          f"(rel {rel(l_plain):.1e}); untrained adapter control {l_untrained / float(n):.6f} "
          f"(rel {rel(l_untrained):.1e})")
    assert rel(l_plain) <= ADAPTER_RTOL
    assert rel(l_untrained) > ADAPTER_RTOL


# ------------------------------------------------------------------------------ predict.py's continuous batching
@pytest.fixture(scope="module")
def decode_model_dir(tmp_path_factory):
    from qlora.tiny_model import build_tiny_llama3

    # weights std 0.1 (not 0.02): greedy answers then depend on the prompt instead of repeating one token
    return build_tiny_llama3(tmp_path_factory.mktemp("gpu_decode") / "model", layers=4, hidden=512,
                             intermediate=1024, heads=8, kv_heads=2, tie_word_embeddings=False, init_std=0.1)


def _decode_records(n):
    from qlora.generation import PromptRecord, format_prompt

    g = torch.Generator().manual_seed(0)
    words = ["C4", "D4", "E4", "F4", "G4", "A4", "B4", "rest", "hold", "up", "down"]
    records = []
    for i in range(n):
        text = " ".join(words[j] for j in torch.randint(0, len(words), (int(torch.randint(3, 60, (1,), generator=g)),),
                                                        generator=g))
        fmt = ("chat", "plain")[i % 2]
        records.append(PromptRecord(prompt=text, format=fmt, model_input=format_prompt(text, fmt)))
    return records


def _continuous(model, tokenizer, records, cfg, slots, use_graph):
    from qlora.decoding import SlotDecoder, generate_continuous, slot_length
    from qlora.generation import encode_prompts

    max_len = slot_length([len(x) for x in encode_prompts(tokenizer, records)], cfg.max_new_tokens)
    decoder = SlotDecoder(model, slots=slots, max_len=max_len, use_graph=use_graph)
    assert (decoder.graph is not None) == use_graph
    return {(s.record.prompt, s.record.format, s.index): s.token_ids
            for s in generate_continuous(decoder, tokenizer, records, cfg)}


def _common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("weights", ["fp32", "bf16", "nf4"])
def test_continuous_decoding_matches_generate(decode_model_dir, weights):
    """predict.py's decoder on CUDA against generate() on left-padded batches, 48 chat/plain prompts, 16 slots.

    fp32: the same greedy answers, token for token, eager and as a recorded CUDA graph. bf16 and NF4 (4-bit, decoded
    eagerly through bitsandbytes): rounding differs with the batch shape and flips near-ties of this random model
    (on CPU generate() at batch 1 and at batch 16 agree on only 20 of 48 bf16 answers, on all 48 in fp32), so the
    answers must agree on average for a quarter of their length (a decoder that mixes up its cache agrees for ~1
    token); the 8B-shape count is bench/bench_predict.py's. The graph gives exactly the eager step's tokens (same
    kernels), and seeded sampling repeats."""
    from transformers import AutoModelForCausalLM

    from qlora.generation import SamplingConfig, generate
    from qlora.llama3 import load_tokenizer
    from qlora.model import load_base_model

    tokenizer = load_tokenizer(decode_model_dir)
    if weights == "nf4":
        model = load_base_model(decode_model_dir, quantize="nf4", attn_implementation="sdpa", device="cuda").eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(decode_model_dir), attn_implementation="sdpa",
                                                     dtype=torch.float32 if weights == "fp32" else torch.bfloat16)
        model = model.cuda().eval()
    records = _decode_records(48)
    cfg = SamplingConfig(max_new_tokens=32, batch_size=16)
    plain = {(s.record.prompt, s.record.format, s.index): s.token_ids for s in generate(model, tokenizer, records, cfg)}
    eager = _continuous(model, tokenizer, records, cfg, 16, use_graph=False)
    same = sum(eager[k] == plain[k] for k in plain)
    prefix = sum(_common_prefix(eager[k], plain[k]) for k in plain) / len(plain)
    print(f"{weights}: continuous == generate() for {same}/{len(plain)} greedy answers, common prefix {prefix:.1f} "
          f"of {cfg.max_new_tokens} tokens on average")
    assert len({tuple(t) for t in plain.values()}) > len(plain) // 2  # control: answers depend on the prompt
    if weights == "fp32":
        assert eager == plain
    else:
        assert prefix >= cfg.max_new_tokens / 4
    if weights != "nf4":
        assert _continuous(model, tokenizer, records, cfg, 16, use_graph=True) == eager
    if weights == "bf16":
        sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, num_samples=2, seed=3)
        a = _continuous(model, tokenizer, records[:8], sampling, 16, use_graph=True)
        assert a == _continuous(model, tokenizer, records[:8], sampling, 16, use_graph=True)
        assert a != _continuous(model, tokenizer, records[:8], SamplingConfig(**{**vars(sampling), "seed": 4}), 16,
                                use_graph=True)


def finetune_two_ranks_and_one(model_dir, tmp_path, flags, ranks_flags=()):
    """finetune.py with `flags` as 2 ranks x micro-batch 1 on cuda:0 (gloo, through the QLORA_TEST_ONE_GPU hook: NCCL
    refuses two ranks on one device) and as one process x grad-accum 2 on the same rows; `ranks_flags` for the 2
    ranks only. Returns (the 2 ranks' run directory, the one process's)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from qlora.distributed import ONE_GPU_TEST_HOOK
    from shard_fixtures import pretokenized_task

    root = Path(__file__).resolve().parent.parent
    data = pretokenized_task(tmp_path / "data", model_dir, n_train=48, n_val=8, max_len=256)
    common = [str(c) for c in ["--model", model_dir, "--data", data, "--micro-batch-size", 1, "--lr", "1e-3",
                               "--seed", 0, *flags]]
    # keep PYTHONPATH's entries (the device machine's carried wheels live there)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           ONE_GPU_TEST_HOOK: "1"}
    run2, run1 = tmp_path / "ranks2", tmp_path / "single"
    for cmd, run in (([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(root / "finetune.py"), "--grad-accum", "1", *ranks_flags], run2),
                     ([sys.executable, str(root / "finetune.py"), "--grad-accum", "2"], run1)):
        proc = subprocess.run([*cmd, *common, "--output-dir", str(run)], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return run2, run1


def step_records(run) -> dict:
    """metrics.jsonl's training records of a run directory, by step."""
    import json

    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def adapter_difference(run_a, run_b) -> float:
    """The largest absolute difference between two runs' final adapters (same weight names asserted)."""
    from safetensors.torch import load_file

    wa = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.parametrize("flags", [[], ["--low-memory"]], ids=["fast-path", "low-memory"])
def test_ddp_two_ranks_on_one_gpu_match_one_process(small_model_dir, tmp_path, flags):
    """finetune.py's own CUDA DDP code (issue 13): 2 ranks x micro-batch 1 on cuda:0 (gloo, through the
    QLORA_TEST_ONE_GPU hook: NCCL refuses two ranks on one device) against one process x grad-accum 2 on the same
    rows, through the fast path (Liger, flex attention, planned checkpointing) and --low-memory (every block
    recomputed). Same per-step losses and gradient norms (1e-4 relative: only the summation order of the gradients
    differs), bit-identical LoRA weights on both ranks at every checkpoint, and the same final adapter (1e-4)."""
    import json

    run2, run1 = finetune_two_ranks_and_one(small_model_dir, tmp_path,
                                            ["--max-steps", 4, "--save-every", 2, "--eval-every", 4, *flags])
    resolved2 = json.loads((run2 / "config.json").read_text())["resolved"]
    assert resolved2["world_size"] == 2 and resolved2["device"] == "cuda:0" and resolved2["kernels"] == "liger"
    assert resolved2["attn_implementation"] == "flex_attention"

    two, one = step_records(run2), step_records(run1)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        print(f"{flags} step {step}: loss {two[step]['loss']:.9f} vs {one[step]['loss']:.9f}, grad norm "
              f"{two[step]['grad_norm']:.9f} vs {one[step]['grad_norm']:.9f}")
        assert two[step]["label_tokens"] == one[step]["label_tokens"]
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4)
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-4)
    # control: other rows give losses far outside the tolerance
    assert all(one[s]["loss"] != pytest.approx(one[s + 1]["loss"], rel=1e-3) for s in (1, 2, 3))
    for step in (2, 4):
        digests = json.loads((run2 / f"checkpoints/step-{step:07d}/trainer_state.json").read_text())[
            "lora_sha256_per_rank"]
        assert len(digests) == 2 and digests[0] == digests[1], f"ranks diverged at step {step}"
    worst = adapter_difference(run2, run1)
    print(f"{flags} final adapter: largest difference {worst:.3g}")
    assert worst <= 1e-4


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw"], ids=["8bit", "32bit"])
def test_fsdp_two_ranks_on_one_gpu_match_one_process(small_model_dir, tmp_path, optimizer):
    """finetune.py under FSDP on CUDA (issue 12): 2 ranks x micro-batch 1 on cuda:0 (gloo, QLORA_TEST_ONE_GPU) against
    one process x grad-accum 2 on the same rows, fast path, gradients clipped (0.3), 8-bit and 32-bit Adam states.
    The first step's loss is the same forward on the same weights: equal to the last bit (with the 4-bit bytes
    stored as bf16, FSDP's gather on the GPU changed their NaN patterns: 5.5e-5 apart; cast to bf16 by torch 2.11's
    FSDP, ~ln(vocab): bench/RESULTS.md). Every step within 1e-5 relative (the issue's target). With torch's
    clip_grad_norm_ the norm of the sharded gradients differed in the last bit, and the bf16 copies of the LoRA
    weights turned that into 7.1e-5 (8-bit states) and 1.1e-4 (32-bit) by step 5 (H100, 2026-12-07):
    qlora.training.clip_gradients sums the squares in fp64 (on the CPU the two are then bit-identical, adapter
    included). Adapter within 1e-3 here."""
    import json

    sharded, single = finetune_two_ranks_and_one(small_model_dir, tmp_path,
                                                 ["--max-steps", 5, "--save-every", 5, "--eval-every", 5,
                                                  "--optimizer", optimizer],
                                                 ranks_flags=["--parallelism", "fsdp"])
    resolved = json.loads((sharded / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["parallelism"] == "fsdp" and resolved["kernels"] == "liger"

    two, one = step_records(sharded), step_records(single)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5]
    rel = {s: abs(two[s]["loss"] - one[s]["loss"]) / one[s]["loss"] for s in one}
    for s in one:
        print(f"{optimizer} step {s}: loss {two[s]['loss']:.9f} (FSDP) vs {one[s]['loss']:.9f}, relative "
              f"{rel[s]:.3g}; grad norm {two[s]['grad_norm']:.9f} vs {one[s]['grad_norm']:.9f}")
    adapter_diff = adapter_difference(sharded, single)
    print(f"{optimizer}: adapter's largest difference {adapter_diff:.3g}")
    assert two[1]["loss"] == one[1]["loss"]
    assert max(rel.values()) <= 1e-5
    assert all(one[s]["loss"] != pytest.approx(one[s + 1]["loss"], rel=1e-3) for s in (1, 2, 3, 4))  # other rows
    assert adapter_diff <= 1e-3
