"""Base-model loading (4-bit NF4 or plain weights), LoRA placement and the one training forward (`forward_loss`).

Shared by finetune.py and predict.py. One compute dtype for the whole network, chosen per device
(`resolve_compute_dtype`): bf16 on CUDA, fp32 on the CPU. On the GPU we deliberately do NOT call
peft.prepare_model_for_kbit_training, which upcasts every norm (and with it the residual stream) to fp32 — measured
4.4x slower and 2x larger on the 8B model. Instead the base is frozen by hand, norms and embeddings stay in the
compute dtype, and gradients reach the LoRA weights through non-reentrant checkpointing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .errors import UserError
from .llama3 import IGNORE_INDEX, LORA_TARGETS
from .loss import linear_cross_entropy_sum, shift_labels

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flex_attention", "eager")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX-512 BF16 or AMX); elsewhere they are emulated."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_compute_dtype(flag: str, device, *, native_cpu_bf16: bool | None = None) -> torch.dtype:
    """The dtype every activation and matmul runs in: --compute-dtype auto|bf16|fp32 for this device.

    auto: bf16 on CUDA (the recipe: half the activation memory, tensor-core matmuls). fp32 on every CPU: without native
    bf16 (AVX2 only) a bf16 matmul is emulated and ~30x slower than fp32, and even with it the quick start's training
    step ran faster in fp32 than today's bf16 did (bench/RESULTS.md, "CPU compute dtype"); one dtype on every CPU also
    gives the same numbers on both kinds. native_cpu_bf16 (default: ask oneDNN) only decides whether forcing bf16 on
    a CPU earns a warning. fp32 on CUDA is refused: the GPU memory plan and fast kernels are built for bf16.
    """
    if flag not in ("auto", *COMPUTE_DTYPES):
        raise UserError(f"--compute-dtype {flag}: choose auto, bf16 or fp32")
    device = torch.device(device)
    if flag == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if flag == "fp32" and device.type == "cuda":
        raise UserError("--compute-dtype fp32 runs on the CPU only: on CUDA the memory plan and the fast kernels are "
                        "built for bf16 (use auto or bf16 there)")
    if flag == "bf16" and device.type == "cpu":
        native = cpu_has_native_bf16() if native_cpu_bf16 is None else native_cpu_bf16
        if not native:
            import warnings

            warnings.warn("--compute-dtype bf16 on a CPU without native bf16 (no AVX-512 BF16/AMX): bf16 matmuls "
                          "are emulated there, ~30x slower than fp32", stacklevel=2)
    return COMPUTE_DTYPES[flag]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in COMPUTE_DTYPES.items() if v == dtype)


# ----------------------------------------------------------------------------------------------- model directory
def validate_model_dir(model_dir: str | os.PathLike) -> dict:
    """Check a local model directory is complete; return its config.json as a dict.

    One UserError lists every missing file, so a half-finished download is fixed in one go.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"--model {d}: no such directory (download the base model first, see README)")
    missing = [name for name in ("config.json", "tokenizer.json") if not (d / name).is_file()]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise UserError(f"--model {d}: unreadable {index.name} ({e})") from e
        missing += [s for s in shards if not (d / s).is_file()]
    elif not any(d.glob("*.safetensors")):
        missing.append("*.safetensors (model weights)")
    if missing:
        raise UserError(f"--model {d}: incomplete model directory, missing: {', '.join(missing)}")
    return read_model_config(d)


def read_model_config(model_dir: str | os.PathLike) -> dict:
    """A model directory's config.json as a dict: all that --estimate-memory needs (no weights, no tokenizer)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"--model {model_dir}: no config.json there")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"--model {model_dir}: config.json is not valid JSON ({e})") from e


def check_vocab_size(model_dir: str | os.PathLike, model_config: dict, tokenizer) -> None:
    """The embedding needs a row for every id the tokenizer gives: with a smaller vocab_size the first high id would
    fail deep inside the forward (an index error, or a CUDA device-side assert)."""
    vocab_size, ids = model_config.get("vocab_size"), len(tokenizer)
    if not isinstance(vocab_size, int) or vocab_size < ids:
        raise UserError(f"--model {model_dir}: config.json has vocab_size {vocab_size}, but its tokenizer.json has "
                        f"{ids} ids: the weights are not of this tokenizer's model")


def resolve_attn_implementation(attn_implementation: str, device) -> str:
    """auto: sdpa on CPU; flex_attention on CUDA (keeps packed documents apart without materialising a mask)."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"--attn-implementation {attn_implementation}: choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation != "auto":
        return attn_implementation

    return "flex_attention" if torch.device(device).type == "cuda" else "sdpa"


