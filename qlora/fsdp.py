"""QLoRA sharded with torch's FSDP2 (`fully_shard`), for models whose 4-bit weights do not fit one GPU.

DDP keeps a whole copy of the model on every GPU; Llama-3-70B in NF4 (~32 GiB of blocks, ~4 GiB of bf16 embeddings
and lm_head) plus activations does not fit a 40 GB A100 that way. Here each of N processes keeps 1/N of every block
weight, the input embeddings, LoRA masters, gradients and optimizer state, and gathers one decoder block's weights
at a time:

    base = load_base_model(model_dir, device=device)   # NF4 bytes in uint8, bitsandbytes' default
    offload_embeddings(base)          # room for peft's fp32 LoRA masters, which are created whole
    peft_model = apply_lora(base, ...)
    train_step = shard(TrainStep(peft_model), device)       # fully_shard per block, embeddings, then the root
    optimizer = shard_optimizer(trainable_params, build)    # bitsandbytes 8-bit AdamW on each rank's own shards

What is taken from the libraries and what is not:
  * Sharding, gathering, mixed precision and gradient reduce-scatter are FSDP2's: `fully_shard` on every decoder
    block (one unit each: gathered just before the block runs, freed after), on the input embeddings, then on the
    root (the final norm). MixedPrecisionPolicy(param_dtype=None, reduce_dtype=fp32): nothing is cast when
    gathered (the LoRA masters arrive in fp32 and autocast casts them at each matmul, as in one process; the 4-bit
    bytes arrive as bytes). Gradients are reduce-scattered in fp32. FSDP's reduce-scatter averages over ranks as
    DDP's all-reduce does, so the training loop's loss scaling (world / label tokens of the global batch) gives the
    same update as one process with the same global batch.
  * The packed NF4 bytes stay in uint8, bitsandbytes' default storage. FSDP2 gathers a unit whose weights differ in
    dtype as raw bytes (one collective per block, its norms and LoRA weights with it), so the 4-bit weights arrive
    bit for bit. Stored in bf16 instead (`bnb_4bit_quant_storage`, the form bitsandbytes and accelerate document for
    FSDP1, whose flat parameters need one dtype), a block is gathered as bf16 values, and on the GPU the copies
    around FSDP2's all-gather rewrote the byte pairs that read as NaN: measured on an H200 (torch 2.11), 21 to 130
    changed values in every 4-bit weight of a small model and a loss 5.5e-5 (relative) away from one process's from
    the first step (bench/RESULTS.md, "FSDP2 on one GPU"). The CPU's copies keep every bit, so the CPU tests could
    not show it; with uint8 storage they gather every weight bit for bit, on the CPU (tests/test_fsdp.py) and on an
    H100 (93 of 93 weights, torch 2.11).
    torch < 2.13 needs `_integer_parameters_allowed` for fully_shard to take uint8 weights at all, and casts even
    integer weights to a param_dtype (hence None: `mixed_precision`).
  * The lm_head is not sharded: every process keeps it whole (`ignored_params`), as it keeps the quantisation
    constants. It is needed whole at the peak (the end of the forward, every activation held), where a sharded head
    costs its 1/N shard plus the gathered head (and FSDP's gather buffers), more than the whole head for any N:
    measured at the 70B width over 2 processes, 1.45 GiB more per process than keeping it whole. The loss also uses
    it by its weight, never calling it, so no FSDP hook would gather it. The input embeddings are a unit of their
    own, gathered at the start of the forward (resharded after: the backward never needs them). Tied embeddings (one
    weight at both ends) stay whole. `shard(..., shard_embeddings=False)` keeps the input embeddings whole too:
    measured on one GPU, the processes reserve 4.3 GiB more than they allocate under FSDP (0.4 without), which would
    be the embeddings' gather buffers staying reserved if twice the embeddings is the cause (bench/RESULTS.md,
    "FSDP2 on one GPU").
  * FSDP2 replaces every parameter by a plain one (a sharded DTensor; a plain all-gathered tensor while the block
    runs), so `Params4bit.quant_state` is gone from the weight the block computes with: the known trap (4-bit
    weights dequantised without their constants: loss 0.0 or NaN, no error). bitsandbytes keeps a copy of the quant
    state on each Linear4bit module (`module.quant_state`, on every rank, ~1/64 of the 4-bit bytes), and
    Linear4bit.forward puts it back itself (`fix_4bit_weight_quant_state_from_module`), but qlora/speed.py's fused
    SwiGLU+down never calls Linear4bit.forward: it reads the weight's quant state, finds none and quietly takes the
    unfused path (more memory than planned). A forward pre-hook on each block therefore puts the quant state back
    on the gathered weights (`_restore_quant_state`; hand-written, no library does it for FSDP2).
  * bitsandbytes' optimizers run their kernels on plain tensors and refuse DTensors ("got mixed torch.Tensor and
    DTensor"; bitsandbytes issue #1633, axolotl refuses the combination): `shard_optimizer` gives the optimizer each
    rank's local shards and hands it their gradients at every step. Element-wise state (32-bit Adam, and 8-bit
    Adam's 256-element blocks wherever a shard starts on a block boundary, as every Llama-3 LoRA shard does for
    N in 1, 2, 4, 8) gives the same update as on the whole tensor, provided each shard gets the state precision
    its whole tensor would (bitsandbytes decides 8 or 32 bits by the size of the tensor it is handed).

Gradient accumulation: gradients are reduce-scattered after every micro-batch (FSDP's default), so each rank
accumulates only its fp32 shard instead of the whole unsharded gradient (no `no_sync` as under DDP).
"""
from __future__ import annotations

