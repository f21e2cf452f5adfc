"""This process's place in a torchrun job (or a lone process), and the few collectives training needs.

torchrun starts one process per GPU and sets WORLD_SIZE, RANK and LOCAL_RANK; each process trains on
cuda:LOCAL_RANK (NCCL between GPUs, gloo between CPU processes, as in tests/test_ddp.py). A thin layer over
torch.distributed so that one process needs no process group at all.
"""
from __future__ import annotations

import hashlib
import os

import torch

from .errors import UserError


# Test hook, not a user setting: QLORA_TEST_ONE_GPU=1 puts every rank on cuda:0 and joins them with gloo, so DDP's
# CUDA path can be checked with 2 ranks on one GPU (NCCL refuses two ranks on one device; tests/test_gpu.py).
ONE_GPU_TEST_HOOK = "QLORA_TEST_ONE_GPU"


class Dist:
    """Rank, world size and device of this process; sums, gathers and barriers across the job (no-ops alone)."""

    def __init__(self, device_flag: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_flag == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to this process")
        use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
        one_gpu = use_cuda and os.environ.get(ONE_GPU_TEST_HOOK) == "1"
        self.device = torch.device("cuda", 0 if one_gpu else self.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            nccl = use_cuda and not one_gpu
            dist.init_process_group(backend="nccl" if nccl else "gloo", device_id=self.device if nccl else None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def lora_digest(params) -> str:
    """sha256 of the trainable weights' bytes: equal on every DDP rank iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
