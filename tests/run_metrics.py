"""Reading a finetune.py run directory's metrics.jsonl in tests (shared by the finetune, DDP and SLURM tests)."""
from __future__ import annotations

import json
from pathlib import Path


def metric_records(run: Path, key: str) -> dict[int, dict]:
    """step -> the metrics.jsonl record of that step that has `key` ("loss": training steps, "val_loss": validations)."""
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


def train_losses(run: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in metric_records(run, "loss").items()}