import contextlib

import torch

from .errors import UserError
from .llama3 import IGNORE_INDEX

def offload_embeddings(base_model) -> None:
    """Move the unquantised embeddings and lm_head to CPU until `shard` brings them back (embeddings sharded).

    peft creates every fp32 LoRA master before anything can be sharded: on a 40 GB card the 70B model's 4-bit blocks,
    its 3.9 GiB of bf16 embeddings and the 3.1 GiB of LoRA masters do not fit together; without the embeddings they do.
    """
    base_model.get_input_embeddings().to("cpu")
    base_model.get_output_embeddings().to("cpu")


def _linear4bit_modules(module) -> list:
    import bitsandbytes as bnb

    return [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _restore_quant_state(linears):
    """Forward pre-hook (after FSDP's own, which gathers the block): the gathered 4-bit weights get their quant state."""

    def hook(_module, _args):
        for lin in linears:
            if getattr(lin.weight, "quant_state", None) is None:
                lin.weight.quant_state = lin.quant_state  # the gathered weight is reused every step: set once

    return hook


@contextlib.contextmanager
def _integer_parameters_allowed():
    """Let torch < 2.13's fully_shard take the uint8 4-bit weights.

    Before 2.13 fully_shard builds each sharded parameter as `nn.Parameter(t)` (requires_grad=True) and only then
    copies the original's requires_grad, which fails for an integer tensor ("only Tensors of floating point dtype can
    require gradients"; pytorch issue #177844, fixed by passing requires_grad to the constructor). The GPU image's
    torch 2.11 has it; install_prereqs pins 2.13. Meanwhile a Parameter built without requires_grad gets it only if
    its dtype can have gradients, which changes nothing for float tensors.
    """
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 13):
        yield
        return
    real_new = torch.nn.Parameter.__dict__["__new__"]

    def new(cls, data=None, requires_grad=None):
        if requires_grad is None:
            requires_grad = data is None or data.is_floating_point() or data.is_complex()
        return real_new(cls, data, requires_grad)

    torch.nn.Parameter.__new__ = new
    try:
        yield
    finally:
        torch.nn.Parameter.__new__ = real_new


