"""qlora/checkpoint.py and the data position (qlora/data.py): exact save/restore, last-K, atomic listing,
fingerprint refusal, adapter round trip through plain peft, and the seeded per-rank row order."""
from __future__ import annotations

import json

import pytest
import torch

from qlora.checkpoint import capture_rng, check_fingerprint, load_checkpoint, save_checkpoint
from qlora.config import TrainConfig
from qlora.data import PackedShards, StreamOrder, read_metadata, step_micro_batches
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
    shards = PackedShards(rows_dir, "train", read_metadata(rows_dir))
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
    shards = PackedShards(rows_dir, "train", read_metadata(rows_dir))
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
    shards = PackedShards(rows_dir, "train", read_metadata(rows_dir))
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
