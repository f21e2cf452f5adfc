"""Training checkpoints: RUN/checkpoints/step-NNNNNNN/, each written whole or not at all (qlora.atomic.atomic_dir).

A checkpoint holds everything needed to continue bit-for-bit: the LoRA weights (PEFT format, fp32), optimizer and
LR-scheduler state, every rank's RNG states, the data position (rows consumed from the seeded stream) and the
fingerprint of model + LoRA config + data that a resume must match. trainer_state.json is written last inside the
temporary directory, and the directory is renamed into place only after it, so a listed checkpoint is complete
(qlora/rundir.py names the files and lists the checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_dir
from .config import FINGERPRINT_KEYS, TrainConfig
from .errors import UserError
from .rundir import ADAPTER_DIR, TRAINER_STATE_FILE, checkpoints_dir, list_checkpoints, step_dir_name


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir, step: int, *, peft_model, optimizer, scheduler, trainer_state: dict,
                    rng_states: list[dict], keep: int) -> Path:
    """Write step-NNNNNNN atomically (call on rank 0 only), then delete all but the newest `keep` checkpoints."""
    path = checkpoints_dir(run_dir) / step_dir_name(step)
    with atomic_dir(path) as tmp:
        peft_model.save_pretrained(tmp / ADAPTER_DIR)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng_states.pt")
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(dict(trainer_state, step=step), indent=2) + "\n")
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints_dir(run_dir).glob(".step-*"):  # leftovers of a save killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    return path


def read_trainer_state(path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE_FILE).read_text())


def is_checkpoint(path) -> bool:
    return (Path(path) / TRAINER_STATE_FILE).is_file()


def run_fingerprint(cfg: TrainConfig, model_config: dict, meta: dict, train_rows: int) -> tuple[str, dict]:
    """(sha256, parts) of what a checkpoint must share with the run that resumes it: the base model (shape and
    weight files), the LoRA recipe and optimizer (FINGERPRINT_KEYS), and the training data."""
    parts = json.loads(json.dumps({
        "model": {**{k: model_config.get(k) for k in (
            "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "rope_theta", "tie_word_embeddings")},
                  "weights": sorted((p.name, p.stat().st_size) for p in Path(cfg.model).glob("*.safetensors"))},
        "lora": {k: getattr(cfg, k) for k in FINGERPRINT_KEYS},
        "data": {"tokenizer_sha256": meta["tokenizer"].get("sha256"), "max_len": int(meta["max_len"]),
                 "train_rows": train_rows, "train_shards": meta["splits"]["train"].get("shards"),
                 "train_tokens": meta["splits"]["train"].get("tokens")},
    }))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest(), parts


def check_fingerprint(path, fingerprint: str, parts: dict) -> None:
    """Refuse a checkpoint of another model, recipe (LoRA, quantization, optimizer) or data set, naming what differs."""
    state = read_trainer_state(path)
    if state.get("fingerprint") == fingerprint:
        return
    old = state.get("fingerprint_parts", {})
    diffs, unrecorded = [], []
    for section in sorted(set(old) | set(parts)):
        a, b = old.get(section), parts.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in a:
                    unrecorded.append(k)
                elif a.get(k) != b.get(k):
                    diffs.append(f"{section}.{k}")
        elif a != b:
            diffs.append(section)
    if unrecorded and not diffs:
        # A checkpoint from before these settings were fingerprinted (the optimizer, added later): it agrees on
        # everything it recorded, and refusing it would strand a run mid-way with no way to continue.
        return
    flags = []
    for d in diffs:
        section, _, key = d.partition(".")
        flag = "--" + key.replace("_", "-") if section == "lora" else f"--{section}"
        if flag not in flags:
            flags.append(flag)
    raise UserError(f"checkpoint {path} was made with a different recipe or data (differs: "
                    f"{', '.join(diffs) or 'fingerprint'}); use a new --output-dir, or restore the original "
                    f"{'/'.join(flags) or '--model/--data/LoRA'} flag{'s' if len(flags) != 1 else ''}")


def load_checkpoint(path, *, peft_model, optimizer, scheduler, rank: int) -> dict:
    """Restore LoRA weights, optimizer, scheduler and this rank's RNG; return trainer_state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    weights = load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors"), device=str(device))
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"checkpoint {path}: adapter has weights this model lacks ({unexpected[0]}, ...)")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_states = torch.load(path / "rng_states.pt", weights_only=False)
    if rank < len(rng_states):
        restore_rng(rng_states[rank])
    return read_trainer_state(path)


