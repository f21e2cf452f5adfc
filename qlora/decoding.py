"""Continuous batching for predict.py: a static KV cache with one row ("slot") per sequence, one new token per slot
per step, and a finished sequence's slot handed to the next prompt at once.

Why this is written here and not taken from transformers (5.17, the cluster's, to 5.23):
  * generate() decodes a fixed batch until its longest answer ends, and takes ~16 ms a step at batch 64 even with
    cache_implementation="static" (4,072 new tokens/s measured on an H200, after a 53 s compile);
  * its continuous batching (generate_batch) packs all sequences of a step into one row with paged attention: without
    flash-attn (which cannot be installed on the cluster) it attends through sdpa with a mask over every query/key
    pair of the step, which grows with the square of the batch.
Here the model's own forward runs unchanged (transformers' LlamaForCausalLM, or peft's wrapper of it); only the cache
it writes to (SlotCache), the mask it is given and the attention of a single query token (slot_attention) are ours.
On CUDA one decode step is recorded once as a CUDA graph and replayed (torch.cuda.CUDAGraph): the thousand-odd
kernel launches of a step cost one, and recording takes about as long as a few eager steps, not a compile.

Same answers: a slot holds a sequence exactly as it would sit alone (positions 0..n-1, no padding), so greedy
decoding gives the tokens of generate() on left-padded batches up to floating-point summation order (tests compare
token for token). Sampling draws with a torch.Generator seeded by --seed, one draw per slot per step, so the same
inputs, batch size and seed give the same samples.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .errors import UserError
from .generation import BATCH_TOKENS, STOP_IDS, PromptRecord, Sample, SamplingConfig, encode_prompts
from .memory import ALLOCATOR_SLACK_BYTES, CUDA_CONTEXT_BYTES, DEFAULT_BUDGET_FRACTION, GiB

REFILL_FRACTION = 8  # refill once 1/8 of the slots are free: one prefill forward for several prompts, slots ~94% busy
GRAPH_MIN_STEPS = 16  # recording a step costs a few eager steps; below this many steps eager decoding is as fast
MIN_BF16_SLOTS = 16  # dequantised bf16 weights are used only if they leave room for this many sequences (or all)
CPU_BATCH_SIZE = 8  # prompts at once on CPU, where a step's cost grows with the batch and no memory plan is needed
SLOT_ATTENTION = "sdpa_slots"


# ------------------------------------------------------------------------------------------------ attention
def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa attention, except for one query token a row with grouped K/V heads: the query heads that
    share a K/V head become that head's queries, so K/V are read once instead of being copied once per query head
    (transformers 5.17 copies them whenever a mask is given: 4x the KV cache traffic on Llama-3-8B)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    out = F.scaled_dot_product_attention(query.reshape(batch, heads // groups, groups, dim), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, dim), None  # [batch, q_len, heads, dim], as sdpa_attention_forward returns


def _register_slot_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SLOT_ATTENTION, slot_attention)
    AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)  # 2-D masks (prefill, generate()) as for sdpa


_register_slot_attention()


# ------------------------------------------------------------------------------------------------ KV cache
class SlotCache:
    """Keys and values of every layer as [slots, kv_heads, max_len, head_dim] tensors; slot s holds its sequence's
    tokens at positions 0..lengths[s]-1.

    Passed to the model as past_key_values: Llama's attention only calls update(). transformers' StaticCache writes
    all rows at one shared position, which cannot hold sequences that started at different steps.
    """

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, config.num_key_value_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.rows = torch.arange(slots, device=device)
        self.key_positions = torch.arange(max_len, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # = the position of each slot's next token
        self.prefill_into: tuple[torch.Tensor, torch.Tensor] | None = None  # (prefill row, slot) pairs, during prefill

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_into is not None:
            # right-padded prompts entering their slots at position 0; the prefill attends to its own keys only
            rows, slots = self.prefill_into
            n = key_states.shape[2]
            keys[slots, :, :n] = key_states[rows]
            values[slots, :, :n] = value_states[rows]
            return key_states, value_states
        keys[self.rows, :, self.lengths] = key_states[:, :, 0]
        values[self.rows, :, self.lengths] = value_states[:, :, 0]
        return keys, values

    def decode_mask(self) -> torch.Tensor:
        """[slots, 1, 1, max_len]: each slot sees its own tokens and the one being added."""
        return (self.key_positions <= self.lengths[:, None])[:, None, None, :]


# ------------------------------------------------------------------------------------------------ memory plan
def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * dtype_bytes


def bytes_per_slot(config, max_len: int, dtype_bytes: int) -> int:
    """KV cache of one sequence, its logits (the model's, and when sampling fp32 scores and probabilities and top-p's
    sorted copy with int64 indices: 32 bytes a vocabulary entry) and its activations in a decode step."""
    logits = config.vocab_size * (dtype_bytes + 32)
    activations = (10 * config.hidden_size + 3 * config.intermediate_size) * dtype_bytes
    return kv_bytes_per_token(config, dtype_bytes) * max_len + logits + activations


def prefill_bytes(config, max_len: int, dtype_bytes: int) -> int:
    """Transient of one prefill forward of BATCH_TOKENS padded tokens: MLP and attention activations, and the
    [rows, 1, T, T] mask (bool, and the float bias sdpa makes of it)."""
    activations = BATCH_TOKENS * (3 * config.intermediate_size + 10 * config.hidden_size) * dtype_bytes
    return activations + BATCH_TOKENS * max_len * 5


def memory_budget(gpu_bytes: float, free_bytes: float, held_bytes: float) -> float:
    """Bytes this process may hold in PyTorch's allocator: 90% of the card (36 GiB of a 40 GB A100) less the CUDA
    context and the allocator's slack, and no more than is free now plus what it already holds (the GPU may be
    shared)."""
    card = DEFAULT_BUDGET_FRACTION * gpu_bytes - CUDA_CONTEXT_BYTES - ALLOCATOR_SLACK_BYTES
    return min(card, free_bytes + held_bytes - ALLOCATOR_SLACK_BYTES)


def plan_slots(budget_bytes: float, weights_bytes: float, transient_bytes: float, per_slot_bytes: float,
               sequences: int) -> int:
    """The most sequences decoded at once with weights + transient + slots x per_slot within the budget, at most
    `sequences` (0 when not even one fits)."""
    room = budget_bytes - weights_bytes - transient_bytes
    return int(max(0, min(sequences, room // per_slot_bytes)))


@dataclass
class DecodePlan:
    dequantize: bool  # turn 4-bit weights into the compute dtype (the embedding's) before decoding
    slots: int | None  # sequences decoded at once; None: plan them once the model is final (plan_slots_now)
    budget_bytes: float | None = None  # CUDA only


def dequantized_extra_bytes(model, dtype_bytes: int) -> int:
    """Bytes the model grows by when its 4-bit weights become `dtype_bytes` floats."""
    extra = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            extra += math.prod(qs.shape) * dtype_bytes - p.numel() * p.element_size()
    return extra


def is_four_bit(model) -> bool:
    return any(getattr(p, "quant_state", None) is not None for p in model.parameters())


def plan_decoding(model, *, device: torch.device, sequences: int, max_len: int, num_samples: int,
                  batch_size: int | None, gpu_memory_gib: float | None) -> DecodePlan:
    """Whether to dequantise a 4-bit model, and (explicit --batch-size, CPU) the number of slots.

    On CUDA a 4-bit model is dequantised when the bf16 weights leave room for MIN_BF16_SLOTS sequences (or all of
    them), or for --batch-size prompts when given; otherwise it decodes in 4-bit (slower per step, ~3x less memory).
    """
    explicit = batch_size * num_samples if batch_size is not None else None
    four_bit = is_four_bit(model)
    if device.type != "cuda":
        return DecodePlan(dequantize=four_bit, slots=explicit or CPU_BATCH_SIZE * num_samples)
    config, dtype_bytes = model.config, model.get_input_embeddings().weight.element_size()
    free, total = torch.cuda.mem_get_info(device)
    gpu_bytes = gpu_memory_gib * GiB if gpu_memory_gib is not None else total
    budget = memory_budget(gpu_bytes, free, torch.cuda.memory_reserved(device))
    held = torch.cuda.memory_allocated(device)
    need_slots = min(sequences, explicit or MIN_BF16_SLOTS)
    fixed = prefill_bytes(config, max_len, dtype_bytes)
    dequantize = four_bit and plan_slots(budget, held + dequantized_extra_bytes(model, dtype_bytes), fixed,
                                         bytes_per_slot(config, max_len, dtype_bytes), sequences) >= need_slots
    return DecodePlan(dequantize=dequantize, slots=explicit, budget_bytes=budget)


def plan_slots_now(model, plan: DecodePlan, *, device: torch.device, sequences: int, max_len: int) -> int:
    """Slots for the model as it will decode (dequantised, adapter merged): an explicit --batch-size, else the most
    that fit the memory budget. A UserError when not even one sequence fits."""
    if plan.slots is not None:
        return plan.slots
    config, dtype_bytes = model.config, model.get_input_embeddings().weight.element_size()
    held = torch.cuda.memory_allocated(device)
    per_slot = bytes_per_slot(config, max_len, dtype_bytes)
    fixed = prefill_bytes(config, max_len, dtype_bytes)
    slots = plan_slots(plan.budget_bytes, held, fixed, per_slot, sequences)
    if slots < 1:
        raise UserError(f"not even one sequence of {max_len} tokens fits in GPU memory: the model holds "
                        f"{held / GiB:.1f} GiB and one sequence needs {(fixed + per_slot) / GiB:.2f} GiB more of a "
                        f"{plan.budget_bytes / GiB:.1f} GiB budget; shorten --max-new-tokens or the prompts, or use "
                        f"a larger GPU (--gpu-memory-gib plans for another size)")
    return slots


# ------------------------------------------------------------------------------------------------ decoder
def slot_length(prompt_lengths, max_new_tokens: int) -> int:
    """Tokens a slot must hold: the longest prompt and its answer, rounded up to 64 (sdpa's fast kernels want the
    key length aligned)."""
    return -(-(max(prompt_lengths) + max_new_tokens) // 64) * 64


class SlotDecoder:
    """The model, a SlotCache of `slots` rows of `max_len` tokens, and a decode step (recorded as a CUDA graph when
    `use_graph`). Construct it before timing generation: allocation and recording are startup."""

    def __init__(self, model, *, slots: int, max_len: int, use_graph: bool, prompt_lengths: list[int] | None = None):
        # The base model (inside a PeftModel for an unmerged adapter) runs the forward: its LoRA layers are in place.
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base.set_attn_implementation(SLOT_ATTENTION)
        embed = self.base.get_input_embeddings().weight
        self.device, self.slots, self.max_len = embed.device, slots, max_len
        self.steps = 0  # decode steps run (prefills not counted)
        with torch.inference_mode():
            self.cache = SlotCache(self.base.config, slots, max_len, embed.dtype, embed.device)
            self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # each slot's newest token
            self.active = torch.zeros(slots, dtype=torch.long, device=self.device)  # 1 while a slot decodes
            self.graph = None
            if self.device.type == "cuda":
                self._warm_up(prompt_lengths)
            if use_graph:
                self._record()

    def _warm_up(self, prompt_lengths: list[int] | None = None) -> None:
        # The first use of a CUDA kernel loads its module (lazy loading) and cuBLAS sets up per shape: seconds on the
        # first prefills (measured on the 8B model's 128 prompts: 4.1 s instead of 1.1 s without a warm-up, 2.8 s
        # with one of another shape). Paid here, as startup, on the shapes of the first slots' prefills (as
        # generate_continuous chunks them) and a one-row one; the keys/values left in the slots are overwritten.
        first = sorted(prompt_lengths or [min(self.max_len, 128)] * self.slots, reverse=True)[:self.slots]
        shapes = {(1, first[-1])}
        while first:
            rows = max(1, min(len(first), BATCH_TOKENS // first[0]))
            shapes.add((rows, first[0]))
            first = first[rows:]
        for rows, width in sorted(shapes):
            self.prefill([[0] * width] * rows, list(range(rows)), list(range(rows)))
        self.cache.lengths.zero_()

    def _forward_step(self) -> torch.Tensor:
        cache = self.cache
        out = self.base(input_ids=self.tokens[:, None], position_ids=cache.lengths[:, None],
                        attention_mask=cache.decode_mask(), past_key_values=cache, use_cache=True)
        return out.logits[:, -1]

    def _record(self) -> None:
        # Warm-up runs on a side stream first, as torch.cuda.graph requires (lazy cuBLAS/attention setup must not
        # be recorded); they write garbage at position 0 of every slot, which a prefill overwrites before use.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self._forward_step()

    def step(self) -> torch.Tensor:
        """Logits [slots, vocab] of every slot's next token; the newest tokens enter the cache. Valid until the next
        step (a replayed graph reuses its output)."""
        if self.graph is not None:
            self.graph.replay()
            logits = self.graph_logits
        else:
            logits = self._forward_step()
        self.cache.lengths += self.active
        self.steps += 1
        return logits

    def prefill(self, prompts: list[list[int]], rows: list[int], slots: list[int]) -> torch.Tensor:
        """Run the prompts (right-padded) and put prompt rows[i]'s keys/values into slot slots[i] (a prompt may fill
        several slots: --num-samples). Returns the logits [len(slots), vocab] of each slot's first new token."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        pos = torch.arange(width, device=self.device)
        causal = (pos[None, :] <= pos[:, None])[None] & (pos < lengths[:, None])[:, None, :]  # [rows, query, key]
        rows_t = torch.tensor(rows, device=self.device)
        slots_t = torch.tensor(slots, device=self.device)
        self.cache.prefill_into = (rows_t, slots_t)
        try:
            hidden = self.base.model(input_ids=ids.to(self.device), position_ids=pos.expand(len(prompts), width),
                                     attention_mask=causal[:, None], past_key_values=self.cache,
                                     use_cache=True).last_hidden_state
        finally:
            self.cache.prefill_into = None
        self.cache.lengths[slots_t] = lengths[rows_t]
        return self.base.get_output_embeddings()(hidden[rows_t, lengths[rows_t] - 1])


