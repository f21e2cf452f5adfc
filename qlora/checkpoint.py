"""Training checkpoints: RUN/checkpoints/step-NNNNNNN/, each written whole or not at all (qlora.atomic.atomic_dir).

A checkpoint holds everything needed to continue bit-for-bit: the LoRA weights (PEFT format, fp32), optimizer and
LR-scheduler state, every rank's RNG states, the data position (rows consumed from the seeded stream) and the
fingerprint of model + LoRA config + data that a resume must match (qlora/rundir.py names the files).

Trust: the directory is renamed into place only when complete (a kill -9 mid-save leaves a hidden temporary), and
its last file, manifest.json, records the size and sha256 of every other file and the write order. A checkpoint is
trusted only if its files still match (checkpoint_damage): a file truncated or changed later (a full disk, a copy
cut short) is found before anything is loaded, and --resume auto falls back to the newest intact checkpoint.

Write order, not step, decides which checkpoint is newest: after a rewind (--resume RUN/checkpoints/step-4 in a run
that had step-6) the run goes on from step 4, so the new step-5 is newer than the old step-6. Resuming from a
checkpoint moves it to the front of the order (mark_resumed), so until the rewound run saves, step-4 is its newest.
--resume auto takes the checkpoint written last; rotation deletes those written first, never the one the run
resumed from.
The manifest and these rules are the same for DDP and FSDP (sharded) checkpoints: they cover whatever files a step
directory holds.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .atomic import atomic_dir, write_json_atomic
from .config import FINGERPRINT_KEYS, TrainConfig
from .errors import UserError
from .rundir import (ADAPTER_DIR, MANIFEST_FILE, TRAINER_STATE_FILE, checkpoints_dir, list_checkpoints, step_dir_name,
                     step_dirs)


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
                    rng_states: list[dict], keep: int, protect=None) -> Path:
    """Write step-NNNNNNN atomically (call on rank 0 only), then delete all but the `keep` checkpoints written
    last, sparing `protect` (the checkpoint this run resumed from)."""
    path = checkpoints_dir(run_dir) / step_dir_name(step)
    with atomic_dir(path) as tmp:
        peft_model.save_pretrained(tmp / ADAPTER_DIR)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng_states.pt")
        write_trainer_state(tmp, dict(trainer_state, step=step))
        write_manifest(tmp, run_dir)
    remove_old_checkpoints(run_dir, keep, protect)
    return path


def write_trainer_state(step_dir: Path, state: dict) -> None:
    # allow_nan=False: a NaN loss must never reach a checkpoint (finetune.py stops a diverged run before saving)
    (step_dir / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2, allow_nan=False) + "\n")


def read_trainer_state(path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE_FILE).read_text())


# ----------------------------------------------------------------------------------------------- trust and order
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def write_seq(path) -> int:
    """A checkpoint's place in the write order of its run (0: written before manifests, or unreadable)."""
    manifest = _read_manifest(Path(path))
    seq = manifest.get("write_seq") if manifest else None
    return seq if isinstance(seq, int) else 0


