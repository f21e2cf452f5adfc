"""qlora/memory.py, the peak-memory estimator, and qlora/plan.py, the settings finetune.py derives from it (CPU only;
numbers checked against the device in bench/RESULTS.md)."""
from __future__ import annotations

import pytest

from qlora.config import TrainConfig
from qlora.errors import UserError
from qlora.llama3 import LLAMA3_8B_CONFIG
from qlora.memory import GiB, choose_checkpoint_layers, estimate_memory
from qlora.plan import check_fits, fit_advice, plan_memory


def test_trainable_parameters_llama3_8b_r64():
    est = estimate_memory(LLAMA3_8B_CONFIG, lora_r=64)
    assert est.trainable_params == 167_772_160
    table = est.table(40)
    assert "167,772,160" in table and "2.09%" in table


# Measured on an H100 (bench/RESULTS.md, 2026-11-23): peak reserved GiB of the fast path at seq 8192, micro-batch 1.
# The first four: bench_train.py's plain-peft levers; the rest: finetune.py itself (default, --low-memory, --kernels none).
MEASURED = [(dict(checkpoint_layers=-1), 10.0), (dict(checkpoint_layers=-1, fused_mlp=False), 10.0),
            (dict(checkpoint_layers=8), 28.1), (dict(checkpoint_layers=0), 34.5),
            (dict(checkpoint_layers=0), 34.2), (dict(checkpoint_layers=-1), 10.0),
            (dict(seq_len=4096, checkpoint_layers=0), 20.4), (dict(seq_len=4096, checkpoint_layers=-1), 8.2),
            (dict(checkpoint_layers=-1, kernels="none", fused_mlp=False, fused_loss=False), 10.8)]


@pytest.mark.parametrize("kw,measured", MEASURED)
def test_estimate_within_10_percent_of_device(kw, measured):
    kw = {"seq_len": 8192, **kw}
    est = estimate_memory(LLAMA3_8B_CONFIG, **kw)
    assert abs(est.peak_reserved_bytes / GiB - measured) <= 0.1 * measured


def test_memory_grows_with_tokens_and_kept_blocks():
    e = lambda **kw: estimate_memory(LLAMA3_8B_CONFIG, **kw).peak_reserved_bytes  # noqa: E731
    assert e(seq_len=4096) < e(seq_len=8192) < e(seq_len=16384)
    assert e(micro_batch_size=2) > e(micro_batch_size=1)
    assert e(checkpoint_layers=-1) < e(checkpoint_layers=8) < e(checkpoint_layers=0)
    assert e(kernels="none", fused_mlp=False, fused_loss=False) > e()
    assert e(upcast=True) > e()


def test_paged_optimizer_state_outside_allocator():
    paged = estimate_memory(LLAMA3_8B_CONFIG, optimizer="paged_adamw_8bit")
    plain = estimate_memory(LLAMA3_8B_CONFIG, optimizer="adamw_torch")
    assert paged.peak_reserved_bytes < plain.peak_reserved_bytes
    assert plain.peak_reserved_bytes - paged.peak_reserved_bytes == pytest.approx(167_772_160 * 8, rel=1e-6)


def test_choose_checkpoint_layers_spends_the_budget():
    n8k = choose_checkpoint_layers(LLAMA3_8B_CONFIG, 36 * GiB, seq_len=8192)
    n16k = choose_checkpoint_layers(LLAMA3_8B_CONFIG, 36 * GiB, seq_len=16384)
    assert n8k is not None and n16k is not None and n16k > n8k
    assert estimate_memory(LLAMA3_8B_CONFIG, seq_len=16384, checkpoint_layers=n16k).total_bytes <= 36 * GiB
    assert estimate_memory(LLAMA3_8B_CONFIG, seq_len=16384, checkpoint_layers=n16k - 1).total_bytes > 36 * GiB
    assert choose_checkpoint_layers(LLAMA3_8B_CONFIG, 8 * GiB, seq_len=8192) is None  # nothing fits 8 GiB


def test_fits_and_table_verdict():
    est = estimate_memory(LLAMA3_8B_CONFIG, seq_len=32768, checkpoint_layers=0)
    assert not est.fits(40 * GiB) and "DOES NOT FIT" in est.table(40)
    small = estimate_memory(LLAMA3_8B_CONFIG, seq_len=4096, checkpoint_layers=-1)
    assert small.fits(40 * GiB) and "=> fits" in small.table(40)