def make_decoder(model, plan: DecodePlan, *, device: torch.device, sequences: int, max_len: int,
                 max_new_tokens: int, prompt_lengths: list[int] | None = None) -> SlotDecoder:
    """predict.py's decoder for the model as it will decode: slots from the plan (plan_slots_now), a CUDA graph on
    GPU unless the weights are 4-bit (bitsandbytes' 4-bit layers are not recorded) or too few steps would follow to
    pay for recording it."""
    slots = plan_slots_now(model, plan, device=device, sequences=sequences, max_len=max_len)
    steps = math.ceil(sequences / slots) * max_new_tokens
    use_graph = device.type == "cuda" and not is_four_bit(model) and steps >= GRAPH_MIN_STEPS
    slots = min(slots, sequences)
    try:
        return SlotDecoder(model, slots=slots, max_len=max_len, use_graph=use_graph, prompt_lengths=prompt_lengths)
    except torch.cuda.OutOfMemoryError:
        what = "--batch-size" if plan.slots is not None else "the batch planned from the free memory"
        raise UserError(f"{what}: {slots} sequences of {max_len} tokens do not fit in GPU memory; give a smaller "
                        f"--batch-size") from None


class TokenChooser:
    """Greedy argmax, or sampling as generate() does it (temperature, top-k, top-p warpers, then one multinomial
    draw per row) from a generator seeded once."""

    def __init__(self, cfg: SamplingConfig, device: torch.device):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.greedy = cfg.temperature == 0
        self.warpers = []
        if not self.greedy:
            if cfg.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=cfg.top_k))
            if cfg.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=cfg.top_p))
        self.generator = torch.Generator(device).manual_seed(cfg.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        scores = logits.float()
        for warp in self.warpers:
            scores = warp(None, scores)  # these warpers do not look at the previous tokens
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[:, 0]


@dataclass
class _Sequence:
    record: int
    sample: int
    tokens: list


def generate_continuous(decoder: SlotDecoder, tokenizer, records: list[PromptRecord], cfg: SamplingConfig,
                        progress: Callable[[int, int, int], None] | None = None) -> Iterator[Sample]:
    """Samples for every record (--num-samples each), yielded as they finish.

    Prompts enter longest first (similar lengths share a prefill forward). A finished sequence frees its slot; once
    1/REFILL_FRACTION of the slots are free (or nothing runs) the next prompts are prefilled into them.
    `progress(samples_done, new_tokens, budget_tokens)` is called for every step (a token and its budget for each
    running sequence) and every finished sample (the budget of max_new_tokens it did not use).
    """
    progress = progress or (lambda samples, tokens, budget: None)
    cfg.validate()
    encoded = encode_prompts(tokenizer, records)
    if slot_length([len(e) for e in encoded], cfg.max_new_tokens) > decoder.max_len:
        raise ValueError(f"the decoder holds {decoder.max_len} tokens a slot, too few for these prompts")
    order = sorted(range(len(records)), key=lambda i: -len(encoded[i]))
    waiting = deque((i, k) for i in order for k in range(cfg.num_samples))
    choose = TokenChooser(cfg, decoder.device)
    free = list(range(decoder.slots))
    running: dict[int, _Sequence] = {}
    refill_at = max(1, decoder.slots // REFILL_FRACTION)
    finished: list[Sample] = []

    def advance(slot: int, seq: _Sequence, token: int) -> None:
        """Add one token; a sequence that ends frees its slot and joins `finished`."""
        if token in STOP_IDS:
            reason = "stop"
        else:
            seq.tokens.append(token)
            if len(seq.tokens) < cfg.max_new_tokens:
                return
            reason = "length"
        del running[slot]
        free.append(slot)
        decoder.active[slot] = 0
        # clean_up_tokenization_spaces=False: "a ." must stay "a ." for the mapping back to hand tokens.
        text = tokenizer.decode(seq.tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        finished.append(Sample(records[seq.record], seq.sample, seq.tokens, text, reason))
        progress(1, 0, cfg.max_new_tokens - len(seq.tokens) - (reason == "stop"))

    def admit() -> None:
        """Prefill the next waiting sequences into the free slots, at most BATCH_TOKENS padded tokens a forward;
        the samples of one prompt share its prefill row."""
        take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        samples_of: dict[int, list[int]] = {}
        for rec, sample in take:
            samples_of.setdefault(rec, []).append(sample)
        prompts = list(samples_of)  # longest first, as `waiting` is
        while prompts:
            n = max(1, min(len(prompts), BATCH_TOKENS // len(encoded[prompts[0]])))
            chunk, prompts = prompts[:n], prompts[n:]
            entering = [(row, rec, sample) for row, rec in enumerate(chunk) for sample in samples_of[rec]]
            slots = [free.pop(0) for _ in entering]
            first = choose(decoder.prefill([encoded[rec] for rec in chunk], [row for row, _, _ in entering], slots))
            slots_t = torch.tensor(slots, device=decoder.device)
            decoder.tokens[slots_t] = first
            decoder.active[slots_t] = 1
            progress(0, len(slots), len(slots))
            for slot, (_, rec, sample), token in zip(slots, entering, first.tolist()):
                running[slot] = _Sequence(rec, sample, [])
                advance(slot, running[slot], token)

    while waiting or running:
        with torch.inference_mode():  # never yield inside it: the caller's code would run in inference mode
            if waiting and (len(free) >= min(refill_at, len(waiting)) or not running):
                admit()
            else:
                chosen = choose(decoder.step())
                tokens = chosen.tolist()
                progress(0, len(running), len(running))
                for slot in list(running):
                    advance(slot, running[slot], tokens[slot])
                decoder.tokens.copy_(chosen)
        yield from finished
        finished.clear()
