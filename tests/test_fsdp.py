"""qlora/fsdp.py (QLoRA under torch's FSDP2), its sharded checkpoints (qlora/checkpoint.py) and its memory estimate.

CPU and gloo throughout. The fast tests shard in this process over a group of one: FSDP2 still swaps every parameter
for a sharded DTensor and, while a block runs, a gathered plain tensor, which is what drops bitsandbytes' quant
state. The slow ones run finetune.py under torchrun with 2 FSDP processes against one process on the same rows, stop
it, kill it and resume it. (tests/fsdp_driver.py, the same pieces without the run directory, is the GPU bench's.)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora import fsdp
from qlora.checkpoint import check_resume_parallelism, load_sharded_checkpoint
from qlora.errors import UserError
from qlora.llama3 import LLAMA3_8B_CONFIG, LLAMA3_70B_CONFIG
from qlora.memory import GiB, choose_checkpoint_layers, estimate_memory
from qlora.plan import choose_parallelism
from qlora.model import TrainStep, apply_lora, forward_loss, load_base_model
from shard_fixtures import random_rows, write_rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    """The tiny model with its own lm_head, as Llama-3-8B and -70B have (the head is then a unit of its own)."""
    from qlora.tiny_model import build_tiny_llama3

    return build_tiny_llama3(tmp_path_factory.mktemp("untied") / "model", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def fsdp_rows(tmp_path_factory, untied_model_dir):
    """40 packed rows of 64 tokens, 1-3 documents each."""
    return write_rows(tmp_path_factory.mktemp("fsdp_rows") / "tok", untied_model_dir, 64,
                      random_rows(untied_model_dir, 40, 64, seed=1))


def two_rows(data_dir) -> dict:
    from qlora.data import PackedShards
    from qlora.shards import read_shard_metadata

    rows = PackedShards(data_dir, "train", read_shard_metadata(data_dir))
    return {k: torch.from_numpy(v) for k, v in rows.rows([(0, 0), (0, 1)]).items()}


def quant_state_seen_by_mlps(peft_model) -> list:
    """Record, as each MLP starts, whether its down_proj's weight carries the quant state (the fused MLP needs it)."""
    seen = []
    for layer in peft_model.get_base_model().model.layers:
        layer.mlp.register_forward_pre_hook(
            lambda mlp, _args: seen.append(getattr(mlp.down_proj.base_layer.weight, "quant_state", None) is not None))
    return seen


# ----------------------------------------------------------------------------------------------- sharding (fast)
def test_sharded_blocks_compute_with_their_quant_state(one_process_group, untied_model_dir, fsdp_rows):
    """The loss is unchanged by sharding (bit for bit: the fp32 compute of the CPU gathers every weight in fp32, and
    the uint8-stored 4-bit bytes as bytes), and each gathered 4-bit weight carries its quant state (control:
    plain fully_shard drops it; qlora/speed.py's fused MLP would then quietly fall back to the unfused path)."""
    from torch.distributed.fsdp import fully_shard

    batch = two_rows(fsdp_rows)
    model = apply_lora(load_base_model(untied_model_dir), r=8)
    before, _ = forward_loss(model, batch)
    seen = quant_state_seen_by_mlps(model)
    step = fsdp.shard(TrainStep(model), "cpu")
    weight = model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
    assert type(weight).__name__ == "DTensor"  # sharded: the Params4bit and its quant state are gone from it
    after, _ = step(**batch)
    assert after.item() == before.item()
    assert seen == [True, True]

    plain = apply_lora(load_base_model(untied_model_dir), r=8)
    seen = quant_state_seen_by_mlps(plain)
    plain_step = TrainStep(plain)
    for layer in plain.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(plain_step)
    plain_step(**batch)
    assert seen == [False, False]


