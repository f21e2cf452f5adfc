"""What finetune.py settles before it loads anything: the kernels, DDP or FSDP, how many blocks to recompute, and
whether the resulting peak fits the GPU, from qlora/memory.py's estimate.

Training calls `plan_memory` then `check_fits` (a one-line refusal naming the knobs); `python finetune.py
--estimate-memory` prints the plan's table and `fit_advice`, the same knobs. `--checkpoint-layers auto` recomputes
the fewest blocks whose estimate fits memory.DEFAULT_BUDGET_FRACTION of the GPU; `choose_parallelism` picks DDP or
FSDP (qlora/fsdp.py) for --parallelism auto.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig
from .errors import UserError
from .llama3 import LLAMA3_8B_CONFIG
from .memory import DEFAULT_BUDGET_FRACTION, GiB, MemoryEstimate, choose_checkpoint_layers, estimate_memory

PARALLELISMS = ("auto", "ddp", "fsdp")
PLANNING_GPU_GIB = 40.0    # --estimate-memory on a machine without a GPU plans for an A100-40GB (Raven's cards)
PLANNING_SEQ_LEN = 8192    # --estimate-memory without --data or --seq-len


@dataclass(frozen=True)
class MemoryPlan:
    kernels: str                # "liger" (the GPU fast path, qlora/speed.py) or "none" (plain PyTorch)
    parallelism: str            # "ddp" (a whole model per process) or "fsdp" (qlora/fsdp.py: 1/N each)
    checkpoint_layers: int      # blocks recomputed in the backward: -1 all, 0 none, else the first N
    gpu_gib: float              # the GPU size planned for
    estimate: MemoryEstimate    # the peak these settings give (its table is what --estimate-memory prints)


def _liger_installed() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernels(requested: str, device_type: str | None) -> str:
    """'liger' or 'none'. device_type None = planning for a GPU (--estimate-memory on a machine without one)."""
    if requested == "none":
        return "none"
    on_gpu = device_type in (None, "cuda")
    if requested == "liger":
        if not on_gpu:
            raise UserError("--kernels liger: the fast path needs a CUDA GPU (Triton kernels); use --kernels auto or "
                            "none on CPU")
        if not _liger_installed():
            raise UserError("--kernels liger: liger-kernel is not installed (bash install_prereqs, or pip install "
                            "liger-kernel); or use --kernels none")
        return "liger"
    return "liger" if on_gpu and _liger_installed() else "none"


def plan_memory(cfg: TrainConfig, *, model_config: dict | None, max_len: int | None, world_size: int = 1,
                device_type: str | None = None, gpu_total_bytes: int | None = None) -> MemoryPlan:
    """Kernels, parallelism and recomputed blocks for `cfg` on this model, row length and process count, with their
    estimate.

    model_config None: Llama-3-8B. device_type None: planning for a GPU without one (--estimate-memory).
    gpu_total_bytes: this GPU's size (--gpu-memory-gib wins; neither: PLANNING_GPU_GIB).
    """
    kernels = resolve_kernels(cfg.kernels, device_type)
    gpu_gib = float(cfg.gpu_memory_gib or (gpu_total_bytes / GiB if gpu_total_bytes else PLANNING_GPU_GIB))
    budget = DEFAULT_BUDGET_FRACTION * gpu_gib * GiB
    recipe = dict(seq_len=max_len or PLANNING_SEQ_LEN, world_size=world_size, micro_batch_size=cfg.micro_batch_size,
                  lora_r=cfg.lora_r, lora_targets=tuple(cfg.lora_target_modules), kernels=kernels,
                  fused_mlp=kernels == "liger", fused_loss=kernels == "liger", optimizer=cfg.optimizer,
                  quantize=cfg.quantize, loss_chunk_size=cfg.loss_chunk_size)
    if cfg.parallelism == "auto" and device_type == "cpu":
        recipe["parallelism"] = "ddp"  # no GPU memory to save: a whole model per process
    else:
        recipe["parallelism"] = choose_parallelism(cfg.parallelism, model_config, budget_bytes=budget, **recipe)
    layers = (model_config or LLAMA3_8B_CONFIG)["num_hidden_layers"]
    requested = str(cfg.checkpoint_layers)
    if not cfg.gradient_checkpointing:
        if cfg.low_memory:
            raise UserError("--low-memory recomputes every block: drop --no-gradient-checkpointing")
        n = 0
    elif cfg.low_memory or requested == "all":
        n = -1
    elif requested.isdigit():
        n = -1 if int(requested) >= layers else int(requested)
    elif device_type == "cpu":  # no GPU budget to spend: recompute every block, the smallest footprint
        n = -1
    else:
        n = choose_checkpoint_layers(model_config, budget, **recipe)
        n = -1 if n is None or n >= layers else n
    estimate = estimate_memory(model_config, checkpoint_layers=n, **recipe)
    return MemoryPlan(kernels=kernels, parallelism=recipe["parallelism"], checkpoint_layers=n, gpu_gib=gpu_gib,
                      estimate=estimate)


def choose_parallelism(requested: str, model_config: dict | None, *, budget_bytes: float, world_size: int = 1,
                       **kw) -> str:
    """"ddp" or "fsdp" for --parallelism auto|ddp|fsdp: DDP (a whole model per GPU, no weight traffic: faster) when
    one process fits budget_bytes with every block recomputed, else FSDP. An explicit ddp or fsdp wins.

    kw: estimate_memory's recipe keywords (checkpoint_layers and parallelism are set here).
    """
    if requested not in PARALLELISMS:
        raise UserError(f"--parallelism {requested}: choose one of {', '.join(PARALLELISMS)}")
    if requested != "auto":
        return requested
    if world_size == 1:
        return "ddp"  # one process: nothing to shard over
    kw = {k: v for k, v in kw.items() if k not in ("checkpoint_layers", "parallelism")}
    smallest = estimate_memory(model_config, checkpoint_layers=-1, world_size=world_size, parallelism="ddp", **kw)
    return "ddp" if smallest.fits(budget_bytes) else "fsdp"


def check_fits(plan: MemoryPlan) -> None:
    """One-line refusal, naming the knobs, when the estimated peak does not fit the GPU."""
    advice = fit_advice(plan)
    if advice:
        raise UserError(advice)


def fit_advice(plan: MemoryPlan, *, table_shown: bool = False) -> str | None:
    """None if the estimate fits the GPU, else one line naming the knobs (check_fits' and --estimate-memory's)."""
    est, gpu_gib = plan.estimate, plan.gpu_gib
    if est.fits(gpu_gib * GiB):
        return None
    s = est.settings
    knobs = []
    if est.load_bytes > est.total_bytes:  # FSDP: the whole 4-bit model on each GPU before it is sharded
        return (f"estimated GPU memory while loading {est.load_bytes / GiB:.1f} GiB (the whole 4-bit model on each "
                f"GPU, before FSDP shards it) does not fit the {gpu_gib:g} GiB GPU: this model needs larger GPUs "
                f"(or --gpu-memory-gib if the GPU is larger)")
    if s["parallelism"] == "ddp" and s["world_size"] > 1:
        knobs.append("--parallelism fsdp (each process holds 1/N of the model)")
    if s["parallelism"] == "fsdp":
        knobs.append("more processes (FSDP: each holds 1/N of the model)")
    if s["micro_batch_size"] > 1:
        knobs.append("--micro-batch-size 1 (raise --grad-accum instead)")
    if s["checkpoint_layers"] < s["layers"]:
        knobs.append("--checkpoint-layers all or --low-memory")
    if s["kernels"] != "liger":
        knobs.append("--kernels auto on a GPU with liger-kernel installed")
    knobs.append("a smaller pretokenize.py --max-len")
    table = "" if table_shown else "; python finetune.py --estimate-memory ... shows the table"
    return (f"estimated peak GPU memory {est.total_bytes / GiB:.1f} GiB does not fit the {gpu_gib:g} GiB GPU "
            f"(seq {s['seq_len']} x micro-batch {s['micro_batch_size']}, {s['checkpoint_layers']}/{s['layers']} "
            f"blocks recomputed{table}): try " + ", ".join(knobs) + " (or --gpu-memory-gib if the GPU is larger)")
