"""qlora/decoding.py (predict.py's continuous batching) on CPU, against transformers' generate() (--decode plain).

Token-for-token comparisons run the tiny model in fp32: in bf16 the summation order, which differs with the padding
side and the batch shape, flips near-ties of a random model now and then (measured on these prompts with this kind of
model: up to 2 of 12 greedy answers differ between the two paths in bf16 as between generate() batches of two sizes,
none in fp32). The GPU check of the same property on the 8B shape is
bench/bench_predict.py; tests/test_gpu.py compares the CUDA graph with eager decoding.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qlora.decoding import (SlotCache, SlotDecoder, bytes_per_slot, generate_continuous, memory_budget,
                            plan_decoding, plan_slots, plan_slots_now, prefill_bytes, slot_attention, slot_length)
from qlora.errors import UserError
from qlora.generation import PromptRecord, SamplingConfig, encode_prompts, format_prompt, generate, reference_losses
from qlora.llama3 import load_tokenizer
from qlora.llama3 import LLAMA3_8B_CONFIG as LLAMA3_8B
from qlora.memory import ALLOCATOR_SLACK_BYTES, CUDA_CONTEXT_BYTES, GiB, projection_shapes

PROMPTS = ["C4", "C4 D4 E4 F4 G4 A4 B4 C4 D4 E4 F4 G4", "G4 A4", "B4 B4 B4 B4 D4", "A4 B4 C4", "D4"]


def _records(references=False):
    return [PromptRecord(prompt=p, format=f, model_input=format_prompt(p, f), reference="E4 F4" if references else None)
            for p in PROMPTS for f in ("chat", "plain")]


@pytest.fixture(scope="module")
def tokenizer(stopping_model_dir):
    return load_tokenizer(stopping_model_dir)


@pytest.fixture(scope="module")
def model(stopping_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(stopping_model_dir), dtype=torch.float32).eval()


def _key(s):
    return s.record.prompt, s.record.format, s.index


def plain(model, tokenizer, records, cfg):
    return {_key(s): (s.token_ids, s.stop_reason) for s in generate(model, tokenizer, records, cfg)}


def continuous(model, tokenizer, records, cfg, slots):
    lengths = [len(x) for x in encode_prompts(tokenizer, records)]
    decoder = SlotDecoder(model, slots=slots, max_len=slot_length(lengths, cfg.max_new_tokens), use_graph=False)
    return decoder, {_key(s): (s.token_ids, s.stop_reason) for s in
                     generate_continuous(decoder, tokenizer, records, cfg)}


# --------------------------------------------------------------------------------------------- same answers
@pytest.mark.parametrize("slots", [1, 5, 24])
def test_greedy_tokens_equal_generate(model, tokenizer, slots):
    """Chat and plain prompts of mixed lengths, one slot to more slots than sequences: every answer is the one
    generate() gives on left-padded batches, token for token, and ends at the same token for the same reason."""
    cfg = SamplingConfig(max_new_tokens=12, batch_size=4)
    want = plain(model, tokenizer, _records(), cfg)
    _, got = continuous(model, tokenizer, _records(), cfg, slots)
    assert got == want
    # controls: answers depend on the prompt; some end at <|eot_id|> (one at its first token), some at the limit
    assert len({tuple(t) for t, _ in want.values()}) == len(want)
    assert {r for _, r in want.values()} == {"stop", "length"} and any(not t for t, _ in want.values())


def test_warm_up_prefills_leave_no_trace(model, tokenizer):
    """On CUDA the decoder runs warm-up prefills at construction (startup, not generation time); the keys and values
    they leave in the slots must not reach any answer."""
    cfg = SamplingConfig(max_new_tokens=12, batch_size=4)
    want = plain(model, tokenizer, _records(), cfg)
    lengths = [len(x) for x in encode_prompts(tokenizer, _records())]
    decoder = SlotDecoder(model, slots=5, max_len=slot_length(lengths, cfg.max_new_tokens), use_graph=False)
    with torch.inference_mode():
        decoder._warm_up(lengths)
    assert int(decoder.cache.lengths.sum()) == 0 and decoder.cache.keys[0].abs().sum() > 0  # it did write the cache
    assert {_key(s): (s.token_ids, s.stop_reason) for s in generate_continuous(decoder, tokenizer, _records(), cfg)} \
        == want


def test_the_equality_check_sees_an_attention_mistake(model, tokenizer, monkeypatch):
    """Control for the test above: a decoder whose step does not see the token it adds must not pass it."""
    cfg = SamplingConfig(max_new_tokens=12, batch_size=4)
    want = plain(model, tokenizer, _records(), cfg)
    monkeypatch.setattr(SlotCache, "decode_mask",
                        lambda self: (self.key_positions < self.lengths[:, None])[:, None, None, :])
    _, got = continuous(model, tokenizer, _records(), cfg, 5)
    assert sum(got[k] != want[k] for k in want) >= len(want) // 2


def test_finished_sequences_free_their_slots(model, tokenizer):
    """With 4 slots for 12 answers that end at mixed lengths, a slot takes the next prompt as soon as its answer ends:
    fewer decode steps than running each batch of 4 until its longest answer, and the same answers."""
    cfg = SamplingConfig(max_new_tokens=12, batch_size=4)
    records = _records()
    want = plain(model, tokenizer, records, cfg)
    decoder, got = continuous(model, tokenizer, records, cfg, 4)
    assert got == want
    lengths = [len(x) for x in encode_prompts(tokenizer, records)]
    order = sorted(range(len(records)), key=lambda i: -lengths[i])  # the order both paths take prompts in
    produced = [len(t) + (r == "stop") for t, r in (want[records[i].prompt, records[i].format, 0] for i in order)]
    batch_steps = sum(max(produced[b:b + 4]) - 1 for b in range(0, len(produced), 4))  # the first comes from prefill
    assert decoder.steps < batch_steps


def test_sampling_is_reproducible_by_seed(model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.5, top_k=50, top_p=0.95, num_samples=3, seed=7)
    records = _records()[:4]
    _, a = continuous(model, tokenizer, records, cfg, 5)
    _, b = continuous(model, tokenizer, records, cfg, 5)
    assert a == b and len(a) == 12
    assert sorted(a) == sorted((r.prompt, r.format, i) for r in records for i in range(3))
    cfg.seed = 8
    _, c = continuous(model, tokenizer, records, cfg, 5)
    assert c != a
    # the three samples of a prompt are drawn separately
    assert len({tuple(a[(records[0].prompt, records[0].format, i)][0]) for i in range(3)}) > 1


def test_slot_attention_equals_attention_over_repeated_heads():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 8, 1, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g),
               torch.randn(3, 2, 10, 16, generator=g))
    mask = (torch.arange(10) < torch.tensor([4, 10, 1])[:, None])[:, None, None, :]
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    ours, _ = slot_attention(module, q, k, v, mask, scaling=0.25)
    scores = q @ k.repeat_interleave(4, dim=1).transpose(2, 3) * 0.25
    want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(4, dim=1)
    assert ours.shape == (3, 1, 8, 16)
    torch.testing.assert_close(ours, want.transpose(1, 2))
    wrong = scores.softmax(-1) @ v.repeat_interleave(4, dim=1)  # control: the mask matters
    assert not torch.allclose(ours, wrong.transpose(1, 2), atol=1e-3)


# ---------------------------------------------------------------------------------------------- reference loss
def test_reference_loss_batched_equals_one_forward_per_record(model, tokenizer):
    """--eval's reference loss over right-padded batches equals the same loss taken one record at a time, and an
    independent full-logits computation of it."""
    from qlora.generation import reference_text

    records = _records(references=True)
    batched = reference_losses(model, tokenizer, records, " ")
    single = reference_losses(model, tokenizer, records, " ", max_tokens=1)
    for (a, n), (b, m) in zip(batched, single):
        assert n == m and a == pytest.approx(b, rel=1e-5)
    shifted_differs = False
    for rec, (loss, n) in zip(records, batched):
        prompt = tokenizer(rec.model_input, add_special_tokens=False)["input_ids"]
        full = tokenizer(rec.model_input + reference_text(rec, " "), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].float()
        want = torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(full[len(prompt):]),
                                                 reduction="sum")
        assert n == len(full) - len(prompt) and loss == pytest.approx(float(want), rel=1e-5)
        off_by_one = torch.nn.functional.cross_entropy(logits[len(prompt):], torch.tensor(full[len(prompt) - 1:-1]),
                                                       reduction="sum")
        shifted_differs |= abs(float(off_by_one) - loss) > 1e-2 * loss  # control
    assert shifted_differs


# --------------------------------------------------------------------------------------------------- planning
def test_plan_slots_refuses_nothing_that_fits():
    for budget, weights, transient, per_slot, sequences in [
        (36 * GiB, 15 * GiB, 1.4 * GiB, 41 * 2**20, 10_000), (36 * GiB, 15 * GiB, 1.4 * GiB, 41 * 2**20, 128),
        (20 * GiB, 19 * GiB, 0.5 * GiB, 0.5 * GiB, 64), (20 * GiB, 19 * GiB, 0.5 * GiB, 0.5 * GiB - 1, 64),
        (20 * GiB, 19 * GiB, 0.5 * GiB, 0.5 * GiB + 1, 64), (10 * GiB, 11 * GiB, 0, 1, 5),
    ]:
        n = plan_slots(budget, weights, transient, per_slot, sequences)
        assert weights + transient + n * per_slot <= budget or n == 0
        assert n == sequences or weights + transient + (n + 1) * per_slot > budget
    assert plan_slots(20 * GiB, 19 * GiB, 0.5 * GiB, 0.5 * GiB, 64) == 1  # exactly one fits: one, not a refusal
    assert plan_slots(20 * GiB, 19 * GiB, 0.5 * GiB, 0.5 * GiB + 1, 64) == 0


def _fake_model(cfg: dict, four_bit: bool):
    """An object with what the planner reads: config, the embedding's element size, parameters (4-bit ones with
    bitsandbytes' quant_state.shape and a uint8 storage of half a byte a weight)."""
    config = SimpleNamespace(**cfg, head_dim=cfg["hidden_size"] // cfg["num_attention_heads"])
    params = []
    for _ in range(cfg["num_hidden_layers"]):
        for n_in, n_out in projection_shapes(cfg).values():
            if four_bit:
                params.append(SimpleNamespace(quant_state=SimpleNamespace(shape=(n_out, n_in)),
                                              numel=lambda n=n_in * n_out // 2: n, element_size=lambda: 1))
            else:
                params.append(SimpleNamespace(numel=lambda n=n_in * n_out: n, element_size=lambda: 2))
    embed = SimpleNamespace(weight=torch.zeros(1, dtype=torch.bfloat16))
    return SimpleNamespace(config=config, parameters=lambda: iter(params), get_input_embeddings=lambda: embed)


def _fake_gpu(monkeypatch, total_gib, held_gib, others_gib=0.0):
    held = held_gib * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: ((total_gib - others_gib) * GiB - held,
                                                                          total_gib * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: held)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: held)


def test_plan_on_an_a100_40gb(monkeypatch):
    """Llama-3-8B in NF4 (5.7 GiB held) on an A100-40GB (39.4 GiB visible to torch): the bf16 copy fits, and as many
    of the 1024 sequences as fit 36 GiB are planned after it (128 KiB of KV cache a token, 320-token slots)."""
    cuda = torch.device("cuda", 0)
    _fake_gpu(monkeypatch, 39.4, 5.7)
    plan = plan_decoding(_fake_model(LLAMA3_8B, True), device=cuda, sequences=1024, max_len=320, num_samples=1,
                         batch_size=None, gpu_memory_gib=None)
    assert plan.dequantize and plan.slots is None
    assert 0.9 * 39.4 * GiB - 1 * GiB < plan.budget_bytes < 36 * GiB
    bf16 = _fake_model(LLAMA3_8B, False)
    _fake_gpu(monkeypatch, 39.4, 15.0)  # what the dequantised 8B holds
    slots = plan_slots_now(bf16, plan, device=cuda, sequences=1024, max_len=320)
    per_slot, fixed = bytes_per_slot(bf16.config, 320, 2), prefill_bytes(bf16.config, 320, 2)
    assert per_slot > 320 * 128 * 1024  # the KV cache alone is 40 MiB a slot
    assert 15 * GiB + fixed + slots * per_slot <= plan.budget_bytes < 15 * GiB + fixed + (slots + 1) * per_slot
    assert 350 < slots < 1024
    # all of a smaller workload; an explicit --batch-size wins (prompts x samples), whatever the memory says
    assert plan_slots_now(bf16, plan, device=cuda, sequences=100, max_len=320) == 100
    explicit = plan_decoding(_fake_model(LLAMA3_8B, True), device=cuda, sequences=1024, max_len=320, num_samples=4,
                             batch_size=600, gpu_memory_gib=None)
    assert explicit.slots == 2400 and not explicit.dequantize  # 2400 bf16 sequences would not fit: stays 4-bit


def test_plan_keeps_4bit_when_bf16_does_not_fit_and_refuses_when_nothing_fits(monkeypatch):
    cuda = torch.device("cuda", 0)
    llama_70b = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64)
    _fake_gpu(monkeypatch, 79.1, 37.0)  # 70B in NF4 on an 80 GB card: bf16 (140 GB) cannot fit
    plan = plan_decoding(_fake_model(llama_70b, True), device=cuda, sequences=64, max_len=512, num_samples=1,
                         batch_size=None, gpu_memory_gib=None)
    assert not plan.dequantize
    assert plan_slots_now(_fake_model(llama_70b, True), plan, device=cuda, sequences=64, max_len=512) == 64
    # another process holds most of the card: the plan shrinks to what is free
    assert memory_budget(40 * GiB, 10 * GiB, 0) < 10 * GiB
    _fake_gpu(monkeypatch, 39.4, 15.0, others_gib=23.5)
    plan = plan_decoding(_fake_model(LLAMA3_8B, False), device=cuda, sequences=8, max_len=8192, num_samples=1,
                         batch_size=None, gpu_memory_gib=None)
    with pytest.raises(UserError, match=r"^not even one sequence of 8192 tokens fits in GPU memory: the model holds "
                                        r"15\.0 GiB and one sequence needs .* GiB more of a .* GiB budget"):
        plan_slots_now(_fake_model(LLAMA3_8B, False), plan, device=cuda, sequences=8, max_len=8192)
    # --gpu-memory-gib plans for another card: 40 GiB on an 80 GB one gives the A100-40GB's budget
    _fake_gpu(monkeypatch, 79.1, 15.0)
    plan40 = plan_decoding(_fake_model(LLAMA3_8B, False), device=cuda, sequences=8, max_len=320, num_samples=1,
                           batch_size=None, gpu_memory_gib=40)
    assert plan40.budget_bytes == 0.9 * 40 * GiB - CUDA_CONTEXT_BYTES - ALLOCATOR_SLACK_BYTES
