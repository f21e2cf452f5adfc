"""qlora/fsdp.py (QLoRA under torch's FSDP2), its sharded checkpoints (qlora/checkpoint.py) and its memory estimate.

CPU and gloo throughout. The fast tests shard in this process over a group of one: FSDP2 still swaps every parameter
for a sharded DTensor and, while a block runs, a gathered plain tensor, which is what drops bitsandbytes' quant
state. The slow ones run tests/fsdp_driver.py under torchrun with 2 processes against one process on the same rows.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
DRIVER = ROOT / "tests" / "fsdp_driver.py"


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


# The 4-bit bytes stored in the compute dtype, as qlora.fsdp.shard needs: fp32 on the CPU.
SHARDABLE = dict(quant_storage=torch.float32)


def two_rows(data_dir) -> dict:
    from qlora.data import PackedShards, read_metadata

    rows = PackedShards(data_dir, "train", read_metadata(data_dir))
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
    the 4-bit bytes stored in fp32 pass uncast), and each gathered 4-bit weight carries its quant state (control:
    plain fully_shard drops it; qlora/speed.py's fused MLP would then quietly fall back to the unfused path)."""
    from torch.distributed.fsdp import fully_shard

    batch = two_rows(fsdp_rows)
    model = apply_lora(load_base_model(untied_model_dir, **SHARDABLE), r=8)
    before, _ = forward_loss(model, batch)
    seen = quant_state_seen_by_mlps(model)
    step = fsdp.shard(TrainStep(model), "cpu")
    weight = model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
    assert type(weight).__name__ == "DTensor"  # sharded: the Params4bit and its quant state are gone from it
    after, _ = step(**batch)
    assert after.item() == before.item()
    assert seen == [True, True]

    plain = apply_lora(load_base_model(untied_model_dir, **SHARDABLE), r=8)
    seen = quant_state_seen_by_mlps(plain)
    plain_step = TrainStep(plain)
    for layer in plain.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(plain_step)
    plain_step(**batch)
    assert seen == [False, False]


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_shard_refuses_4bit_weights_stored_in_another_dtype_than_the_compute(one_process_group, untied_model_dir,
                                                                            storage):
    """uint8: FSDP would gather it as bytes beside fp32 weights; bf16 under fp32 compute: the gather would cast it."""
    model = apply_lora(load_base_model(untied_model_dir, quant_storage=storage), r=8)
    with pytest.raises(UserError, match=f"stored as {storage} under torch.float32 compute.*quant_storage=compute_dtype"):
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


def test_lm_head_is_gathered_for_the_loss_alone(one_process_group, untied_model_dir, tiny_model_dir, fsdp_rows,
                                                caplog):
    """forward_loss uses the lm_head by its weight and never calls it: its own unit is gathered when the final norm
    has run and released when the step's forward ends, and FSDP finds every unit's forward complete (no "did not run
    forward before backward"). Tied embeddings stay in the root unit (control: gathered through the whole step)."""
    import logging

    from torch.distributed.tensor import DTensor

    batch = two_rows(fsdp_rows)
    model = apply_lora(load_base_model(untied_model_dir, **SHARDABLE), r=8)
    step = fsdp.shard(TrainStep(model), "cpu")
    head = model.get_base_model().lm_head
    gathered_in_loss = []
    norm = model.get_base_model().model.norm
    norm.register_forward_hook(lambda *_: gathered_in_loss.append(not isinstance(head.weight, DTensor)), prepend=False)
    with caplog.at_level(logging.WARNING, logger="torch.distributed.fsdp.fully_shard"):
        for _ in range(2):
            loss, _ = step(**batch)
            assert isinstance(head.weight, DTensor)  # released once the loss is computed
            loss.backward()
    assert gathered_in_loss == [True, True]
    assert "did not run forward" not in caplog.text

    tied = apply_lora(load_base_model(tiny_model_dir, **SHARDABLE), r=8)
    tied_step = fsdp.shard(TrainStep(tied), "cpu")
    tied_step(**two_rows(fsdp_rows))
    assert not isinstance(tied.get_base_model().lm_head.weight, DTensor)


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

    from qlora.data import PackedShards, eval_micro_batches, read_metadata

    rows = PackedShards(fsdp_rows, "train", read_metadata(fsdp_rows))
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
    for name in ("4-bit NF4 base (7 projections x blocks)", "embeddings + lm_head (unquantised)",
                 "LoRA weights (fp32 masters)", "LoRA gradients (fp32)", "optimizer state (paged_adamw_8bit)"):
        assert four[name] == pytest.approx(one[name] / 4, abs=1)
    assert four["quantisation constants"] == one["quantisation constants"]  # bitsandbytes keeps them on every rank
    assert "DDP gradient buckets" not in four
    eight = rows(8)[1]
    assert eight.total_bytes < est4.total_bytes < rows(2)[1].total_bytes
    assert estimate_memory(LLAMA3_70B_CONFIG, checkpoint_layers=-1).load_bytes == 0  # DDP: no separate load moment