def test_plan_reads_the_train_config():
    """The plan's estimate follows TrainConfig's LoRA and batch fields (a different rank or micro-batch must show)."""
    default = plan_memory(TrainConfig(), model_config=None, max_len=8192, device_type="cuda", gpu_total_bytes=80 * GiB)
    assert default.estimate.trainable_params == 167_772_160 and "167,772,160" in default.estimate.table(default.gpu_gib)
    assert default.gpu_gib == 80.0
    assert f"= {default.estimate.total_bytes / GiB:.1f} GiB" in default.estimate.summary(default.gpu_gib)
    r32 = plan_memory(TrainConfig(lora_r=32, lora_target_modules=["q_proj", "v_proj"], micro_batch_size=2),
                      model_config=None, max_len=8192, device_type="cuda", gpu_total_bytes=80 * GiB)
    assert r32.estimate.trainable_params == 32 * 32 * (2 * 4096 + 4096 + 1024)
    assert r32.estimate.settings["micro_batch_size"] == 2 and r32.estimate.settings["lora_targets"] == ["q_proj", "v_proj"]


def test_plan_on_cpu_and_gpu():
    cpu = plan_memory(TrainConfig(), model_config=None, max_len=8192, device_type="cpu")
    assert cpu.kernels == "none" and cpu.checkpoint_layers == -1
    gpu40 = plan_memory(TrainConfig(gpu_memory_gib=40.0), model_config=None, max_len=8192, device_type="cuda")
    assert gpu40.checkpoint_layers == 0 and gpu40.estimate.fits(40 * GiB)
    long = plan_memory(TrainConfig(gpu_memory_gib=40.0), model_config=None, max_len=16384, device_type="cuda")
    assert 0 < long.checkpoint_layers < 32
    low = plan_memory(TrainConfig(low_memory=True), model_config=None, max_len=8192, device_type="cuda",
                      gpu_total_bytes=80 * GiB)
    assert low.checkpoint_layers == -1 and low.estimate.peak_reserved_bytes < 12 * GiB
    assert plan_memory(TrainConfig(checkpoint_layers="5"), model_config=None, max_len=8192,
                       device_type="cuda").checkpoint_layers == 5
    off = plan_memory(TrainConfig(gradient_checkpointing=False), model_config=None, max_len=8192, device_type="cuda")
    assert off.checkpoint_layers == 0


def test_bad_speed_settings_are_one_line_errors():
    with pytest.raises(UserError, match="--kernels liger"):
        plan_memory(TrainConfig(kernels="liger"), model_config=None, max_len=8192, device_type="cpu")
    with pytest.raises(UserError, match="--low-memory"):
        plan_memory(TrainConfig(low_memory=True, gradient_checkpointing=False), model_config=None, max_len=8192,
                    device_type="cuda")


def test_check_fits_refuses_naming_the_knobs():
    plan = plan_memory(TrainConfig(micro_batch_size=4, checkpoint_layers="0", gpu_memory_gib=40.0),
                       model_config=None, max_len=8192, device_type="cuda")
    with pytest.raises(UserError) as e:
        check_fits(plan)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit the 40 GiB GPU" in msg
    for knob in ("--micro-batch-size", "--checkpoint-layers all", "--low-memory", "--max-len"):
        assert knob in msg
    check_fits(plan_memory(TrainConfig(gpu_memory_gib=40.0), model_config=None, max_len=8192,
                           device_type="cuda"))  # the default fits


def test_fit_advice_is_check_fits_message_without_raising():
    fits = plan_memory(TrainConfig(gpu_memory_gib=40.0), model_config=None, max_len=8192, device_type="cuda")
    assert fit_advice(fits) is None and fit_advice(fits, table_shown=True) is None
    plan = plan_memory(TrainConfig(gpu_memory_gib=8.0), model_config=None, max_len=8192, device_type="cuda")
    with pytest.raises(UserError) as e:
        check_fits(plan)
    assert fit_advice(plan) == str(e.value) and "--estimate-memory ... shows the table" in str(e.value)
    # under --estimate-memory the table is already on the screen: the same advice, without pointing at it
    assert fit_advice(plan, table_shown=True) == str(e.value).replace(
        "; python finetune.py --estimate-memory ... shows the table", "")


def test_ddp_adds_gradient_buckets():
    one = estimate_memory(LLAMA3_8B_CONFIG, world_size=1)
    two = estimate_memory(LLAMA3_8B_CONFIG, world_size=2)
    assert two.peak_reserved_bytes - one.peak_reserved_bytes == 167_772_160 * 4
