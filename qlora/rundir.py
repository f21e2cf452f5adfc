"""The run directory of finetune.py (contract 4): every name in it, and the files training keeps up to date.

    RUN/config.json                    settings, resolved recipe, versions, data metadata (written once per start)
    RUN/status.json                    state (running, stopped, finished, failed), step, loss; rewritten atomically
    RUN/metrics.jsonl                  one JSON record per logged step and per validation
    RUN/tensorboard/                   the same scalars for TensorBoard
    RUN/stop_requested                 touch it to stop at the next step boundary (with a checkpoint)
    RUN/checkpoints/step-NNNNNNN/      adapter/ + optimizer, scheduler, RNG, data position (qlora/checkpoint.py),
                                       trainer_state.json, and manifest.json (every file's size and sha256, and
                                       the write order), written last; renamed into place when complete
    RUN/adapter/                       the final LoRA adapter (PEFT format) and the tokenizer

finetune.py and qlora/checkpoint.py write these; predict.py reads them (--adapter RUN or a checkpoint, and
config.json for the training format). Only rank 0 writes. status.json's "stage": "finetune" marks a directory as
a run directory (check_run_dir); runs from before that key are known by their "state".
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

from .atomic import atomic_file, check_output_dir, write_json_atomic

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
STOP_FILE = "stop_requested"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"                    # RUN/adapter and RUN/checkpoints/step-NNNNNNN/adapter
TRAINER_STATE_FILE = "trainer_state.json"  # a checkpoint's step, data position and fingerprint
MANIFEST_FILE = "manifest.json"            # a checkpoint's last file: sizes and digests of all the others
STEP_DIR = re.compile(r"^step-(\d{7,})$")
STAGE = "finetune"
STATES = ("running", "stopped", "finished", "failed")


def check_run_dir(path, inputs: dict) -> None:
    """One-line refusal of an --output-dir that training must not write into: one that is, holds or lies inside an
    input (`inputs`, as qlora.atomic.check_output_dir's), or a non-empty directory that is not a run directory.
    A run directory's status.json says "stage": "finetune", or (runs from before that key) has a state; a lone
    stop file is finetune.sbatch asking to stop before training has started."""
    check_output_dir(path, inputs, stage=STAGE, marker={"stage": STAGE, "state": STATES}, marker_file=STATUS_FILE,
                     ignore=[STOP_FILE])


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dirs(run_dir) -> list[tuple[int, Path]]:
    """Every step-NNNNNNN directory, complete or not, by step (temporaries of a save start with '.': not listed)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with their state file), by step."""
    return [(s, p) for s, p in step_dirs(run_dir) if (p / TRAINER_STATE_FILE).is_file()]


def run_dir_of_adapter(adapter: Path) -> Path | None:
    """The run directory an adapter belongs to: 1 level up from RUN/adapter, 3 from a checkpoint's adapter."""
    return next((d for d in (adapter.parent, adapter.parent.parent, adapter.parent.parent.parent)
                 if (d / CONFIG_FILE).is_file() and (d / STATUS_FILE).is_file()), None)


class RunDir:
    """RUN/'s paths, and the status and metrics files training updates. Writes nothing unless `enabled` (rank 0)."""

    def __init__(self, path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled
        self.config_path = self.path / CONFIG_FILE
        self.status_path = self.path / STATUS_FILE
        self.metrics_path = self.path / METRICS_FILE
        self.tensorboard_path = self.path / TENSORBOARD_DIR
        self.stop_path = self.path / STOP_FILE
        self.adapter_path = self.path / ADAPTER_DIR
        self.status: dict = {"stage": STAGE}

    def clear_stale_stop_request(self) -> None:
        """A stop request left by the previous job must not stop this one; one made since this job started must
        stand (a USR1 or a `touch` while finetune.sbatch was still setting up). finetune.sbatch exports the job's
        start as QLORA_JOB_STARTED_AT (seconds since the epoch); run by hand, any request made before the run
        directory is opened is stale."""
        try:
            started = float(os.environ.get("QLORA_JOB_STARTED_AT", ""))
        except ValueError:
            started = time.time()
        try:
            if self.stop_path.stat().st_mtime < started:
                self.stop_path.unlink()
        except FileNotFoundError:
            pass

    def set_status(self, **fields) -> None:
        self.status.update(fields, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if self.enabled:
            write_json_atomic(self.status_path, self.status, allow_nan=False)

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop metric lines past the checkpoint: those steps are trained again."""
        if not (self.enabled and self.metrics_path.exists()):
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    keep.append(line)
            except ValueError:  # a line cut short by a kill
                continue
        with atomic_file(self.metrics_path) as f:
            f.write("".join(line + "\n" for line in keep))

    def log_metrics(self, record: dict) -> None:
        if self.enabled:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")


def library_versions() -> dict:
    """Versions of what shapes a run's numbers, for config.json."""
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def git_commit() -> str | None:
    """This checkout's commit ("-dirty" with uncommitted changes to tracked files), for config.json."""
    here = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None