# ----------------------------------------------------------------------------------------------- 2 ranks (slow)
def run_driver(out: Path, model, data, *args, ranks: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(DRIVER), "--model", str(model), "--data", str(data), "--out", str(out),
                           *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    return {int(k): v for k, v in result["losses"].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, untied_model_dir, fsdp_rows):
    """5 optimizer steps of 2 rows each: one process with grad-accum 2; 2 FSDP ranks of one row each (checkpoint at
    step 3); the same 2 ranks resumed from that checkpoint; and a control: one process, one row a step."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    common = (untied_model_dir, fsdp_rows, "--steps", 5)
    return {
        "single": (tmp / "single", run_driver(tmp / "single", *common, "--grad-accum", 2)),
        "fsdp": (tmp / "fsdp", run_driver(tmp / "fsdp", *common, "--save-at", 3, ranks=2)),
        "resumed": (tmp / "resumed", run_driver(tmp / "resumed", *common, "--resume",
                                                tmp / "fsdp" / "checkpoints" / "step-0000003", ranks=2)),
        "control": (tmp / "control", run_driver(tmp / "control", *common, "--grad-accum", 1)),
    }


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_fsdp_ranks_match_one_process_with_the_same_rows(runs):
    """Per-step losses within 1e-5 relative, LoRA weights within 1e-6 (measured: identical, bit for bit: the loss
    scale world/labels and FSDP's average cancel exactly, and the 8-bit optimizer's blocks align with the shards)."""
    (single_dir, single), (fsdp_dir, sharded) = runs["single"], runs["fsdp"]
    assert sorted(single) == sorted(sharded) == [1, 2, 3, 4, 5]
    worst = max(abs(sharded[s] - single[s]) / abs(single[s]) for s in single)
    print(f"2 FSDP ranks vs 1 process: max relative loss difference over 5 steps {worst:.3g}")
    assert worst <= 1e-5
    a, b = adapter(single_dir), adapter(fsdp_dir)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # 2 blocks x 7 projections x (A, B)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |LoRA weight difference| {diff:.3g} (largest weight {max(float(t.abs().max()) for t in a.values()):.3g})")
    assert diff <= 1e-6
    control_dir, control = runs["control"]
    assert all(abs(control[s] - single[s]) > 1e-4 for s in (2, 3, 4, 5))
    c = adapter(control_dir)
    assert max(float((c[k] - b[k]).abs().max()) for k in c) > 1e-3  # other rows: a clearly different adapter


@pytest.mark.slow
def test_resuming_a_sharded_checkpoint_continues_identically(runs):
    (fsdp_dir, sharded), (resumed_dir, resumed) = runs["fsdp"], runs["resumed"]
    ckpt = fsdp_dir / "checkpoints" / "step-0000003"
    for name in ("lora/.metadata", "optimizer/rank-00000.pt", "optimizer/rank-00001.pt",
                 "adapter/adapter_model.safetensors", "scheduler.pt", "rng_states.pt"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["parallelism"] == "fsdp" and state["world_size"] == 2 and state["rows_consumed"] == 6
    assert not list((fsdp_dir / "checkpoints").glob(".*"))  # no temporary directory left
    assert sorted(resumed) == [4, 5]
    assert [resumed[s] for s in (4, 5)] == [sharded[s] for s in (4, 5)]
    a, b = adapter(fsdp_dir), adapter(resumed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_gathered_adapter_loads_with_plain_peft_and_predict(runs, tiny_model_dir):
    from peft import PeftModel

    import predict

    fsdp_dir, _ = runs["fsdp"]
    saved = adapter(fsdp_dir)
    base = load_base_model(tiny_model_dir)
    predict.check_adapter_fits(base, fsdp_dir / "adapter")
    model = PeftModel.from_pretrained(base, str(fsdp_dir / "adapter"))
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k].detach(), saved[k]) for k in saved)
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)  # trained, not the zero init