def write_manifest(step_dir: Path, run_dir) -> None:
    """The last file of a checkpoint, written into its temporary directory once every other file is on disk (all
    ranks' for a sharded one): each file's size and sha256, and the write order (one more than any checkpoint of
    the run has)."""
    files = {p.relative_to(step_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (step_dir / MANIFEST_FILE).write_text(json.dumps({"write_seq": _next_write_seq(run_dir), "files": files},
                                                     indent=1) + "\n")


def _next_write_seq(run_dir) -> int:
    return 1 + max((write_seq(p) for _, p in list_checkpoints(run_dir)), default=0)


def mark_resumed(path, run_dir) -> None:
    """Put a checkpoint of this run first in the write order as the run resumes from it: after a rewind, the
    checkpoints of the abandoned steps beyond it are then older than it, for --resume auto and for rotation.
    Checkpoints of another run, or from before manifests, are left as they are."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None or path.resolve().parent != checkpoints_dir(run_dir).resolve():
        return
    if write_seq(path) < max(write_seq(p) for _, p in list_checkpoints(run_dir)):
        write_json_atomic(path / MANIFEST_FILE, dict(manifest, write_seq=_next_write_seq(run_dir)))


def checkpoint_damage(path) -> str | None:
    """None if the checkpoint at `path` is intact, else what is wrong with it (for a one-line message).

    Sizes are compared first (a truncated file is found without reading anything), then the sha256 digests. A
    checkpoint from before manifests were written is trusted if its state file reads.
    """
    path = Path(path)
    if not (path / TRAINER_STATE_FILE).is_file():
        return f"no {TRAINER_STATE_FILE}: not a complete checkpoint"
    if (path / MANIFEST_FILE).exists():
        manifest = _read_manifest(path)
        if manifest is None:
            return f"{MANIFEST_FILE} is unreadable"
        files = manifest["files"]
        for rel, saved in files.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != saved.get("bytes"):
                return f"{rel} has {f.stat().st_size} bytes, {saved.get('bytes')} when saved"
        for rel, saved in files.items():
            if _sha256(path / rel) != saved.get("sha256"):
                return f"{rel} differs from what was saved (sha256)"
    try:
        read_trainer_state(path)
    except (OSError, ValueError):
        return f"{TRAINER_STATE_FILE} is unreadable"
    return None


def checkpoints_by_write_order(run_dir) -> list[Path]:
    """The complete checkpoints of a run, written first to written last (same write order: by step)."""
    return [p for _, p in sorted(list_checkpoints(run_dir), key=lambda sp: (write_seq(sp[1]), sp[0]))]


def remove_old_checkpoints(run_dir, keep: int, protect=None) -> None:
    """Delete all but the `keep` checkpoints written last, never `protect`, and temporaries of killed saves.

    A step directory without its state file is not ours to delete (finetune.py reports it when it resumes)."""
    spared = Path(protect).resolve() if protect is not None else None
    for old in checkpoints_by_write_order(run_dir)[:-keep]:
        if old.resolve() != spared:
            shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints_dir(run_dir).glob(".step-*"):  # leftovers of a save killed mid-way
        shutil.rmtree(stale, ignore_errors=True)


def newest_intact_checkpoint(run_dir, warn: Callable[[str], None]) -> Path | None:
    """--resume auto: the checkpoint written last that is intact; None when the run has none.

    Each damaged checkpoint passed over, and every step directory without its state file, is reported through
    warn(line). Checkpoints that all fail their check are a UserError: starting afresh would silently discard them.
    """
    for _, p in step_dirs(run_dir):
        if not (p / TRAINER_STATE_FILE).is_file():
            warn(f"{p} has no {TRAINER_STATE_FILE}, so it is not a checkpoint (copied in part?); ignored")
    damaged = []
    for p in reversed(checkpoints_by_write_order(run_dir)):
        why = checkpoint_damage(p)
        if why is None:
            return p
        warn(f"checkpoint {p} is damaged ({why}); trying the one written before it")
        damaged.append(f"{p.name}: {why}")
    if damaged:
        raise UserError(f"--resume auto: every checkpoint in {checkpoints_dir(run_dir)} is damaged "
                        f"({'; '.join(damaged)}); move them away to start afresh, or use a new --output-dir")
    return None


def _read(path: Path, load):
    """load(path), or a one-line UserError naming the file: torch.load and safetensors raise many types for a
    damaged file."""
    try:
        return load(path)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"checkpoint {path.parent}: cannot read {path.name} ({reason}); resume from an older "
                        f"checkpoint with --resume DIR") from e


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


def check_seed(path, seed: int) -> None:
    """Refuse to resume with another --seed: it fixes the row order, and the checkpoint's data position (rows
    consumed) is a place in that order, so a new seed would repeat some rows of the epoch and skip others."""
    saved = read_trainer_state(path).get("seed")
    if saved is not None and saved != seed:
        raise UserError(f"--seed {seed}: checkpoint {path} was trained with --seed {saved}, which fixes the order of "
                        f"the training rows it is part-way through; restore --seed {saved}, or use a new --output-dir")


def load_checkpoint(path, *, peft_model, optimizer, scheduler, rank: int) -> dict:
    """Restore LoRA weights, optimizer, scheduler and this rank's RNG; return trainer_state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    weights = _read(path / ADAPTER_DIR / "adapter_model.safetensors", lambda f: load_file(str(f), device=str(device)))
    optimizer_state = _read(path / "optimizer.pt", lambda f: torch.load(f, map_location=device, weights_only=False))
    scheduler_state = _read(path / "scheduler.pt", lambda f: torch.load(f, weights_only=False))
    rng_states = _read(path / "rng_states.pt", lambda f: torch.load(f, weights_only=False))
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"checkpoint {path}: adapter has weights this model lacks ({unexpected[0]}, ...)")
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
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
                            rng_states: list[dict], keep: int, rank: int, protect=None) -> Path:
    """Write step-NNNNNNN from every rank of an FSDP run (a collective: all ranks call it), renamed into place
    by rank 0 once every rank has written; then delete all but the `keep` checkpoints written last, sparing
    `protect` (the checkpoint this run resumed from)."""
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
        write_trainer_state(tmp, dict(trainer_state, step=step, parallelism="fsdp", world_size=dist.get_world_size()))
    dist.barrier()  # every rank's files are on disk before the directory becomes a listed checkpoint
    if rank == 0:
        write_manifest(tmp, run_dir)
        trash = path.with_name(f".{path.name}.old")
        if path.exists():  # the same step saved again after a resume: swap, so one of the two is always listed
            path.rename(trash)
        tmp.rename(path)
        shutil.rmtree(trash, ignore_errors=True)
        remove_old_checkpoints(run_dir, keep, protect)
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
    optimizer.load_state_dict(_read(path / "optimizer" / f"rank-{rank:05d}.pt",
                                    lambda f: torch.load(f, weights_only=False)))
    scheduler.load_state_dict(_read(path / "scheduler.pt", lambda f: torch.load(f, weights_only=False)))
    restore_rng(_read(path / "rng_states.pt", lambda f: torch.load(f, weights_only=False))[rank])
    return state