def test_shard_takes_uint8_weights_under_torch_before_2_13(one_process_group, untied_model_dir, fsdp_rows,
                                                          monkeypatch):
    """torch < 2.13 (the GPU image has 2.11) builds each sharded parameter as nn.Parameter(t) before copying
    requires_grad, which fails for uint8 (pytorch #177844), and casts integer weights to the policy's param_dtype like
    float ones (on an H100 the loss then sat at ~ln(vocab)). Both emulated here on 2.13, the cast with the CPU's
    param_dtype fp32: without the shim fully_shard fails as it did on the GPU; with it and param_dtype=None the loss is
    the unsharded one, where fp32 would have cast the bytes; nn.Parameter is restored after."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    real_init, real_dtype_attrs = FSDPParam._init_sharded_param, FSDPParam.init_dtype_attrs

    def init_as_before_2_13(self, param, *args, **kwargs):
        torch.nn.Parameter(param.detach()[:0])  # torch 2.11's call: no requires_grad
        return real_init(self, param, *args, **kwargs)

    def dtype_attrs_as_before_2_13(self, mp_policy):
        real_dtype_attrs(self, mp_policy)
        if mp_policy.param_dtype not in (None, self.orig_dtype):  # no exception for integer weights
            self.param_dtype = mp_policy.param_dtype

    monkeypatch.setattr(FSDPParam, "_init_sharded_param", init_as_before_2_13)
    monkeypatch.setattr(FSDPParam, "init_dtype_attrs", dtype_attrs_as_before_2_13)
    batch = two_rows(fsdp_rows)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.13.0"))
    with pytest.raises(RuntimeError, match="can require gradients"):
        fsdp.shard(TrainStep(apply_lora(load_base_model(untied_model_dir), r=8)), "cpu")
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.11.0+cu130"))
    model = apply_lora(load_base_model(untied_model_dir), r=8)
    before, _ = forward_loss(model, batch)
    after, _ = fsdp.shard(TrainStep(model), "cpu")(**batch)
    assert after.item() == before.item()
    fp32 = dataclasses.replace(fsdp.mixed_precision(), param_dtype=torch.float32)  # the policy before, on the CPU
    monkeypatch.setattr(fsdp, "mixed_precision", lambda: fp32)
    cast_step = fsdp.shard(TrainStep(apply_lora(load_base_model(untied_model_dir), r=8)), "cpu")
    with pytest.raises(RuntimeError, match="is invalid for input of size"):  # 4 fp32 bytes per byte: no reshape
        cast_step(**batch)
    with pytest.raises(RuntimeError, match="can require gradients"):
        torch.nn.Parameter(torch.zeros(2, dtype=torch.uint8))


def test_clipping_scales_alike_however_the_gradients_are_split():
    """qlora.training.clip_gradients: the norm torch's clip_grad_norm_ computes (1e-5: torch sums in fp32, here
    3e-6 off the fp64 sum), and the same clipped values bit for bit whether each gradient is whole or split in parts
    (as FSDP's shards: each rank sums its parts' squares, one all-reduce adds them); 0 measures without clipping; a
    non-finite gradient gives a non-finite norm."""
    from qlora.training import clip_gradients

    def params(tensors):
        out = [torch.nn.Parameter(torch.empty_like(t)) for t in tensors]
        for p, t in zip(out, tensors):
            p.grad = t.clone()
        return out

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-4, 0, generator=gen)
             for n in (4096, 1000, 333, 65536)]
    whole, split = params(grads), params([part for g in grads for part in g.tensor_split(2)])
    reference = params(grads)
    torch_norm = float(torch.nn.utils.clip_grad_norm_(reference, 0.3))
    norm_whole, norm_split = clip_gradients(whole, 0.3), clip_gradients(split, 0.3)
    assert norm_whole > 0.3 and norm_whole == pytest.approx(torch_norm, rel=1e-5)
    assert norm_split == pytest.approx(norm_whole, rel=1e-12)
    assert torch.equal(torch.cat([p.grad for p in whole]), torch.cat([p.grad for p in split]))
    assert torch.allclose(torch.cat([p.grad for p in whole]), torch.cat([p.grad for p in reference]), rtol=1e-5)
    unclipped = params(grads)
    assert clip_gradients(unclipped, 0) == pytest.approx(norm_whole, rel=1e-12)
    assert all(torch.equal(p.grad, g) for p, g in zip(unclipped, grads))
    broken = params([torch.tensor([1.0, float("nan")])])
    assert not math.isfinite(clip_gradients(broken, 0.3))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_shard_refuses_4bit_weights_stored_in_a_float_dtype(one_process_group, untied_model_dir, storage):
    """FSDP would gather them as float values: on the GPU its copies rewrote the byte pairs that read as NaN."""
    model = apply_lora(load_base_model(untied_model_dir, quant_storage=storage), r=8)
    with pytest.raises(UserError, match=f"stored as {storage}: .*quant_storage=torch.uint8"):
        fsdp.shard(TrainStep(model), "cpu")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_float_storage_keeps_the_same_bytes_and_loss(untied_model_dir, fsdp_rows, storage):
    batch = two_rows(fsdp_rows)
    as_bytes = load_base_model(untied_model_dir)
    as_float = load_base_model(untied_model_dir, quant_storage=storage)
    w8 = as_bytes.model.layers[0].mlp.down_proj.weight
    wf = as_float.model.layers[0].mlp.down_proj.weight
    assert w8.dtype == torch.uint8 and wf.dtype == storage
    assert torch.equal(wf.view(torch.uint8).flatten(), w8.flatten())
    loss8, _ = forward_loss(apply_lora(as_bytes, r=8), batch)
    lossf, _ = forward_loss(apply_lora(as_float, r=8), batch)
    assert float(loss8) == float(lossf)


def test_lm_head_stays_whole_and_the_rest_is_sharded(one_process_group, untied_model_dir,
                                                                     tiny_model_dir, fsdp_rows, caplog):
    """The lm_head stays a plain whole weight on every process (needed whole at the peak, where sharded it would be
    gathered through a buffer and a copy of its whole size; the loss uses it by its weight, so no FSDP hook would
    gather it); the input embeddings, the blocks and the final norm are sharded; FSDP finds every unit's forward
    complete (no "did not run forward before backward"). shard_embeddings=False keeps the input embeddings whole
    (the comparison the GPU bench measures); tied embeddings stay whole either way."""
    import logging

    from torch.distributed.tensor import DTensor

    batch = two_rows(fsdp_rows)
    for shard_embeddings in (True, False):
        model = apply_lora(load_base_model(untied_model_dir), r=8)
        step = fsdp.shard(TrainStep(model), "cpu", shard_embeddings=shard_embeddings)
        base = model.get_base_model()
        assert not isinstance(base.lm_head.weight, DTensor)
        assert isinstance(base.model.embed_tokens.weight, DTensor) == shard_embeddings
        for sharded in (base.model.norm.weight, base.model.layers[0].mlp.down_proj.lora_A.default.weight,
                        base.model.layers[1].mlp.down_proj.base_layer.weight):
            assert isinstance(sharded, DTensor)
        with caplog.at_level(logging.WARNING, logger="torch.distributed.fsdp.fully_shard"):
            for _ in range(2):
                loss, _ = step(**batch)
                loss.backward()
        assert base.lm_head.weight.grad is None and base.model.embed_tokens.weight.grad is None
        assert "did not run forward" not in caplog.text

    tied = apply_lora(load_base_model(tiny_model_dir), r=8)
    tied_step = fsdp.shard(TrainStep(tied), "cpu", shard_embeddings=True)
    tied_step(**two_rows(fsdp_rows))
    assert not isinstance(tied.get_base_model().lm_head.weight, DTensor)


def test_gather_lora_state_undoes_uneven_dim0_shards(tmp_path):
    """FSDP2 shards dim 0 as torch.chunk does (5 rows over 2 ranks: 3 and 2; 1 row: 1 and none): gather_lora_state
    pads, gathers with c10d and trims back to the whole weights, on rank 0 only, in CPU memory (2 gloo processes)."""
    script = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["ROOT"])
from torch.distributed.fsdp import fully_shard
from qlora.fsdp import gather_lora_state
dist.init_process_group("gloo")
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1), torch.nn.Linear(1, 7, bias=False))
m[2].weight.requires_grad_(False)
want = {k: v.clone() for k, v in m.state_dict().items()}
fully_shard(m[0]); fully_shard(m[1]); fully_shard(m)
got = gather_lora_state(m)
if dist.get_rank() == 0:
    assert sorted(got) == ["0.bias", "0.weight", "1.bias", "1.weight"], sorted(got)
    for k, v in got.items():
        assert v.device.type == "cpu" and torch.equal(v, want[k]), k
    print("GATHERED", {k: tuple(v.shape) for k, v in sorted(got.items())})
else:
    assert got == {}
sys.stdout.flush()
dist.barrier()
os._exit(0)  # gloo's teardown at interpreter exit aborted now and then (torch 2.13, CPU), after the check had passed
"""
    (tmp_path / "gather.py").write_text(script)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "gather.py")], cwd=ROOT, env={**os.environ, "ROOT": str(ROOT),
                                                                        "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GATHERED {'0.bias': (5,), '0.weight': (5, 3), '1.bias': (1,), '1.weight': (1, 5)}" in proc.stdout


def test_two_ranks_gather_the_4bit_bytes_bit_for_bit(tmp_path, untied_model_dir, fsdp_rows):
    """bf16 compute on the CPU (the GPU's dtype): every weight 2 FSDP ranks gather for their first forward equals, bit
    for bit, the weight before sharding, and the first 2 steps' losses equal one process's with grad-accum 2 on the
    same rows (tests/fsdp_driver.py --check-gathered). The GPU bench runs the same check on cuda:0."""
    driver = [str(ROOT / "tests" / "fsdp_driver.py"), "--model", str(untied_model_dir), "--data", str(fsdp_rows),
              "--steps", "2", "--compute-dtype", "bf16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    for cmd in ([sys.executable, *driver, "--out", str(one), "--grad-accum", "2"],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *driver,
                 "--out", str(two), "--check-gathered"]):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "result.json").read_text()) for d in (one, two))
    for counts in b["gathered_mismatches_per_rank"]:
        assert len(counts) > 20 and not any(counts.values()), counts  # the embeddings, and every block's weights
    assert a["losses"] == b["losses"]
    assert [a["micro_losses_per_rank"][0]["1"]] == [[r["1"][0] for r in b["micro_losses_per_rank"]]]


