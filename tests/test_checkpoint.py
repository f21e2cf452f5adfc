"""qlora/checkpoint.py and the data position (qlora/data.py): exact save/restore, last-K, atomic listing,
fingerprint refusal, adapter round trip through plain peft, and the seeded per-rank row order."""
from __future__ import annotations

import json

import pytest
import torch

from qlora.checkpoint import capture_rng, check_fingerprint, load_checkpoint, save_checkpoint
from qlora.config import TrainConfig
from qlora.data import PackedShards, StreamOrder, step_micro_batches
from qlora.shards import read_shard_metadata
from qlora.errors import UserError
from qlora.model import apply_lora, forward_loss, load_base_model
from qlora.rundir import list_checkpoints
from qlora.training import lr_lambda, make_optimizer
from shard_fixtures import random_rows, write_rows


def lora_setup(model_dir, seed=0):
    model = apply_lora(load_base_model(model_dir), r=8, alpha=16, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainConfig(lr=1e-2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(2, 10, 0.1))
    return model, params, optimizer, scheduler


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory, tiny_model_dir):
    # 21 rows in row groups of 4 (5 full groups + 1 of 1) over two shards of 12 and 9 rows
    return write_rows(tmp_path_factory.mktemp("rows") / "tok", tiny_model_dir, 32,
                      random_rows(tiny_model_dir, 21, 32, seed=5), random_rows(tiny_model_dir, 3, 32, seed=6),
                      row_group_rows=4, rows_per_shard=12)


def test_checkpoint_restores_weights_optimizer_scheduler_and_rng_exactly(tiny_model_dir, rows_dir, tmp_path):
    shards = PackedShards(rows_dir, "train", read_shard_metadata(rows_dir))
    batch = {k: torch.from_numpy(v) for k, v in shards.rows([(0, 0), (0, 1)]).items()}
    model, params, optimizer, scheduler = lora_setup(tiny_model_dir)
    for _ in range(2):
        loss, n = forward_loss(model, batch)
        (loss / n).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 2, peft_model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"rows_consumed": 8, "tokens_seen": 256, "fingerprint": "f"},
                           rng_states=[capture_rng()], keep=2)
    expected_rand = torch.rand(3)
    # one more step on the original; the restored copy must take exactly the same step
    loss, n = forward_loss(model, batch)
    (loss / n).backward()
    optimizer.step()
    scheduler.step()

    model2, params2, optimizer2, scheduler2 = lora_setup(tiny_model_dir, seed=99)  # different init
    assert not all(torch.equal(a, b) for a, b in zip(params, params2))  # control: only the restore makes them equal
    state = load_checkpoint(path, peft_model=model2, optimizer=optimizer2, scheduler=scheduler2, rank=0)
    assert state["step"] == 2 and state["rows_consumed"] == 8
    assert torch.equal(torch.rand(3), expected_rand)  # RNG restored
    assert scheduler2.last_epoch == 2 and scheduler2.get_last_lr() == pytest.approx(
        [1e-2 * lr_lambda(2, 10, 0.1)(2)])
    loss2, n2 = forward_loss(model2, batch)
    (loss2 / n2).backward()
    optimizer2.step()
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


def test_last_k_kept_and_incomplete_directories_ignored(tiny_model_dir, tmp_path):
    model, params, optimizer, scheduler = lora_setup(tiny_model_dir)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, peft_model=model, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"rows_consumed": step}, rng_states=[capture_rng()], keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    # a save killed half-way leaves a hidden temp dir, or (never via atomic_dir) a dir without trainer_state.json
    (tmp_path / "checkpoints" / ".step-0000004.tmp-999").mkdir()
    (tmp_path / "checkpoints" / "step-0000005").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    # an exception while writing leaves no step directory behind
    with pytest.raises(RuntimeError, match="disk full"):
        _failing_save(tmp_path, model, scheduler)
    assert not (tmp_path / "checkpoints" / "step-0000006").exists()
    assert not list((tmp_path / "checkpoints").glob(".step-0000006*"))


def _failing_save(tmp_path, model, scheduler):
    class Broken:
        def state_dict(self):
            raise RuntimeError("disk full")

    save_checkpoint(tmp_path, 6, peft_model=model, optimizer=Broken(), scheduler=scheduler, trainer_state={},
                    rng_states=[], keep=2)


