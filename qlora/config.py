"""finetune.py's configuration: every default visible in one dataclass, overridable by a YAML file and the command line.

Precedence: dataclass defaults < `--config file.yaml` < command-line flags. The resolved config is printed at start
and written to RUN/config.json. YAML keys are the flag names with '-' or '_' (`micro_batch_size: 2`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .llama3 import LORA_TARGETS


def _opt(default, help: str, **argparse_kwargs):
    meta = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- inputs and outputs
    model: str | None = _opt(None, "local base model directory (config.json, tokenizer.json, *.safetensors), "
                                   "e.g. Meta-Llama-3-8B")
    data: str | None = _opt(None, "output directory of pretokenize.py (metadata.json, train/ and validation/ shards)")
    output_dir: str | None = _opt(None, "run directory: config.json, metrics.jsonl, tensorboard/, checkpoints/, "
                                        "adapter/, status.json")
    # --- length of training
    max_steps: int | None = _opt(None, "optimizer steps to train in total (a larger value continues a finished run); "
                                       "exclusive with --epochs")
    epochs: float | None = _opt(None, "passes over the training rows (default 1 when --max-steps is not given); "
                                      "converted to optimizer steps, rounded up")
    # --- batch
    micro_batch_size: int = _opt(1, "packed rows per forward/backward on each process; activation memory grows "
                                    "linearly with it")
    grad_accum: int = _opt(4, "micro-batches accumulated per optimizer step; tokens per step = micro-batch x "
                              "grad-accum x processes x max_len (default 4: 131k tokens a step on one 4-GPU node "
                              "at 8192)")
    # --- optimisation
    lr: float = _opt(2e-4, "peak learning rate (2e-4: the QLoRA paper's value for 7B-13B models at r=64)")
    min_lr_ratio: float = _opt(0.1, "cosine decays to lr x this at the last step (0.1 keeps late steps useful)")
    warmup_steps: int | None = _opt(None, "linear warm-up steps (default: --warmup-ratio of the total steps)")
    warmup_ratio: float = _opt(0.03, "warm-up as a fraction of the total steps when --warmup-steps is not given")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the LoRA weights (0: LoRA is already a strong "
                                    "regulariser)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    max_grad_norm: float = _opt(0.3, "clip the global gradient norm to this (0.3: QLoRA paper; 0 disables)")
    optimizer: str = _opt("paged_adamw_8bit", "paged_adamw_8bit (default: 8-bit states, paged to CPU under memory "
                                              "pressure), adamw_8bit, paged_adamw (32-bit states), adamw_torch "
                                              "(plain torch, for debugging)",
                          choices=["paged_adamw_8bit", "adamw_8bit", "paged_adamw", "adamw_torch"])
    # --- model and LoRA
    quantize: str = _opt("nf4", "base weights: nf4 (QLoRA: 4-bit NormalFloat, double quantization, bf16 compute) or "
                                "none (bf16 base, ~3.5x the weight memory; for debugging)", choices=["nf4", "none"])
    lora_r: int = _opt(64, "LoRA rank (64: QLoRA paper; 167,772,160 trainable params = 2.09%% on Llama-3-8B)")
    lora_alpha: float = _opt(16.0, "LoRA scaling numerator: the update is scaled by alpha/r (16 with r=64 = 0.25, "
                                   "the QLoRA paper's setting; raise it with --lr unchanged for larger updates)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input (default 0: dropout copies every projection input, "
                                    "costing memory and time, and QLoRA on large data gains little from it)")
    lora_target_modules: list = _opt(
        list(LORA_TARGETS),
        "comma-separated projection names that get LoRA in every block (default all seven linear layers: the QLoRA "
        "paper found all-layer LoRA needed to match full fine-tuning)")
    gradient_checkpointing: bool = _opt(True, "recompute blocks' activations in the backward pass "
                                              "(non-reentrant; how many: --checkpoint-layers): ~1/3 more of a "
                                              "recomputed block's compute for ~0.8 GiB less at seq 8192; off: no "
                                              "block is recomputed",
                                        action=argparse.BooleanOptionalAction)
    compute_dtype: str = _opt("auto", "dtype of every activation and matmul: auto (bf16 on CUDA; fp32 on every CPU: bf16 "
                                      "is emulated and ~30x slower without AVX-512 BF16, and the quick start trained "
                                      "faster in fp32 even with it), bf16, or fp32 (CPU only: the GPU memory plan and "
                                      "kernels are built for bf16)",
                              choices=["auto", "bf16", "fp32"])
    attn_implementation: str = _opt("auto", "attention kernel: auto (sdpa on CPU, flex_attention on CUDA), sdpa, "
                                            "flex_attention, eager; all keep packed documents apart",
                                    choices=["auto", "sdpa", "flex_attention", "eager"])
    # --- speed and memory (qlora/speed.py, qlora/memory.py; measured in bench/RESULTS.md)
    kernels: str = _opt("auto", "fast path: auto (on CUDA with liger-kernel installed: Liger's Triton RMSNorm/RoPE/"
                                "SwiGLU, SwiGLU+down_proj fused without saving their product, bf16 LoRA in one GEMM, "
                                "Liger fused linear-cross-entropy; plain PyTorch otherwise), liger (require it), none "
                                "(plain PyTorch: the reference path)", choices=["auto", "liger", "none"])
    checkpoint_layers: str = _opt("auto", "blocks recomputed in the backward: auto (the fewest whose estimated peak "
                                          "fits 90%% of --gpu-memory-gib, qlora/memory.py; all on CPU), all, or a "
                                          "number; each block not recomputed saves a third of its matmuls and costs "
                                          "~0.85 GiB at seq 8192 on Llama-3-8B (--no-gradient-checkpointing = 0)")
    low_memory: bool = _opt(False, "small-GPU preset: recompute every block, with the fast kernels (~10 GiB peak at "
                                   "seq 8192 on Llama-3-8B, about 25%% slower than the default)", action="store_true")
    gpu_memory_gib: float | None = _opt(None, "GPU memory to plan for (default: this GPU's size; 40 = A100-40GB "
                                              "for --estimate-memory without a GPU); refused before loading if the "
                                              "estimate does not fit")
    parallelism: str = _opt("auto", "how the processes share the model: auto (DDP when one process per GPU fits with "
                                    "every block recomputed, by qlora/memory.py's estimate; FSDP when it does not; DDP "
                                    "on the CPU), ddp (a whole model per process: no weight traffic, faster), fsdp "
                                    "(torch FSDP2: each process holds 1/N of the 4-bit weights, input embeddings, "
                                    "LoRA, gradients and optimizer state, the lm_head whole, and gathers one block at "
                                    "a time; qlora/fsdp.py)",
                            choices=["auto", "ddp", "fsdp"])
    loss_chunk_size: int = _opt(1024, "tokens per lm_head + cross-entropy chunk (the [tokens x 128256] logits are "
                                      "never built whole; 1024 tokens = 0.5 GB of fp32 logits at a time)")
    # --- bookkeeping
    save_every: int = _opt(200, "write a checkpoint every N optimizer steps (and always at the end / on stop)")
    keep_checkpoints: int = _opt(2, "keep the K checkpoints written last (and the one this run resumed from), "
                                    "delete older ones")
    eval_every: int = _opt(200, "validation loss every N optimizer steps (and at the end); 0: only at the end")
    eval_max_rows: int | None = _opt(None, "use at most this many validation rows per evaluation (default all)")
    log_every: int = _opt(1, "write metrics.jsonl / TensorBoard every N steps")
    resume: str = _opt("auto", "auto: continue from the checkpoint written last in --output-dir (if any), passing "
                               "over damaged ones with a warning; never: start fresh (refused if checkpoints exist); "
                               "or a checkpoint directory (a rewind: the run goes on from there, and that checkpoint "
                               "becomes its newest)")
    seed: int = _opt(1234, "seed for LoRA initialisation, data order and dropout")
    device: str = _opt("auto", "auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu or cuda",
                       choices=["auto", "cpu", "cuda"])
    estimate_memory: bool = _opt(False, "print the estimated peak GPU memory table for this configuration and exit "
                                        "without loading the model: exit status 0 if it fits --gpu-memory-gib, 1 "
                                        "if it does not (with the settings to change, as training would refuse it)",
                                 action="store_true")
    # Planning inputs for --estimate-memory only: a training run takes them from --data and torchrun instead.
    seq_len: int | None = _opt(None, "with --estimate-memory: tokens per packed row to plan for (default: --data's "
                                     "max_len when --data is given, else 8192; this flag wins over --data)")
    nproc: int | None = _opt(None, "with --estimate-memory: processes to plan for (torchrun --nproc_per_node x "
                                   "nodes; above 1, DDP's gradient buckets add a copy of the LoRA gradients, and FSDP "
                                   "divides the model by it) (default: $WORLD_SIZE, else 1)")


# Settings a checkpoint must share with the run that resumes it. The optimizer is among them because its saved
# state only loads into the same optimizer class (an 8-bit state into AdamW, or back, fails deep inside the load).
FINGERPRINT_KEYS = ("quantize", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "optimizer")
# Settings a resumed run may change and that apply from the resumed step (training.apply_settings; the schedule's
# length and warm-up are recorded resolved, as max_steps and warmup_steps); each checkpoint records them, and a
# resume lists those that changed. The rest outside the fingerprint shape speed, memory or bookkeeping, except the
# seed (it fixes the data order a checkpoint's position is in; checkpoint.check_seed).
RESUMABLE_KEYS = ("lr", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm")
# Not part of a training run's record (config.json): they only shape the --estimate-memory plan.
ESTIMATE_ONLY_KEYS = ("seq_len", "nproc")


def build_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the flags below "
                                                          "(the command line overrides it)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {k: v for k, v in f.metadata.items() if k != "help"}
        default = getattr(defaults, f.name)
        shown = ",".join(default) if isinstance(default, list) else default
        if kw.get("action") or f.name in ESTIMATE_ONLY_KEYS:
            help_text = f.metadata["help"]
        elif f.name in ("model", "data", "output_dir"):
            help_text = f.metadata["help"] + " (required)"
        else:
            help_text = f.metadata["help"] + f" [default: {shown}]"
        if "action" not in kw:
            kw["type"] = _type_of(f.name, default)
            kw.setdefault("metavar", _metavar(f.name, kw["type"], kw.get("choices")))
        ap.add_argument(flag, help=help_text, **kw)
    return ap


def _metavar(name: str, type_, choices) -> str:
    special = {"model": "DIR", "data": "DIR", "output_dir": "DIR", "lr": "LR", "lora_r": "R",
               "lora_target_modules": "NAMES", "resume": "auto|never|DIR", "keep_checkpoints": "K",
               "gpu_memory_gib": "GIB", "checkpoint_layers": "auto|all|N"}
    if name in special:
        return special[name]
    if choices:
        return "{" + ",".join(choices) + "}"
    return {int: "N", float: "X"}.get(type_, "VALUE")


def _type_of(name: str, default):
    if name == "lora_target_modules":
        return lambda s: [x.strip() for x in s.split(",") if x.strip()]
    if name in ("max_steps", "warmup_steps", "eval_max_rows", "seq_len", "nproc"):
        return int
    if name == "gpu_memory_gib":
        return float
    if name == "epochs":
        return float
    return type(default) if default is not None else str


def resolve_config(argv=None, description: str = "") -> TrainConfig:
    """Defaults < YAML (--config) < command line; then validate the combination."""
    args = vars(build_parser(description).parse_args(argv))
    values: dict = {}
    if "config" in args:
        values.update(_load_yaml(args.pop("config")))
    values.update(args)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {p}: no such file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {p}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise UserError(f"--config {p}: expected a mapping of flag names to values")
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UserError(f"--config {p}: unknown key {key!r} (use the flag names of finetune.py --help)")
        out[name] = _yaml_value(p, key, names[name], getattr(defaults, name), value)
    return out


def _yaml_value(path: Path, key, f: dataclasses.Field, default, value):
    """A YAML value converted as its command-line flag converts text, or a UserError naming the key and file.

    YAML's typing is not the flags': PyYAML reads 2e-4 as a string (its floats need a dot: 2.0e-4), and a float
    in an integer setting or a list in a scalar one would otherwise reach training unchecked.
    """
    flag = "--" + f.name.replace("_", "-")
    type_ = _type_of(f.name, default)
    choices = f.metadata.get("choices")
    if f.metadata.get("action") is not None:
        wanted = "true or false"
    elif f.name == "lora_target_modules":
        wanted = "a list of projection names (or one comma-separated string)"
    elif choices:
        wanted = "one of " + ", ".join(choices)
    else:
        wanted = {int: "an integer", float: "a number"}.get(type_, "a string")

    def bad(got) -> UserError:
        return UserError(f"--config {path}: key {key!r}: {flag} takes {wanted}, not {got}")

    if value is None:
        if default is None:
            return None
        raise bad("an empty value")
    if wanted == "true or false":
        if not isinstance(value, bool):
            raise bad(repr(value))
        return value
    if f.name == "lora_target_modules":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise bad(repr(value))
        return [x.strip() for x in items if x.strip()]
    if isinstance(value, (list, dict)):
        raise bad(f"a {'list' if isinstance(value, list) else 'mapping'} ({value!r})")
    # int() would pass both silently: True is an int to Python, and int(2.5) is 2
    if isinstance(value, bool) or (type_ is int and isinstance(value, float)):
        raise bad(repr(value))
    try:
        converted = type_(str(value) if type_ is str else value)
    except (TypeError, ValueError):
        raise bad(repr(value)) from None
    if choices and converted not in choices:
        raise bad(repr(value))
    return converted


def validate(cfg: TrainConfig) -> None:
    if not cfg.estimate_memory:
        for name in ("model", "data", "output_dir"):
            if getattr(cfg, name) is None:
                raise UserError(f"--{name.replace('_', '-')} is required")
        for name, source in (("seq_len", "--data's metadata.json (pretokenize.py --max-len)"),
                             ("nproc", "the processes torchrun starts")):
            if getattr(cfg, name) is not None:
                raise UserError(f"--{name.replace('_', '-')} is only used with --estimate-memory; training takes it "
                                f"from {source}")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise UserError("give either --max-steps or --epochs, not both")
    unknown = [m for m in cfg.lora_target_modules if m not in LORA_TARGETS]
    if unknown:
        raise UserError(f"--lora-target-modules {','.join(cfg.lora_target_modules)}: unknown projection name(s) "
                        f"{', '.join(unknown)}; valid names: {','.join(LORA_TARGETS)}")
    twice = sorted({m for m in cfg.lora_target_modules if cfg.lora_target_modules.count(m) > 1})
    if twice:
        raise UserError(f"--lora-target-modules {','.join(cfg.lora_target_modules)}: {', '.join(twice)} named twice")
    # float("inf") and float("nan") pass as flags and YAML values (.inf, .nan); an infinite --epochs or --lr would
    # fail deep inside training, and a NaN passes no range check below only by accident
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} {value}: must be a finite number")
    checks = [("max_steps", cfg.max_steps is None or cfg.max_steps >= 1, ">= 1"),
              ("epochs", cfg.epochs is None or cfg.epochs > 0, "> 0"),
              ("micro_batch_size", cfg.micro_batch_size >= 1, ">= 1"),
              ("grad_accum", cfg.grad_accum >= 1, ">= 1"),
              ("lr", cfg.lr > 0, "> 0"),
              ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
              ("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "in [0, 1)"),
              ("warmup_steps", cfg.warmup_steps is None or cfg.warmup_steps >= 0, ">= 0"),
              ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
              ("adam_beta1", 0 <= cfg.adam_beta1 < 1, "in [0, 1)"),
              ("adam_beta2", 0 <= cfg.adam_beta2 < 1, "in [0, 1)"),
              ("max_grad_norm", cfg.max_grad_norm >= 0, ">= 0"),
              ("lora_r", cfg.lora_r >= 1, ">= 1"),
              ("lora_alpha", cfg.lora_alpha > 0, "> 0"),
              ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
              ("lora_target_modules", len(cfg.lora_target_modules) > 0, "non-empty"),
              ("loss_chunk_size", cfg.loss_chunk_size >= 1, ">= 1"),
              ("save_every", cfg.save_every >= 1, ">= 1"),
              ("keep_checkpoints", cfg.keep_checkpoints >= 1, ">= 1"),
              ("eval_every", cfg.eval_every >= 0, ">= 0"),
              ("eval_max_rows", cfg.eval_max_rows is None or cfg.eval_max_rows >= 1, ">= 1"),
              ("log_every", cfg.log_every >= 1, ">= 1"),
              ("device", cfg.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
              ("parallelism", cfg.parallelism in ("auto", "ddp", "fsdp"), "auto, ddp or fsdp"),
              ("checkpoint_layers", str(cfg.checkpoint_layers) in ("auto", "all") or str(cfg.checkpoint_layers).isdigit(),
               "auto, all or a number of blocks"),
              ("gpu_memory_gib", cfg.gpu_memory_gib is None or cfg.gpu_memory_gib > 0, "> 0"),
              ("seq_len", cfg.seq_len is None or cfg.seq_len >= 1, ">= 1"),
              ("nproc", cfg.nproc is None or cfg.nproc >= 1, ">= 1")]
    for name, ok, what in checks:
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {what}")


def as_dict(cfg: TrainConfig) -> dict:
    """The training settings, as printed at start and recorded in RUN/config.json."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ESTIMATE_ONLY_KEYS}