def check_bitsandbytes(device) -> None:
    """Quantise and dequantise a tiny tensor on `device`: fails fast, in one line, when bnb has no working backend."""

    try:
        import bitsandbytes.functional as bnbf

        x = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
        q, state = bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
        y = bnbf.dequantize_4bit(q, state)
        if not torch.isfinite(y).all():
            raise RuntimeError("non-finite dequantised values")
    except Exception as e:  # any failure here means 4-bit loading would fail later, less clearly
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"bitsandbytes has no working backend on {device} ({type(e).__name__}: {msg}); "
                        f"reinstall bitsandbytes>=0.50 for this machine (bash install_prereqs) or use --quantize none") from e


def load_base_model(model_dir: str | os.PathLike, *, quantize: str = "nf4", attn_implementation: str = "auto",
                    device="cpu", compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype = torch.uint8):
    """Load a local Llama-3 model for training or generation, in one compute dtype throughout.

    quantize="nf4": QLoRA base — 4-bit NormalFloat weights with double quantisation (the quantisation constants are
    quantised too, ~0.4 bit/param saved), matmuls in the compute dtype; embeddings, norms and lm_head in it too.
    quantize="none": plain weights in the compute dtype (for merging or when bitsandbytes is unavailable).
    device: "cpu", "cuda", "cuda:N" or a torch.device; the whole model goes to that one device.
    compute_dtype: default `resolve_compute_dtype("auto", device)` (bf16 on CUDA, fp32 on the CPU).
    quant_storage: the dtype the packed 4-bit bytes are stored in; the bytes and every kernel are the same either way.
    Keep uint8 to shard with FSDP (qlora/fsdp.py says why).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    validate_model_dir(model_dir)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    attn = resolve_attn_implementation(attn_implementation, device)
    compute_dtype = compute_dtype or resolve_compute_dtype("auto", device)
    kwargs = dict(dtype=compute_dtype, attn_implementation=attn,
                  device_map={"": device} if device.type == "cuda" else "cpu")
    if quantize == "nf4":
        check_bitsandbytes(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)
    elif quantize != "none":
        raise UserError(f"--quantize {quantize}: choose nf4 or none")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    # One dtype everywhere, whatever the checkpoint was saved in (Params4bit hold packed bytes, whatever dtype stores
    # them): a stray fp32 weight on the GPU would silently run the network in fp32.
    for name, p in model.named_parameters():
        if p.is_floating_point() and getattr(p, "quant_state", None) is None and p.dtype != compute_dtype:
            raise AssertionError(f"{name} loaded in {p.dtype}, not {compute_dtype}")
    return model


# ----------------------------------------------------------------------------------------------- LoRA
def apply_lora(model, *, r: int = 64, alpha: float = 16.0, dropout: float = 0.0,
               target_modules=LORA_TARGETS, gradient_checkpointing: bool = True, seed: int = 0,
               checkpoint_layers: int = -1, kernels: str = "none"):
    """Freeze the base, optionally enable non-reentrant checkpointing, and add LoRA to `target_modules` of every block.

    LoRA weights are kept in fp32 (peft's default) as master weights so small late-schedule updates are not lost to
    bf16 rounding; with a bf16 base `forward_loss` runs under bf16 autocast, so their matmuls still run in bf16 and
    the 4-bit base matmuls see bf16 inputs. Norms and embeddings stay in the compute dtype and frozen.
    checkpoint_layers: with gradient_checkpointing, recompute only the first N blocks (-1: all; qlora/memory.py
    picks N). kernels="liger": the CUDA fast path of qlora/speed.py (same function, fewer passes over memory).
    """
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            # bitsandbytes (CPU) repacks 4-bit weights for its inference kernel the first time a Linear4bit runs in
            # eval mode without grad (our validation pass), and training then goes through that kernel, which has
            # no autograd support and rounds differently: keep training on one kernel.
            m.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA weights inside a checkpointed block even though the block's input
        # (the frozen embedding output) does not require grad.
        from .speed import checkpoint_layers as _checkpoint_layers  # both transformers 5.x API names

        _checkpoint_layers(model, checkpoint_layers)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    check_lora_placement(peft_model, target_modules)
    if kernels == "liger":
        from .speed import enable_fast_path

        enable_fast_path(peft_model)
    peft_model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing
    return peft_model


def check_lora_placement(peft_model, target_modules=LORA_TARGETS) -> None:
    """Every target projection of every decoder block has LoRA A/B, and nothing else is trainable."""
    base = peft_model.get_base_model()
    expected = set()
    for i, _ in enumerate(base.model.layers):
        for name, _module in base.model.layers[i].named_modules():
            if name.split(".")[-1] in target_modules:
                expected.add(f"layers.{i}.{name}")
    if len(expected) != len(base.model.layers) * len(target_modules):
        missing = len(base.model.layers) * len(target_modules) - len(expected)
        raise UserError(f"--lora-target-modules {','.join(target_modules)}: {missing} of them are not projections "
                        f"of this model's blocks")
    got = set()
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." not in name and ".lora_B." not in name:
            raise AssertionError(f"non-LoRA parameter is trainable: {name}")
        m = re.search(r"(layers\.\d+\..+?)\.lora_[AB]\.", name)
        if m:
            got.add(m.group(1))
    missing = sorted(expected - got)
    if missing:
        raise AssertionError(f"LoRA missing on {missing[:3]} (+{max(0, len(missing) - 3)} more)")


def count_parameters(peft_model) -> tuple[int, int]:
    """(trainable, base) parameter counts; 4-bit weights counted by their unpacked shape, not their byte storage."""
    import math

    trainable = base = 0
    for p in peft_model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            qs = getattr(p, "quant_state", None)
            base += math.prod(qs.shape) if qs is not None else p.numel()
    return trainable, base


# ----------------------------------------------------------------------------------------------- training forward
def forward_loss(model, batch: dict, *, loss_chunk_size: int = 1024):
    """The one training/eval forward: (summed next-token CE as fp32 scalar, number of label tokens as a tensor).

    batch: input_ids, labels (unshifted, -100 = no loss), position_ids (restarting at 0 per document) on the
    model's device. attention_mask=None + restarting position_ids makes transformers build a per-document causal
    mask (masking_utils.find_packed_sequence_indices), so packed documents never attend to each other.
    Speed work (fused kernels, other attention) changes this function only.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device_type = batch["input_ids"].device.type
    # The base's dtype is the compute dtype (load_base_model); under bf16, autocast runs the fp32 LoRA weights in bf16.
    bf16 = base.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        hidden = base.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                            use_cache=False).last_hidden_state
        targets = shift_labels(batch["labels"], batch["position_ids"])
        if getattr(model, "_qlora_fused_loss", False):  # kernels=liger: Liger's fused linear-CE (CUDA)
            from .speed import fused_linear_ce_sum

            loss_sum = fused_linear_ce_sum(hidden, base.lm_head.weight, targets)
        else:
            loss_sum = linear_cross_entropy_sum(hidden, base.lm_head.weight, targets, chunk_size=loss_chunk_size)
    return loss_sum, (targets != IGNORE_INDEX).sum()


class TrainStep(torch.nn.Module):
    """forward_loss as a module, so DDP can wrap it (DDP's gradient hooks need the forward to go through it)."""

    def __init__(self, peft_model, loss_chunk_size: int = 1024):
        super().__init__()
        self.model = peft_model
        self.loss_chunk_size = loss_chunk_size
        # Frozen base weights are identical on every rank: DDP need not broadcast gigabytes of them at start.
        self._ddp_params_and_buffers_to_ignore = [n for n, p in self.named_parameters() if not p.requires_grad]

    def forward(self, input_ids, labels, position_ids):
        return forward_loss(self.model, {"input_ids": input_ids, "labels": labels, "position_ids": position_ids},
                            loss_chunk_size=self.loss_chunk_size)