def test_fingerprint_mismatch_names_what_differs(tmp_path):
    d = tmp_path / "step-0000001"
    d.mkdir()
    parts = {"lora": {"lora_r": 64, "lora_alpha": 16}, "data": {"max_len": 64, "train_rows": 10}}
    (d / "trainer_state.json").write_text(json.dumps({"step": 1, "fingerprint": "a", "fingerprint_parts": parts}))
    check_fingerprint(d, "a", parts)
    other = {"lora": {"lora_r": 32, "lora_alpha": 16}, "data": {"max_len": 64, "train_rows": 11}}
    with pytest.raises(UserError, match=r"differs: data\.train_rows, lora\.lora_r\)"):
        check_fingerprint(d, "b", other)


def test_fingerprint_mismatch_names_the_flags_to_restore(tmp_path):
    d = tmp_path / "step-0000001"
    d.mkdir()
    parts = {"lora": {"lora_r": 64, "optimizer": "paged_adamw_8bit"}, "data": {"max_len": 64}}
    (d / "trainer_state.json").write_text(json.dumps({"step": 1, "fingerprint": "a", "fingerprint_parts": parts}))
    with pytest.raises(UserError, match=r"\(differs: lora\.optimizer\); .* restore the original --optimizer flag$"):
        check_fingerprint(d, "b", {"lora": {"lora_r": 64, "optimizer": "adamw_torch"}, "data": {"max_len": 64}})
    with pytest.raises(UserError, match=r"restore the original --data/--lora-r flags$"):
        check_fingerprint(d, "b", {"lora": {"lora_r": 8, "optimizer": "paged_adamw_8bit"}, "data": {"max_len": 32}})


def test_checkpoint_from_before_the_optimizer_was_fingerprinted_still_resumes(tmp_path):
    """Checkpoints written before the optimizer joined the fingerprint lack it: they agree on all they recorded."""
    d = tmp_path / "step-0000001"
    d.mkdir()
    old = {"lora": {"lora_r": 64}, "data": {"max_len": 64}}
    (d / "trainer_state.json").write_text(json.dumps({"step": 1, "fingerprint": "a", "fingerprint_parts": old}))
    check_fingerprint(d, "b", {"lora": {"lora_r": 64, "optimizer": "paged_adamw_8bit"}, "data": {"max_len": 64}})
    with pytest.raises(UserError, match=r"differs: lora\.lora_r\)"):  # what it did record is still checked
        check_fingerprint(d, "b", {"lora": {"lora_r": 8, "optimizer": "paged_adamw_8bit"}, "data": {"max_len": 64}})


def test_adapter_round_trip_through_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model, params, _, _ = lora_setup(tiny_model_dir)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)  # LoRA B starts at zero: make the adapter non-trivial
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base_model(tiny_model_dir), str(tmp_path / "adapter"))
    got = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(got[name].float(), p.float()), name
    ids = torch.tensor([[128000, 1234, 5678, 910, 1112]])
    model.train(), loaded.train()  # same (training) kernels on both
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, base_logits)


# ----------------------------------------------------------------------------------------------- data position
def test_ranks_get_disjoint_rows_covering_the_global_step_independent_of_world_size(rows_dir):
    shards = PackedShards(rows_dir, "train", read_shard_metadata(rows_dir))
    assert len(shards) == 21 and len(shards.groups) == 6
    order = StreamOrder(shards, seed=7)
    epoch0 = order.epoch_order(0)
    assert sorted(epoch0) == sorted((g, r) for g, grp in enumerate(shards.groups) for r in range(grp.num_rows))
    assert epoch0 != order.epoch_order(1) and epoch0 == StreamOrder(shards, seed=7).epoch_order(0)
    # rows of a row group stay together (read one group at a time)
    groups_in_order = [g for g, _ in epoch0]
    assert sum(a != b for a, b in zip(groups_in_order, groups_in_order[1:])) == len(shards.groups) - 1

    def ids_of(batches):
        return [tuple(row) for b in batches for row in b["input_ids"].tolist()]

    # step 3 (rows 24..35 of the stream: crosses into epoch 1), 2 ranks x mb 2 x accum 3 vs 1 rank x mb 3 x accum 4
    two = [ids_of(step_micro_batches(order, 24, 2, 3, rank, 2)) for rank in (0, 1)]
    one = ids_of(step_micro_batches(order, 24, 3, 4, 0, 1))
    assert two[0] + two[1] == one
    assert not set(two[0]) & set(two[1])