# ----------------------------------------------------------------------------------------------- FSDP (sharded)
# The same directory contract (step-NNNNNNN/, renamed into place with trainer_state.json inside, last K kept), with
# the LoRA weights and optimizer state written by every rank in parallel, none of them gathered for resuming:
#   lora/                torch.distributed.checkpoint of the LoRA masters (each rank writes its DTensor shards)
#   optimizer/rank-N.pt  each rank's optimizer state (qlora.fsdp.shard_optimizer runs on the rank's own shards,
#                        so there is no whole-model optimizer state to reshard; resuming needs the same world size)
#   adapter/             the gathered LoRA as a normal PEFT adapter, as in a DDP checkpoint (predict.py reads it)
#   scheduler.pt, rng_states.pt, trainer_state.json ("parallelism": "fsdp")
def checkpoint_parallelism(path) -> str:
    return read_trainer_state(path).get("parallelism", "ddp")


def check_resume_parallelism(path, parallelism: str, world_size: int | None = None) -> None:
    """One-line refusal to resume a checkpoint written under the other parallelism (its files differ), or an FSDP one
    written by another number of processes (each one's optimizer state is its own shard)."""
    written = checkpoint_parallelism(path)
    if written != parallelism:
        raise UserError(f"checkpoint {path} was written under {written.upper()}, this run uses "
                        f"{parallelism.upper()}: resume it with --parallelism {written}, or use a new --output-dir")
    state = read_trainer_state(path)
    if parallelism == "fsdp" and world_size is not None and state["world_size"] != world_size:
        raise UserError(f"checkpoint {path} was written by {state['world_size']} FSDP processes, this run has "
                        f"{world_size}: resume with torchrun --nproc_per_node {state['world_size']} (each process's "
                        f"optimizer state is its own shard)")


def save_sharded_checkpoint(run_dir, step: int, *, peft_model, optimizer, scheduler, trainer_state: dict,
                            rng_states: list[dict], keep: int, rank: int) -> Path:
    """Write step-NNNNNNN from every rank of an FSDP run (a collective: all ranks call it), renamed into place
    by rank 0 once every rank has written; then delete all but the newest `keep` checkpoints."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .fsdp import save_adapter

    path = checkpoints_dir(run_dir) / step_dir_name(step)
    tmp = path.with_name(f".{path.name}.sharded-tmp")  # one name for every rank (atomic_dir's is per process)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "optimizer").mkdir(parents=True)
    dist.barrier()
    lora = get_model_state_dict(peft_model, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save(lora, checkpoint_id=str(tmp / "lora"))
    torch.save(optimizer.state_dict(), tmp / "optimizer" / f"rank-{rank:05d}.pt")
    save_adapter(peft_model, tmp / ADAPTER_DIR, is_main=rank == 0)
    if rank == 0:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng_states.pt")
        state = dict(trainer_state, step=step, parallelism="fsdp", world_size=dist.get_world_size())
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    dist.barrier()  # every rank's files are on disk before the directory becomes a listed checkpoint
    if rank == 0:
        trash = path.with_name(f".{path.name}.old")
        if path.exists():  # the same step saved again after a resume: swap, so one of the two is always listed
            path.rename(trash)
        tmp.rename(path)
        shutil.rmtree(trash, ignore_errors=True)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoints_dir(run_dir).glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return path


def load_sharded_checkpoint(path, *, peft_model, optimizer, scheduler, rank: int, world_size: int) -> dict:
    """Every rank reads its own LoRA shards and optimizer state, scheduler and its RNG; return trainer_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    path = Path(path)
    check_resume_parallelism(path, "fsdp", world_size)
    state = read_trainer_state(path)
    lora = get_model_state_dict(peft_model, options=StateDictOptions(ignore_frozen_params=True))
    dcp.load(lora, checkpoint_id=str(path / "lora"))  # refuses a checkpoint that lacks any of these LoRA weights
    # strict=False: the frozen base is not part of the checkpoint (and not of `lora`)
    set_model_state_dict(peft_model, lora, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    optimizer.load_state_dict(torch.load(path / "optimizer" / f"rank-{rank:05d}.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    restore_rng(torch.load(path / "rng_states.pt", weights_only=False)[rank])
    return state