def mixed_precision():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # param_dtype=None: nothing is cast when gathered. The 4-bit bytes must not be: torch < 2.13 casts integer weights
    # to param_dtype too (uint8 0..255 as bf16 values, read back by bitsandbytes as other bytes: on an H100 under
    # torch 2.11 the loss sat at ~ln(vocab) and never fell). The LoRA weights stay the fp32 masters that autocast casts
    # at each matmul, as without FSDP, so their gradients are the fp32 ones one process computes.
    # cast_forward_inputs=False: forward_loss's autocast decides every compute dtype, as without FSDP.
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard(train_step: torch.nn.Module, device, *, shard_embeddings: bool = True) -> torch.nn.Module:
    """fully_shard a TrainStep(peft 4-bit LoRA model) over all ranks of the default process group, in place.

    Units: every decoder block (gathered before it runs, resharded after, in the forward and again in the backward);
    the input embeddings (resharded after use: the backward never needs them; shard_embeddings=False keeps them
    whole); then the root, whose forward is the training step and which holds the final norm for the whole step (a
    vector). The lm_head stays whole on every process (module doc), tied embeddings too.
    The 4-bit weights must be stored in an integer dtype (load_base_model's default uint8; module doc says why).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .speed import decoder_layers

    if not dist.is_initialized():
        raise RuntimeError("qlora.fsdp.shard needs torch.distributed initialised (torchrun)")
    device = torch.device(device)
    base = train_step.model.get_base_model()
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    for lin in _linear4bit_modules(base):
        if lin.weight.dtype.is_floating_point:
            raise UserError(f"4-bit weights stored as {lin.weight.dtype}: FSDP would gather their bytes as "
                            f"{lin.weight.dtype} values and the GPU's copies rewrite those that read as NaN; load the "
                            f"base to shard with load_base_model(..., quant_storage=torch.uint8), the default")
        if lin.quant_state is None:  # bitsandbytes sets it when it quantises; prequantised loads may not
            lin.quant_state = lin.weight.quant_state
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, mp_policy=mixed_precision())
    with _integer_parameters_allowed():
        for block in decoder_layers(base):
            linears = _linear4bit_modules(block)
            fully_shard(block, reshard_after_forward=True, **kw)
            block.register_forward_pre_hook(_restore_quant_state(linears))
    for m in (embed, head):
        m.to(device)  # back from offload_embeddings, after the blocks shrank
    whole = {head.weight, embed.weight}
    if shard_embeddings and embed.weight is not head.weight:
        fully_shard(embed, reshard_after_forward=True, **kw)
        whole = {head.weight}
    fully_shard(train_step, ignored_params=whole, **kw)
    return train_step


def shard_optimizer(params, build) -> torch.optim.Optimizer:
    """`build(tensors)` (e.g. bitsandbytes' PagedAdamW8bit) over this rank's local shards of the DTensor `params`.

    Hooks on the returned optimizer give it the local shards of the (reduce-scattered, clipped) gradients before
    each step and drop both after it, so the next step starts from empty gradients as after zero_grad.
    """
    params = list(params)
    with torch.no_grad():  # to_local() without grad is the shard itself (its storage), not a differentiable view
        shards = [p.to_local() for p in params]
    optimizer = build(shards)
    _state_precision_of_the_whole_tensors(optimizer, params, shards)

    def hand_over_gradients(_optimizer, _args, _kwargs):
        with torch.no_grad():
            for p, s in zip(params, shards):
                s.grad = None if p.grad is None else p.grad.to_local()

    def drop_gradients(_optimizer, _args, _kwargs):
        for p, s in zip(params, shards):
            p.grad = s.grad = None

    optimizer.register_step_pre_hook(hand_over_gradients)
    optimizer.register_step_post_hook(drop_gradients)
    return optimizer


def _state_precision_of_the_whole_tensors(optimizer, params, shards) -> None:
    """bitsandbytes keeps a tensor smaller than min_8bit_size in 32-bit state, judging by the tensor it is handed: the
    shard of a tensor above the limit can fall below it and take 32-bit state where one process takes 8-bit (another
    update). Decide by the whole tensor instead, through bitsandbytes' per-parameter config override."""
    if not type(optimizer).__module__.startswith("bitsandbytes"):
        return
    import bitsandbytes as bnb

    limit = optimizer.args.min_8bit_size
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for p, s in zip(params, shards):
        if s.numel() < limit <= p.numel():
            manager.override_config(s, "min_8bit_size", 0)


def gather_lora_state(peft_model) -> dict:
    """The whole LoRA weights (fp32, on CPU) on rank 0, {} elsewhere; a collective: every rank calls it.

    One weight at a time (a few MiB on the GPU), the frozen base stays sharded. Gathered with c10d's
    all-gather rather than torch.distributed.checkpoint's full state dict: that one goes through
    functional collectives, which crashed (SIGSEGV) on gloo with CUDA tensors, the one-GPU check of
    bench/fsdp_bench.py (H200, torch 2.11); c10d's collective works on every backend.
    """
    import warnings

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    rank, world = dist.get_rank(), dist.get_world_size()
    state = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if not isinstance(p, DTensor):  # not sharded: already whole
            whole = p.detach()
        else:
            if tuple(p.placements) != (Shard(0),):
                raise RuntimeError(f"{name}: expected FSDP's dim-0 shards, got {p.placements}")
            # FSDP2 shards dim 0 as torch.chunk does: ceil(rows / N) on every rank but the last ones, padded here
            rows = p.shape[0]
            per_rank = -(-rows // world)
            local = p.to_local().detach()
            padded = local.new_zeros((per_rank, *p.shape[1:]))
            padded[:local.shape[0]] = local
            gathered = local.new_empty((per_rank * world, *p.shape[1:]))
            with warnings.catch_warnings():
                # the name torch 2.11 (the GPU image) and 2.13 share; 2.13 deprecates it for all_gather_single
                warnings.simplefilter("ignore", FutureWarning)
                dist.all_gather_into_tensor(gathered, padded)
            whole = gathered[:rows]
        if rank == 0:
            state[name] = whole.to("cpu", copy=True)
    return state


def save_adapter(peft_model, out_dir, *, is_main: bool) -> None:
    """A normal PEFT adapter (adapter_config.json + one adapter_model.safetensors) from a sharded model.

    Collective (the gather); only rank 0 writes. Loadable by PeftModel.from_pretrained and predict.py.
    """
    state = gather_lora_state(peft_model)
    if is_main:
        peft_model.save_pretrained(str(out_dir), state_dict=state)


def even_eval_batches(batches: list[dict], per_rank: int, filler: dict) -> list[dict]:
    """This rank's evaluation micro-batches, padded to `per_rank` with copies of `filler` that carry no label.

    Every forward under FSDP gathers weights with all ranks, so every rank must run as many forwards as the others;
    qlora.data.eval_micro_batches deals batches round-robin, which leaves some ranks one short. A filler's labels
    are all IGNORE_INDEX: it adds nothing to the summed loss or the label count.
    """
    import numpy as np

    blank = dict(filler, labels=np.full_like(filler["labels"], IGNORE_INDEX))
    return list(batches) + [blank] * (per_rank - len(batches))