def test_shards_are_read_by_row_group_not_whole(rows_dir, monkeypatch):
    shards = PackedShards(rows_dir, "train", read_shard_metadata(rows_dir))
    reads = []
    for pf in shards._files.values():
        original = pf.read_row_group
        monkeypatch.setattr(pf, "read_row_group",
                            lambda i, columns=None, _o=original: reads.append(i) or _o(i, columns=columns))
    batch = shards.rows([(2, 0), (2, 3)])
    assert reads == [2]  # the third row group of the first shard, read alone
    assert batch["input_ids"].shape == (2, 32)
    doc_lens_row = shards._read_group(2)["doc_lens"][0]
    assert batch["position_ids"][0].tolist()[: doc_lens_row[0]] == list(range(doc_lens_row[0]))


# ----------------------------------------------------------------------------------------------- trust and order
def _save(run_dir, step, model, optimizer, scheduler, keep=5, protect=None):
    return save_checkpoint(run_dir, step, peft_model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"rows_consumed": step, "seed": 0}, rng_states=[capture_rng()], keep=keep,
                           protect=protect)


def _steps(run_dir):
    return [s for s, _ in list_checkpoints(run_dir)]


def test_rotation_and_resume_auto_follow_write_order_after_a_rewind(tiny_model_dir, tmp_path):
    """A run with step-4 and step-6 rewound to step-4: resuming moves step-4 to the front of the write order, the
    rewound run's step-5 comes after it, and rotation removes the abandoned step-6 first, never step-4 (by step
    number, the old rotation kept step-6 and deleted step-4 and step-5)."""
    from qlora.checkpoint import checkpoints_by_write_order, mark_resumed, newest_intact_checkpoint

    model, _, optimizer, scheduler = lora_setup(tiny_model_dir)
    step4 = _save(tmp_path, 4, model, optimizer, scheduler)
    _save(tmp_path, 6, model, optimizer, scheduler)
    assert newest_intact_checkpoint(tmp_path, warn=pytest.fail).name == "step-0000006"  # control: before the rewind
    mark_resumed(step4, tmp_path)
    assert newest_intact_checkpoint(tmp_path, warn=pytest.fail) == step4  # a crash now resumes the rewound run
    _save(tmp_path, 5, model, optimizer, scheduler, keep=1, protect=step4)
    assert _steps(tmp_path) == [4, 5]  # keep 1: step-5, written last; step-4 spared as the resume point
    assert [p.name for p in checkpoints_by_write_order(tmp_path)] == ["step-0000004", "step-0000005"]
    assert newest_intact_checkpoint(tmp_path, warn=pytest.fail).name == "step-0000005"
    _save(tmp_path, 6, model, optimizer, scheduler, keep=1)  # a later run (nothing to protect): plain last-K
    assert _steps(tmp_path) == [6]


