"""Peak GPU memory of one QLoRA training process, from the model config alone (no GPU, no weights).

Only the estimate lives here; qlora/plan.py turns finetune.py's settings into estimate_memory's arguments, picks the
fewest recomputed blocks that fit (`choose_checkpoint_layers`) and DDP or FSDP, and refuses what does not fit.

What is counted (bytes; H hidden, I intermediate, KV = kv_heads x head_dim, V vocab, T = micro-batch x seq tokens):
  * 4-bit base: 0.5 B/param for the seven projections of every block, plus NF4 quantisation constants (one uint8
    absmax per 64 weights with double quantisation, one fp32 per 256 of those; 4 B per 64 without).
  * Unquantised: embeddings and lm_head in bf16 (V x H each; fp32 if upcast), norms.
  * LoRA: r x (in + out) per targeted projection per block; fp32 master weights (peft's default) and fp32 grads.
  * Optimizer: 8-bit AdamW 2 B/param (+ fp32 absmax per 2048); 32-bit 8 B/param. Paged optimizers keep their state
    in CUDA unified memory, outside PyTorch's allocator: counted in the total, not in "peak reserved".
  * Activations saved for backward, per token and block (the sum of what each op saves, checked against the
    device, bench/RESULTS.md):
      fast path (Liger RMSNorm/RoPE/SwiGLU-fused MLP, bf16 LoRA, flex attention):
        2H norm-1 input + 2H normed + 2H q + 4KV k,v + 2H attention out + 4*heads logsumexp + 2H norm-2 input
        + 2H normed + 4I gate,up + 7 x 2r LoRA-A outputs                              (111.6 KB on Llama-3-8B)
      without the fused MLP: + 2I for SiLU(gate)*up
      plain (transformers RMSNorm in fp32, SiLU then mul, peft): 4H per norm input (fp32), SiLU saves gate, the mul
        saves SiLU(gate) and up, down_proj's LoRA saves the product: 16H + 4KV + 8I + ...    (~185 KB)
    A checkpointed block saves only its input (2H); during the backward one block is recomputed at a time. The
    checkpointed blocks are the first N, so they are recomputed after the kept blocks' activations are freed.
  * Loss: fused linear-CE keeps no logits; the chunked fallback keeps one chunk of fp32 logits and their gradient.
  * Transient in the backward (gradient of the MLP activation and the residual stream; one recomputed block), which
    comes after the loss's transient, so the peak takes the larger of the two; the allocator's slack (expandable
    segments: ~0.4 GiB measured) on top; CUDA context (~0.5 GiB) outside the allocator.
  * FSDP over N processes (parallelism="fsdp", qlora/fsdp.py): the 4-bit blocks, input embeddings, norms, LoRA
    masters, their gradients and the optimizer state are 1/N each; the NF4 quantisation constants are not
    (bitsandbytes keeps them on every Linear4bit, outside FSDP), nor is the lm_head (whole on every process:
    sharded, gathering it at the peak would cost more, qlora/fsdp.py; tied embeddings likewise). Gathered for a
    while: up to three blocks (the one computing, the next one prefetched, and that one's all-gather buffer until it
    is copied out; their LoRA in fp32, the dtype they are kept in) plus one block's unsharded fp32 LoRA gradients and
    their copy for the reduce-scatter. No DDP buckets. Reserved beyond the allocated peak: twice the embeddings, as
    measured (see estimate_memory). Loading: qlora/fsdp.py loads the whole 4-bit model on each GPU before sharding
    it, so the larger of "4-bit model + embeddings" and "4-bit model + whole fp32 LoRA masters" (the embeddings wait
    on the CPU meanwhile) must fit too (`load_bytes`).
  * Not counted: NCCL's own buffers (outside PyTorch's allocator, not measured here; the 90% budget leaves room).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .llama3 import LLAMA3_8B_CONFIG, LORA_TARGETS

GiB = 2**30
CUDA_CONTEXT_BYTES = int(0.5 * GiB)        # CUDA context + cuBLAS/Triton workspaces, outside the allocator
ALLOCATOR_SLACK_BYTES = int(0.4 * GiB)     # reserved - allocated at the peak with expandable segments (measured)
DEFAULT_BUDGET_FRACTION = 0.9              # use at most 90% of the card (36 GiB of a 40 GB A100)


def projection_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear projection in one decoder block."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    q = cfg["num_attention_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def lora_trainable_params(cfg: dict, r: int = 64, targets=LORA_TARGETS) -> int:
    shapes = projection_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target modules {unknown}")
    return cfg["num_hidden_layers"] * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


@dataclass
class MemoryEstimate:
    rows: list = field(default_factory=list)   # (component, bytes, inside_allocator: bool, note)
    trainable_params: int = 0
    base_params: int = 0
    peak_allocated_bytes: int = 0              # what torch.cuda.max_memory_allocated should report
    peak_reserved_bytes: int = 0               # what torch.cuda.max_memory_reserved should report
    outside_allocator_bytes: int = 0           # paged optimizer state + CUDA context
    load_bytes: int = 0                        # FSDP: on the GPU while loading, before sharding (incl. context)
    settings: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.peak_reserved_bytes + self.outside_allocator_bytes

    def fits(self, gpu_bytes: float) -> bool:
        return max(self.total_bytes, self.load_bytes) <= gpu_bytes

    def table(self, gpu_gib: float = 40.0) -> str:
        s = self.settings
        sharding = (f", FSDP over {s['world_size']} processes (each holds 1/{s['world_size']})"
                    if s.get("parallelism") == "fsdp" else "")
        lines = [f"Estimated peak GPU memory per process{sharding}: {s.get('model', 'model')}, seq {s['seq_len']} x micro-batch "
                 f"{s['micro_batch_size']}, LoRA r={s['lora_r']} on {len(s['lora_targets'])} projections, "
                 f"{s['checkpoint_layers']}/{s['layers']} blocks checkpointed, kernels {s['kernels']}, "
                 f"loss {'fused' if s['fused_loss'] else 'chunked'}, optimizer {s['optimizer']}",
                 f"  trainable parameters: {self.trainable_params:,} "
                 f"({100 * self.trainable_params / max(1, self.base_params):.2f}% of the "
                 f"{self.base_params / 1e9:.2f}B base parameters)",
                 f"  {'component':44s} {'GiB':>8s}  note"]
        for name, b, inside, note in self.rows:
            lines.append(f"  {name:44s} {b / GiB:8.2f}  {note}{'' if inside else ' [outside the PyTorch allocator]'}")
        lines.append(f"  {'peak allocated (torch max_memory_allocated)':44s} {self.peak_allocated_bytes / GiB:8.2f}")
        lines.append(f"  {'peak reserved (torch max_memory_reserved)':44s} {self.peak_reserved_bytes / GiB:8.2f}")
        lines.append(f"  {'total on the GPU':44s} {self.total_bytes / GiB:8.2f}")
        if self.load_bytes:
            lines.append(f"  {'while loading, before sharding':44s} {self.load_bytes / GiB:8.2f}  the whole 4-bit "
                         f"model on each GPU")
        verdict = "fits" if self.fits(gpu_gib * GiB) else "DOES NOT FIT"
        most = max(self.total_bytes, self.load_bytes)
        lines.append(f"  => {verdict} a {gpu_gib:g} GiB GPU ({100 * most / (gpu_gib * GiB):.0f}% of it"
                     f"{', while loading' if self.load_bytes > self.total_bytes else ''})")
        return "\n".join(lines)

    def summary(self, gpu_gib: float = 40.0) -> str:
        return (f"{self.peak_reserved_bytes / GiB:.1f} GiB reserved + {self.outside_allocator_bytes / GiB:.1f} GiB "
                f"outside = {self.total_bytes / GiB:.1f} GiB ({'fits' if self.fits(gpu_gib * GiB) else 'does NOT fit'} "
                f"{gpu_gib:g} GiB)")


def activation_bytes_per_token(cfg: dict, *, kernels: str, fused_mlp: bool, lora_r: int, n_targets: int) -> int:
    """Bytes saved for backward per token by one non-checkpointed decoder block (see module doc)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim", h // heads)
    q, kv = heads * hd, cfg["num_key_value_heads"] * hd
    attention = 2 * q + 4 * kv + 2 * q + 4 * heads            # q, k, v, output, logsumexp (flex / flash)
    lora = n_targets * 2 * lora_r                              # bf16 LoRA-A outputs
    if kernels == "liger":
        norms = 2 * (2 * h) + 2 * 8                              # bf16 inputs + fp32 rstd
        normed = 2 * (2 * h)                                     # inputs of q/k/v and gate/up (LoRA-A saves them)
        mlp = 4 * inter + (0 if fused_mlp else 2 * inter)
        return norms + normed + attention + mlp + lora
    norms = 2 * (4 * h + 4)                                      # fp32 copy of the input (pow/mul save it)
    normed = 2 * (2 * h)
    mlp = 8 * inter                                              # gate, SiLU(gate), up, SiLU(gate)*up
    return norms + normed + attention + 2 * q + mlp + lora       # + o_proj's contiguous input copy