def test_shard_optimizer_steps_each_ranks_own_shards(one_process_group):
    """bitsandbytes' 8-bit AdamW on the local shards takes the same step as on the plain tensors; its gradients are
    gone after the step (control: handed the DTensors themselves, it refuses them)."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    sharded = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    sharded.load_state_dict(reference.state_dict())
    for layer in sharded:
        fully_shard(layer)
    fully_shard(sharded)
    build = lambda params: bnb.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=256)  # noqa: E731
    ref_opt, opt = build(list(reference.parameters())), fsdp.shard_optimizer(list(sharded.parameters()), build)
    x = torch.randn(8, 64)
    for _ in range(3):
        reference(x).square().sum().backward()
        sharded(x).square().sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
        assert all(p.grad is None for p in sharded.parameters())
    for a, b in zip(reference.parameters(), sharded.parameters()):
        assert torch.equal(a.detach(), b.detach().full_tensor())
    assert sum(s["state1"].dtype == torch.uint8 for s in opt.state.values()) == 2  # the weights took the 8-bit path

    naive = build(list(sharded.parameters()))
    sharded(x).sum().backward()
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        naive.step()


def test_evaluation_runs_as_many_forwards_on_every_rank(untied_model_dir, fsdp_rows):
    """5 validation micro-batches over 2 ranks: both run 3 forwards, and the filler adds no loss and no label."""
    import math

    from qlora.data import PackedShards, eval_micro_batches
    from qlora.shards import read_shard_metadata

    rows = PackedShards(fsdp_rows, "train", read_shard_metadata(fsdp_rows))
    mine = [list(eval_micro_batches(rows, 2, rank, 2, max_rows=10)) for rank in (0, 1)]
    assert [len(b) for b in mine] == [3, 2]  # dealt round-robin: rank 1 is one short
    per_rank = math.ceil(5 / 2)
    padded = [fsdp.even_eval_batches(b, per_rank, filler=mine[0][0]) for b in mine]
    assert [len(b) for b in padded] == [3, 3]
    model = apply_lora(load_base_model(untied_model_dir), r=8)
    with torch.no_grad():
        loss, n = forward_loss(model, {k: torch.from_numpy(v) for k, v in padded[1][-1].items()})
    assert loss.item() == 0.0 and int(n) == 0


# ----------------------------------------------------------------------------------------------- checkpoints (fast)
def fake_checkpoint(path: Path, **state) -> Path:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": 3, **state}))
    return path


def test_resume_refuses_the_other_parallelism_and_another_world_size(tmp_path):
    ddp = fake_checkpoint(tmp_path / "ddp" / "step-0000003", world_size=2)  # DDP checkpoints record no parallelism
    sharded = fake_checkpoint(tmp_path / "fsdp" / "step-0000003", world_size=2, parallelism="fsdp")
    check_resume_parallelism(ddp, "ddp")
    check_resume_parallelism(sharded, "fsdp")
    with pytest.raises(UserError, match="written under DDP.*--parallelism ddp"):
        check_resume_parallelism(ddp, "fsdp")
    with pytest.raises(UserError, match="written under FSDP.*--parallelism fsdp"):
        check_resume_parallelism(sharded, "ddp")
    with pytest.raises(UserError, match="written by 2 FSDP processes, this run has 4.*--nproc_per_node 2"):
        load_sharded_checkpoint(sharded, peft_model=None, optimizer=None, scheduler=None, rank=0, world_size=4)


# ----------------------------------------------------------------------------------------------- estimate (fast)
def test_70b_on_four_40gb_gpus_is_planned_under_fsdp():
    budget = 0.9 * 40 * GiB
    assert choose_parallelism("auto", LLAMA3_70B_CONFIG, world_size=4, budget_bytes=budget) == "fsdp"
    assert choose_parallelism("auto", LLAMA3_8B_CONFIG, world_size=4, budget_bytes=budget) == "ddp"  # fits: faster
    assert choose_parallelism("auto", LLAMA3_70B_CONFIG, world_size=1, budget_bytes=budget) == "ddp"  # nothing to shard
    assert choose_parallelism("ddp", LLAMA3_70B_CONFIG, world_size=4, budget_bytes=budget) == "ddp"
    assert choose_parallelism("fsdp", LLAMA3_8B_CONFIG, world_size=4, budget_bytes=budget) == "fsdp"
    with pytest.raises(UserError, match="--parallelism zero3: choose one of auto, ddp, fsdp"):
        choose_parallelism("zero3", LLAMA3_8B_CONFIG, world_size=4, budget_bytes=budget)

    n = choose_checkpoint_layers(LLAMA3_70B_CONFIG, budget, seq_len=8192, world_size=4, parallelism="fsdp")
    assert n is not None and 0 < n < 80  # some blocks keep their activations
    est = estimate_memory(LLAMA3_70B_CONFIG, seq_len=8192, world_size=4, parallelism="fsdp", checkpoint_layers=n)
    assert est.trainable_params == 828_375_040
    assert est.total_bytes <= budget < estimate_memory(LLAMA3_70B_CONFIG, seq_len=8192, world_size=4, parallelism="fsdp",
                                                       checkpoint_layers=n - 1).total_bytes
    assert est.total_bytes < est.load_bytes < 40 * GiB  # loading the whole 4-bit model is the tighter moment
    table = est.table(40)
    print(table)
    for text in ("FSDP over 4 processes", "828,375,040", f"{n}/80 blocks checkpointed", "1/4 shard",
                 "while loading, before sharding", "=> fits a 40 GiB GPU"):
        assert text in table
    ddp = estimate_memory(LLAMA3_70B_CONFIG, seq_len=8192, world_size=4, checkpoint_layers=-1)
    assert not ddp.fits(40 * GiB) and "DOES NOT FIT" in ddp.table(40)


def test_fsdp_divides_what_it_shards_and_nothing_else():
    def rows(world, parallelism="fsdp"):
        est = estimate_memory(LLAMA3_70B_CONFIG, world_size=world, parallelism=parallelism, checkpoint_layers=-1)
        return {name.strip(): b for name, b, _, _ in est.rows}, est

    one, _ = rows(1, "ddp")
    four, est4 = rows(4)
    for name in ("4-bit NF4 base (7 projections x blocks)", "LoRA weights (fp32 masters)", "LoRA gradients (fp32)",
                 "optimizer state (paged_adamw_8bit)"):
        assert four[name] == pytest.approx(one[name] / 4, abs=1)
    # the input embeddings are sharded, the lm_head is not (needed whole at the peak: qlora/fsdp.py)
    assert four["lm_head (unquantised)"] == four["input embeddings (unquantised)"] * 4
    assert four["lm_head (unquantised)"] * 2 == one["embeddings + lm_head (unquantised)"]
    assert four["FSDP: reserved, not allocated"] == 2 * four["lm_head (unquantised)"]  # measured (bench/RESULTS.md)
    assert four["quantisation constants"] == one["quantisation constants"]  # bitsandbytes keeps them on every rank
    assert "DDP gradient buckets" not in four
    eight = rows(8)[1]
    assert eight.total_bytes < est4.total_bytes < rows(2)[1].total_bytes
    assert estimate_memory(LLAMA3_70B_CONFIG, checkpoint_layers=-1).load_bytes == 0  # DDP: no separate load moment


# ----------------------------------------------------------------------------------------------- finetune.py
def test_estimate_memory_plans_llama3_70b_on_four_40gb_gpus_under_fsdp(tmp_path, capsys):
    """finetune.py --estimate-memory for a Llama-3-70B config.json (no weights needed) with --nproc 4 --gpu-memory-gib
    40: FSDP chosen, the per-GPU table, the checkpointed blocks chosen, the trainable count (control: forced DDP does
    not fit and exits 1 naming --parallelism fsdp)."""
    import re

    import finetune

    model = tmp_path / "llama3-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_70B_CONFIG))
    flags = ["--estimate-memory", "--model", str(model), "--nproc", "4", "--gpu-memory-gib", "40"]
    assert finetune.main(flags) == 0
    out = capsys.readouterr().out
    print(out)
    assert "--parallelism auto chose FSDP for 4 processes" in out
    assert "per process, FSDP over 4 processes (each holds 1/4)" in out
    assert "trainable parameters: 828,375,040" in out
    n = int(re.search(r"(\d+)/80 blocks checkpointed", out).group(1))
    assert 0 < n < 80 and "=> fits a 40 GiB GPU" in out
    assert finetune.main([*flags, "--parallelism", "ddp"]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "--parallelism fsdp" in captured.err


def torchrun_finetune(*args, ranks: int | None = 2, background: bool = False):
    """finetune.py under torchrun with `ranks` processes (None: plain python, one process), one thread each."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks else []
    cmd = [sys.executable, *launcher, str(ROOT / "finetune.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (torchrun starts each worker in a session of its own: killing torchrun's process group
    would leave the workers training)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [pid] + [p for c in children for p in process_tree(c)]


def wait_for_step(run: Path, step: int, proc) -> None:
    from run_metrics import train_losses

    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if (run / "metrics.jsonl").exists() and step in train_losses(run):
                return
        except ValueError:  # a line half-written as we read
            pass
        time.sleep(0.02)
    raise AssertionError(f"step {step} never logged (exit status {proc.poll()})")


@pytest.fixture(scope="module")
def task(tmp_path_factory, untied_model_dir):
    from shard_fixtures import pretokenized_task

    return pretokenized_task(tmp_path_factory.mktemp("fsdp_task"), untied_model_dir, n_train=48, n_val=8, max_len=64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, untied_model_dir, task):
    """5 steps of 2 rows, the default recipe (8-bit paged AdamW, gradients clipped to 0.3): 2 FSDP ranks of one row
    each; one process with grad-accum 2 (the same rows), with one thread as each torchrun rank has (the CPU's kernels
    sum in another order with two); a control, one process with one row a step (other rows). The same pair again
    without clipping. Validation over 3 rows: one rank evaluates one fewer."""
    import finetune

    tmp = tmp_path_factory.mktemp("fsdp_runs")
    common = ["--model", untied_model_dir, "--data", task, "--micro-batch-size", 1, "--max-steps", 5,
              "--save-every", 2, "--eval-every", 5, "--eval-max-rows", 3, "--lr", "5e-3", "--seed", 0,
              "--device", "cpu"]
    for suffix, extra in (("", []), ("_unclipped", ["--max-grad-norm", 0])):
        torchrun_finetune(*common, *extra, "--output-dir", tmp / f"fsdp{suffix}", "--parallelism", "fsdp",
                          "--grad-accum", 1)
        torchrun_finetune(*common, *extra, "--output-dir", tmp / f"single{suffix}", "--grad-accum", 2, ranks=None)
    assert finetune.main([*map(str, common), "--output-dir", str(tmp / "control"), "--grad-accum", "1"]) == 0
    names = ("fsdp", "single", "fsdp_unclipped", "single_unclipped", "control")
    return {"common": common, **{name: tmp / name for name in names}}


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # 2 blocks x 7 projections x (A, B)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("clipped", [True, False], ids=["clipped", "unclipped"])
def test_two_fsdp_ranks_match_one_process_with_the_same_rows(runs, clipped):
    """Per-step losses, the validation loss and the adapter bit for bit (the issue asks for 1e-5): fp32 compute on
    the CPU, one thread on both sides; the loss scale world/labels and FSDP's average cancel exactly; the 8-bit
    optimizer's blocks align with the shards and it keeps 8-bit state for every shard of a tensor it would keep in
    8 bits whole; the clipping norm is summed in fp64 (qlora.training.clip_gradients). With torch's clip_grad_norm_,
    which sums a sharded gradient's norm shard by shard, the norms differed in the last bit and the adapters by 8.8e-5
    (measured, 2026-12-07), and two threads in the one process gave losses 4.8e-8 apart. Control: other rows give
    other losses and an adapter 2e-2 or more away (measured 3.5e-2)."""
    from run_metrics import metric_records, train_losses

    suffix = "" if clipped else "_unclipped"
    fsdp_run, single = runs[f"fsdp{suffix}"], runs[f"single{suffix}"]
    resolved = json.loads((fsdp_run / "config.json").read_text())["resolved"]
    assert resolved["parallelism"] == "fsdp" and resolved["world_size"] == 2 and resolved["rows_per_step"] == 2
    assert json.loads((single / "config.json").read_text())["resolved"]["world_size"] == 1
    sharded, one = train_losses(fsdp_run), train_losses(single)
    assert sorted(sharded) == sorted(one) == [1, 2, 3, 4, 5]
    assert sharded == one
    val_fsdp, val_one = metric_records(fsdp_run, "val_loss")[5], metric_records(single, "val_loss")[5]
    assert val_fsdp["val_label_tokens"] == val_one["val_label_tokens"] > 0
    assert val_fsdp["val_loss"] == val_one["val_loss"]
    a, b = adapter(single), adapter(fsdp_run)
    assert max_abs_difference(a, b) == 0
    control, c = train_losses(runs["control"]), adapter(runs["control"])
    control_diff = max_abs_difference(c, adapter(runs["single"]))
    print(f"control (other rows): max |LoRA weight difference| {control_diff:.3g}")
    assert all(abs(control[s] - one[s]) / abs(one[s]) > 1e-3 for s in (2, 3, 4, 5)) and control_diff > 2e-2


@pytest.mark.slow
def test_sharded_checkpoints_hold_each_ranks_part(runs, tmp_path):
    import shutil

    from qlora.checkpoint import checkpoint_damage

    ckpt = runs["fsdp"] / "checkpoints" / "step-0000004"
    for name in ("lora/.metadata", "optimizer/rank-00000.pt", "optimizer/rank-00001.pt",
                 "adapter/adapter_model.safetensors", "scheduler.pt", "rng_states.pt"):
        assert (ckpt / name).is_file(), name
    # the manifest covers every rank's files: a damaged shard is found as a DDP checkpoint's file is
    assert "optimizer/rank-00001.pt" in json.loads((ckpt / "manifest.json").read_text())["files"]
    assert checkpoint_damage(ckpt) is None
    damaged = shutil.copytree(ckpt, tmp_path / "step-0000004")
    with open(damaged / "optimizer" / "rank-00001.pt", "r+b") as f:
        f.truncate(10)
    assert checkpoint_damage(damaged).startswith("optimizer/rank-00001.pt has 10 bytes, ")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["parallelism"] == "fsdp" and state["world_size"] == 2 and state["rows_consumed"] == 8
    assert not list((runs["fsdp"] / "checkpoints").glob(".*"))  # no temporary directory left


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["stop_file", "kill_9"])
def test_interrupted_fsdp_run_resumes_with_identical_losses(runs, tmp_path, interruption):
    """Stopped by RUN/stop_requested (a checkpoint at the next step boundary, exit 0, status "stopped"; no periodic
    checkpoint to fall back on) or killed with SIGKILL mid-training (back to the step-2 checkpoint): the same command
    again (--resume auto) finishes with the uninterrupted run's losses, bit for bit (control: neighbouring steps
    differ), and its adapter."""
    from run_metrics import train_losses

    run = tmp_path / "run"
    args = [*runs["common"], "--output-dir", run, "--parallelism", "fsdp", "--grad-accum", 1]
    if interruption == "stop_file":
        args += ["--save-every", 100]  # after the common --save-every 2: only the stop writes a checkpoint
    proc = torchrun_finetune(*args, background=True)
    wait_for_step(run, 2 if interruption == "stop_file" else 3, proc)
    if interruption == "stop_file":
        (run / "stop_requested").touch()
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "stopped" and 2 <= status["step"] < 5
    else:  # every process at once, as when a node fails
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert json.loads((run / "status.json").read_text())["state"] == "running"  # no chance to say otherwise
    stopped_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    torchrun_finetune(*args)
    resumed_from = json.loads((run / "config.json").read_text())["resumed_from"]
    assert resumed_from.endswith(f"step-{stopped_at:07d}") and stopped_at < 5
    reference, resumed = train_losses(runs["fsdp"]), train_losses(run)
    assert resumed == reference
    assert_steps_differ = [reference[s] != reference[s + 1] for s in range(1, 5)]
    assert all(assert_steps_differ)
    a, b = adapter(runs["fsdp"]), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_adapter_loads_in_plain_peft_and_predict(runs, untied_model_dir, capsys):
    """RUN/adapter of the FSDP run is one adapter_model.safetensors that plain peft loads with the trained weights,
    and predict.py samples from it (the run directory supplies the format)."""
    from peft import PeftModel

    import predict

    run = runs["fsdp"]
    assert sorted(p.name for p in (run / "adapter").glob("adapter_model*")) == ["adapter_model.safetensors"]
    saved = adapter(run)
    model = PeftModel.from_pretrained(load_base_model(untied_model_dir), str(run / "adapter"))
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k].detach(), saved[k]) for k in saved)
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)  # trained, not the zero init
    assert predict.main(["--model", str(untied_model_dir), "--adapter", str(run), "--prompt", "C4 D4",
                         "--max-new-tokens", "3"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prompt"] == "C4 D4" and row["format"] == "plain" and row["completion"] is not None


@pytest.mark.slow
def test_resuming_under_the_other_parallelism_is_refused(runs, capsys):
    import finetune

    with pytest.raises(UserError, match="written under FSDP, this run uses DDP: resume it with --parallelism fsdp"):
        finetune.main([*map(str, runs["common"]), "--output-dir", str(runs["fsdp"]), "--max-steps", "6"])