def test_damaged_checkpoints_are_found_and_passed_over(tiny_model_dir, tmp_path):
    from qlora.checkpoint import checkpoint_damage, newest_intact_checkpoint

    model, _, optimizer, scheduler = lora_setup(tiny_model_dir)
    step2 = _save(tmp_path, 2, model, optimizer, scheduler)
    step4 = _save(tmp_path, 4, model, optimizer, scheduler)
    assert checkpoint_damage(step2) is None and checkpoint_damage(step4) is None
    size = (step4 / "optimizer.pt").stat().st_size
    with open(step4 / "optimizer.pt", "r+b") as f:  # a copy or a disk cut short
        f.truncate(size // 2)
    assert checkpoint_damage(step4) == f"optimizer.pt has {size // 2} bytes, {size} when saved"
    warnings = []
    assert newest_intact_checkpoint(tmp_path, warn=warnings.append) == step2
    assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint {step4} is damaged (optimizer.pt has ")
    # the same size but other bytes: the digest finds it
    weights = step2 / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoint_damage(step2) == "adapter/adapter_model.safetensors differs from what was saved (sha256)"
    with pytest.raises(UserError, match=r"^--resume auto: every checkpoint in \S+ is damaged \(step-0000004: "
                                        r"optimizer.pt has .*; step-0000002: adapter/adapter_model.safetensors "
                                        r"differs .*; move them away to start afresh"):
        newest_intact_checkpoint(tmp_path, warn=warnings.append)
    # a step directory without its state file is reported, not skipped in silence
    (tmp_path / "checkpoints" / "step-0000009").mkdir()
    warnings.clear()
    with pytest.raises(UserError):
        newest_intact_checkpoint(tmp_path, warn=warnings.append)
    assert warnings[0] == (f"{tmp_path / 'checkpoints' / 'step-0000009'} has no trainer_state.json, so it is not a "
                           f"checkpoint (copied in part?); ignored")
    assert checkpoint_damage(tmp_path / "checkpoints" / "step-0000009") == ("no trainer_state.json: not a complete "
                                                                           "checkpoint")


def test_a_checkpoint_from_before_manifests_is_trusted_and_a_damaged_file_is_one_line(tiny_model_dir, tmp_path):
    from qlora.checkpoint import checkpoint_damage

    model, _, optimizer, scheduler = lora_setup(tiny_model_dir)
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    (path / "manifest.json").unlink()
    assert checkpoint_damage(path) is None
    with open(path / "rng_states.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=rf"^checkpoint {path}: cannot read rng_states.pt \(.*\); resume from an older "
                                        r"checkpoint with --resume DIR$"):
        load_checkpoint(path, peft_model=model, optimizer=optimizer, scheduler=scheduler, rank=0)


def test_resumed_optimizer_and_schedule_take_this_runs_settings(tiny_model_dir, tmp_path):
    """A checkpoint's optimizer and scheduler state carry the --lr, --weight-decay and betas it was saved with;
    apply_settings makes this run's values (and its schedule, here a longer cosine) apply from the resumed step."""
    from qlora.training import apply_settings

    model, _, optimizer, scheduler = lora_setup(tiny_model_dir)  # lr 1e-2, warm-up 2, cosine over 10 steps
    batch = {"input_ids": torch.tensor([[128000, 1234, 5678, 910]]), "labels": torch.tensor([[128000, 1234, 5678, 910]]),
             "position_ids": torch.tensor([[0, 1, 2, 3]])}
    for _ in range(3):
        loss, n = forward_loss(model, batch)
        (loss / n).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    path = _save(tmp_path, 3, model, optimizer, scheduler)

    cfg = TrainConfig(lr=1e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95)
    model2 = apply_lora(load_base_model(tiny_model_dir), r=8, alpha=16, seed=0)
    optimizer2 = make_optimizer([p for p in model2.parameters() if p.requires_grad], cfg)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lr_lambda(2, 20, 0.1))
    load_checkpoint(path, peft_model=model2, optimizer=optimizer2, scheduler=scheduler2, rank=0)
    group = optimizer2.param_groups[0]
    assert group["lr"] == pytest.approx(1e-2 * lr_lambda(2, 10, 0.1)(3))  # control: the checkpoint's values win
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.0
    apply_settings(optimizer2, scheduler2, cfg)
    assert group["lr"] == pytest.approx(1e-3 * lr_lambda(2, 20, 0.1)(3)) == scheduler2.get_last_lr()[0]
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.1
    assert scheduler2.last_epoch == 3
    optimizer2.step()
    scheduler2.step()
    assert scheduler2.get_last_lr()[0] == pytest.approx(1e-3 * lr_lambda(2, 20, 0.1)(4))


def test_another_seed_is_refused(tmp_path):
    from qlora.checkpoint import check_seed

    d = tmp_path / "step-0000001"
    d.mkdir()
    (d / "trainer_state.json").write_text(json.dumps({"step": 1, "seed": 0}))
    check_seed(d, 0)
    with pytest.raises(UserError, match=rf"^--seed 1: checkpoint {d} was trained with --seed 0, which fixes the order "
                                        r"of the training rows .*; restore --seed 0, or use a new --output-dir$"):
        check_seed(d, 1)