def estimate_memory(model_config: dict | None = None, *, seq_len: int = 8192, micro_batch_size: int = 1,
                    lora_r: int = 64, lora_targets=LORA_TARGETS, checkpoint_layers: int = -1,
                    fused_loss: bool = True, kernels: str = "liger", fused_mlp: bool = True,
                    optimizer: str = "paged_adamw_8bit", quantize: str = "nf4", double_quant: bool = True,
                    loss_chunk_size: int = 1024, world_size: int = 1, ddp_bucket_view: bool = False,
                    upcast: bool = False, parallelism: str = "ddp") -> MemoryEstimate:
    """Peak memory of one training process. checkpoint_layers: blocks recomputed in the backward (-1: all).

    parallelism: "ddp" (every process holds the whole model) or "fsdp" (qlora/fsdp.py: 1/world_size of it).
    """
    cfg = dict(LLAMA3_8B_CONFIG if model_config is None else model_config)
    layers, h, v = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    n_ckpt = layers if checkpoint_layers < 0 else min(checkpoint_layers, layers)
    shapes = projection_shapes(cfg)
    base_linear = layers * sum(i * o for i, o in shapes.values())
    base_bytes = base_linear // 2 if quantize == "nf4" else base_linear * 2
    tokens = seq_len * micro_batch_size
    est = MemoryEstimate()
    est.settings = dict(model=cfg.get("_name", "Llama-3-8B shape" if model_config is None else "model"),
                        seq_len=seq_len, micro_batch_size=micro_batch_size, lora_r=lora_r,
                        lora_targets=list(lora_targets), checkpoint_layers=n_ckpt, layers=layers, kernels=kernels,
                        fused_loss=fused_loss, optimizer=optimizer, world_size=world_size, parallelism=parallelism)
    fsdp = parallelism == "fsdp"
    shards = world_size if fsdp else 1   # each sharded quantity is divided by this
    of = f", 1/{shards} shard" if shards > 1 else ""
    rows = est.rows
    if quantize == "nf4":
        consts = base_linear // 64 * (1 if double_quant else 4) + (base_linear // 64 // 256 * 4 if double_quant else 0)
        rows.append(("4-bit NF4 base (7 projections x blocks)", base_bytes // shards, True, f"{base_linear / 1e9:.2f}B params x 0.5 B{of}"))
        rows.append(("  quantisation constants", consts, True, "absmax per 64 weights" + (" (double-quantised)" if double_quant else "")
                     + (", on every process" if shards > 1 else "")))
    else:
        consts = 0
        rows.append(("bf16 base (7 projections x blocks)", base_bytes // shards, True, f"{base_linear / 1e9:.2f}B params x 2 B{of}"))
    unq_dtype = 4 if upcast else 2
    n_emb = v * h * (1 if cfg.get("tie_word_embeddings") else 2)
    n_norm = (2 * layers + 1) * h
    emb_note = f"{'fp32' if upcast else 'bf16'}, {v * h / 1e9:.2f}B params"
    sharded_embeddings = shards > 1 and not cfg.get("tie_word_embeddings")
    if sharded_embeddings:  # qlora/fsdp.py: the input embeddings sharded, the lm_head whole
        rows.append(("input embeddings (unquantised)", v * h * unq_dtype // shards, True, emb_note + of))
        rows.append(("lm_head (unquantised)", v * h * unq_dtype, True, emb_note + ", whole on every process"))
    else:  # one process per model, or tied (one weight at both ends, whole on every process)
        rows.append(("embeddings + lm_head (unquantised)", n_emb * unq_dtype, True,
                     f"{'fp32' if upcast else 'bf16'}, {n_emb / 1e9:.2f}B params"
                     + (", whole on every process" if shards > 1 else "")))
    rows.append(("norms", n_norm * unq_dtype // shards, True, ""))
    trainable = lora_trainable_params(cfg, lora_r, lora_targets)
    est.trainable_params, est.base_params = trainable, base_linear + n_emb + n_norm
    rows.append(("LoRA weights (fp32 masters)", trainable * 4 // shards, True, f"{trainable:,} params{of}"))
    rows.append(("LoRA gradients (fp32)", trainable * 4 // shards, True, ""))
    if world_size > 1 and not ddp_bucket_view and not fsdp:
        rows.append(("DDP gradient buckets", trainable * 4, True, "a second fp32 copy of the LoRA gradients"))
    paged = optimizer.startswith("paged")
    state = (trainable * (2 + 8 / 2048) if "8bit" in optimizer else trainable * 8) / shards
    rows.append((f"optimizer state ({optimizer})", int(state), not paged, ("2 x uint8 per param" if "8bit" in optimizer else "2 x fp32 per param") + of))
    # FSDP: what is gathered whole for a while (see the module doc)
    blocks_gathered = lora_grad_buffers = 0
    if fsdp and shards > 1:
        block_weights = base_bytes // layers + 2 * h * unq_dtype
        block_lora = trainable // layers
        blocks_gathered = 3 * (block_weights + 4 * block_lora)
        lora_grad_buffers = block_lora * (4 + 4)
    static = sum(b for _, b, inside, _ in rows if inside)

    per_tok = activation_bytes_per_token(cfg, kernels=kernels, fused_mlp=fused_mlp, lora_r=lora_r,
                                         n_targets=len(lora_targets))
    block_full = per_tok * tokens
    block_ckpt = 2 * h * tokens * (2 if upcast else 1)
    saved = (layers - n_ckpt) * block_full + n_ckpt * block_ckpt
    rows.append((f"activations: {layers - n_ckpt} blocks kept", (layers - n_ckpt) * block_full, True,
                 f"{per_tok / 1024:.1f} KiB/token/block x {tokens} tokens"))
    rows.append((f"activations: {n_ckpt} checkpointed blocks", n_ckpt * block_ckpt, True, "block input only"))
    if n_ckpt:
        rows.append(("  one block recomputed in the backward", block_full, True, ""))
    if blocks_gathered:
        rows.append(("FSDP: 3 blocks gathered", blocks_gathered, True,
                     "computing, prefetched, all-gather buffer: 4-bit weights + fp32 LoRA"))
        rows.append(("FSDP: LoRA grads of one block", lora_grad_buffers, True, "fp32 + its copy for the reduce-scatter"))
    # transient at the start of the backward: gradient of the residual stream and of the MLP activation
    transient = tokens * (2 * h + 2 * cfg["intermediate_size"]) if n_ckpt < layers else 0
    if transient:
        rows.append(("backward transient (activation gradients)", transient, True, ""))
    if fused_loss:
        loss_b = tokens * 2 * h
        rows.append(("loss: fused linear-CE (no logits)", loss_b, True, "gradient of the last hidden state"))
    else:
        chunk = min(loss_chunk_size, tokens)
        loss_b = tokens * 2 * h + chunk * v * (2 + 4 + 4 + 2)
        rows.append((f"loss: chunked CE, {chunk}-token logits", loss_b, True, "bf16 + fp32 logits and their gradient"))
    # Three moments, the peak is the highest: the loss (everything saved, plus the loss's transient); the backward of
    # the last kept block (everything saved, plus the activation gradients and FSDP's gathered blocks); the recompute
    # of a checkpointed block. The recomputed blocks are the first ones (qlora.speed.checkpoint_layers), so by the time
    # the backward reaches them the kept blocks' activations are gone: only the checkpointed inputs are left.
    grads_phase = transient + (loss_b if fused_loss else tokens * 2 * h) + blocks_gathered + lora_grad_buffers
    moments = [saved + loss_b]
    if n_ckpt < layers:
        moments.append(saved + grads_phase)
    if n_ckpt:
        moments.append(n_ckpt * block_ckpt + block_full + grads_phase)
    peak = static + max(moments)
    est.peak_allocated_bytes = int(peak)
    # Measured under FSDP (one H200, 2 processes, 70B width): 4.3 and 4.6 GiB reserved beyond the allocated peak,
    # against 0.4 without FSDP. Twice the embeddings (their all-gather buffer and gathered copy, freed at the start of
    # the forward, kept reserved for FSDP's streams) fits both; with the embeddings whole (H100) the excess fell from
    # 4.3 to 1.2 GiB, which points at their gather. The term is the measurement's (bench/RESULTS.md, "FSDP2 on one
    # GPU").
    fsdp_reserve = 2 * v * h * unq_dtype if sharded_embeddings else 0
    est.peak_reserved_bytes = int(peak + ALLOCATOR_SLACK_BYTES + fsdp_reserve)
    rows.append(("allocator slack (reserved - allocated)", ALLOCATOR_SLACK_BYTES, True, "expandable segments"))
    if fsdp_reserve:
        rows.append(("FSDP: reserved, not allocated", fsdp_reserve, True, "2 x embeddings: measured, bench/RESULTS.md"))
    outside = CUDA_CONTEXT_BYTES + (int(state) if paged else 0)
    rows.append(("CUDA context", CUDA_CONTEXT_BYTES, False, ""))
    est.outside_allocator_bytes = outside
    if fsdp and shards > 1:
        # the whole 4-bit model on the GPU, then (embeddings moved to the CPU) the whole fp32 LoRA masters
        largest_bf16 = 2 * max(i * o for i, o in shapes.values())  # one projection before bitsandbytes quantises it
        whole = base_bytes + consts + n_norm * unq_dtype
        est.load_bytes = int(max(whole + n_emb * unq_dtype + largest_bf16, whole + trainable * 4)
                             + ALLOCATOR_SLACK_BYTES + CUDA_CONTEXT_BYTES)
    return est


def choose_checkpoint_layers(model_config: dict | None, budget_bytes: float, **kw) -> int | None:
    """Fewest checkpointed blocks whose estimate fits budget_bytes (total on the GPU); None if even all do not."""
    layers = (model_config or LLAMA3_8B_CONFIG)["num_hidden_layers"]
    for n in range(layers + 1):
        if estimate_memory(model_config, checkpoint_layers=n, **kw).total_bytes <= budget_bytes:
            return n
    return None
