"""finetune.py end to end on CPU with the tiny model: run directory (contract 4), stop protocol and resume equality,
continuing with a larger --max-steps, config precedence, --help, and every one-line error."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import finetune
from qlora.config import build_parser, resolve_config
from qlora.errors import UserError, run_main
from run_metrics import metric_records, train_losses
from shard_fixtures import random_rows, write_rows

ROOT = Path(__file__).resolve().parent.parent


def args_for(model, data, run, *extra):
    return ["--model", str(model), "--data", str(data), "--output-dir", str(run), "--micro-batch-size", "2",
            "--grad-accum", "2", "--lr", "5e-3", "--save-every", "2", "--eval-every", "3", "--keep-checkpoints", "2",
            "--seed", "0", *[str(e) for e in extra]]


def reached(run: Path, step: int) -> bool:
    """metrics.jsonl shows `step` (read while the run appends to it: a half-written last line is not an error)."""
    try:
        return (run / "metrics.jsonl").exists() and step in train_losses(run)
    except ValueError:
        return False


def stop_when(run: Path, step: int, action) -> threading.Thread:
    """Call action() once metrics.jsonl shows `step` (from a thread, as a job scheduler would, mid-run)."""
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            if reached(run, step):
                action()
                return
            time.sleep(0.02)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, finetune_task_data):
    """An uninterrupted 6-step run: the reference for the resume tests (slow ones only)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 6)) == 0
    return run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, finetune_task_data):
    """A finished 2-step run with its checkpoint at step 2: what the refusal tests try to resume."""
    run = tmp_path_factory.mktemp("two") / "run"
    assert finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 2)) == 0
    return run


def assert_steps_differ(losses: dict[int, float], rel: float) -> None:
    """Control for a per-step equality: neighbouring steps differ by more than `rel`, so a resume that repeated or
    skipped a step could not pass it."""
    steps = sorted(losses)
    assert all(losses[a] != pytest.approx(losses[b], rel=rel) for a, b in zip(steps, steps[1:])), losses


@pytest.mark.slow
def test_run_directory_has_everything_of_contract_4(reference_run, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    from qlora.llama3 import load_tokenizer
    from qlora.model import load_base_model

    run = reference_run
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 6 and status["max_steps"] == 6
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["lora_r"] == 64 and cfg["config"]["optimizer"] == "paged_adamw_8bit"
    assert cfg["resolved"]["tokens_per_step"] == 4 * 64 and cfg["resolved"]["trainable_params"] > 0
    assert cfg["config"]["compute_dtype"] == "auto" and cfg["resolved"]["compute_dtype"] == "fp32"  # CPU: fp32
    assert cfg["versions"]["torch"] and cfg["versions"]["peft"] and "git_commit" in cfg
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [v["step"] for v in vals] == [3, 6] and all(v["val_label_tokens"] > 0 for v in vals)
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000004", "step-0000006"]
    ckpt = run / "checkpoints" / "step-0000006"
    for name in ("adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_states.pt",
                 "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["rows_consumed"] == 6 * 4 and state["fingerprint"]
    # Final adapter: PEFT format + tokenizer, loadable by plain peft, same weights as the last checkpoint.
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (run / "adapter" / name).is_file(), name
    load_tokenizer(run / "adapter")
    model = PeftModel.from_pretrained(load_base_model(tiny_model_dir), str(run / "adapter"))
    want = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    got = {k: v for k, v in model.named_parameters() if "lora_" in k}
    assert len(got) == len(want) > 0
    for k, v in want.items():
        key = k.replace(".weight", ".default.weight")
        assert torch.equal(got[key].float().cpu(), v.float()), k
    # control: the checkpoint of two steps earlier holds other weights
    older = load_file(str(run / "checkpoints" / "step-0000004" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(got[k.replace(".weight", ".default.weight")].float().cpu(), v.float())
               for k, v in older.items())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop_file", "sigusr1"])
def test_stop_then_resume_gives_the_same_losses(reference_run, tiny_model_dir, finetune_task_data, tmp_path, how):
    """Stop protocol mid-run, rerun the same command: per-step losses equal the uninterrupted run's
    (tolerance: 1e-6 relative; CPU runs are deterministic, so they are in fact identical)."""
    run = tmp_path / "run"
    argv = args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 6)
    if how == "stop_file":
        stop_when(run, 2, lambda: (run / "stop_requested").touch())
    else:
        stop_when(run, 2, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    assert finetune.main(argv) == 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped", status
    stopped_at = status["step"]
    assert 2 <= stopped_at < 6
    assert (run / f"checkpoints/step-{stopped_at:07d}/trainer_state.json").is_file()
    assert not (run / "adapter").exists()
    # stale stop file from the previous job is removed at start; the rerun continues to the end
    assert finetune.main(argv) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert not (run / "stop_requested").exists()
    ref, got = train_losses(reference_run), train_losses(run)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step
    assert_steps_differ(ref, rel=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_from_the_last_complete_checkpoint(reference_run, tiny_model_dir, finetune_task_data,
                                                              tmp_path):
    """kill -9 after step 3 (checkpoint at 2); the rerun drops the metrics of step 3 and repeats it exactly."""
    run = tmp_path / "run"
    argv = args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 6)
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if reached(run, 3):
                break
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # killed: nobody could update it
    assert finetune.main(argv) == 0
    ref, got = train_losses(reference_run), train_losses(run)
    assert sorted(got) == sorted(ref)  # step 3's first record was dropped, not duplicated
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step
    assert_steps_differ(ref, rel=1e-6)


def test_stop_request_older_than_the_job_is_cleared_a_newer_one_kept(tmp_path, monkeypatch):
    """finetune.sbatch exports the job's start (QLORA_JOB_STARTED_AT): a stop_requested written before it is the
    previous job's and is deleted; one written since (a USR1 or a touch during the job's setup) stops this run. Run
    by hand (no variable), any request found when the run directory opens is stale."""
    from qlora.rundir import RunDir

    run_dir = RunDir(tmp_path, enabled=True)
    stop = run_dir.stop_path
    stop.touch()
    os.utime(stop, (1000.0, 1000.0))
    monkeypatch.setenv("QLORA_JOB_STARTED_AT", "999.5")
    run_dir.clear_stale_stop_request()
    assert stop.exists(), "a request made after the job started was deleted"
    monkeypatch.setenv("QLORA_JOB_STARTED_AT", "1000.5")
    run_dir.clear_stale_stop_request()
    assert not stop.exists(), "the previous job's request was kept"
    stop.touch()
    monkeypatch.delenv("QLORA_JOB_STARTED_AT")
    run_dir.clear_stale_stop_request()
    assert not stop.exists()
    run_dir.clear_stale_stop_request()  # nothing to clear


@pytest.mark.slow
def test_larger_max_steps_continues_a_finished_run(tiny_model_dir, finetune_task_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 2)) == 0
    capsys.readouterr()
    assert finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 2)) == 0
    assert "already finished at step 2" in capsys.readouterr().out
    assert finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 3)) == 0
    assert sorted(train_losses(run)) == [1, 2, 3]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 3
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resumed_from"].endswith("step-0000002")


def test_checkpoint_of_another_recipe_is_refused(finished_run, tiny_model_dir, finetune_task_data):
    argv = args_for(tiny_model_dir, finetune_task_data, finished_run, "--max-steps", 3, "--lora-r", 8)
    with pytest.raises(UserError, match=r"different recipe or data \(differs: lora\.lora_r\)"):
        finetune.main(argv)


def test_checkpoint_of_another_optimizer_is_refused(finished_run, tiny_model_dir, finetune_task_data):
    """The 8-bit optimizer state of a run cannot be loaded into another optimizer class (bitsandbytes failed with
    KeyError 'state1' deep inside the load). --max-steps 2: the run is finished, so nothing is trained on the shared
    run even where the check is missing."""
    argv = args_for(tiny_model_dir, finetune_task_data, finished_run, "--max-steps", 2, "--optimizer", "adamw_torch")
    with pytest.raises(UserError, match=r"different recipe or data \(differs: lora\.optimizer\).*restore the "
                                        r"original --optimizer flag$"):
        finetune.main(argv)


# ----------------------------------------------------------------------------------------------- configuration
def test_yaml_config_is_overridden_by_the_command_line(tmp_path):
    cfg_file = tmp_path / "r.yaml"
    cfg_file.write_text("lr: 1.0e-4\nmicro-batch-size: 3\nlora_target_modules: q_proj,v_proj\nmax_steps: 10\n")
    cfg = resolve_config(["--config", str(cfg_file), "--model", "m", "--data", "d", "--output-dir", "o",
                          "--lr", "3e-4"])
    assert cfg.lr == 3e-4 and cfg.micro_batch_size == 3 and cfg.max_steps == 10
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.lora_r == 64 and cfg.gradient_checkpointing is True and cfg.lora_dropout == 0.0
    cfg_file.write_text("learning_rate: 1\n")
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        resolve_config(["--config", str(cfg_file), "--model", "m", "--data", "d", "--output-dir", "o"])
    with pytest.raises(UserError, match="either --max-steps or --epochs"):
        resolve_config(["--model", "m", "--data", "d", "--output-dir", "o", "--max-steps", "3", "--epochs", "1"])
    assert resolve_config(["--model", "m", "--data", "d", "--output-dir", "o",
                           "--no-gradient-checkpointing"]).gradient_checkpointing is False


def _yaml(tmp_path, text: str) -> list[str]:
    cfg_file = tmp_path / "recipe.yaml"
    cfg_file.write_text(text)
    return ["--config", str(cfg_file), "--model", "m", "--data", "d", "--output-dir", "o"]


def test_yaml_values_are_converted_like_the_flags(tmp_path):
    # PyYAML reads 2e-4 as a string (its floats need a dot); the flag's type turns the text into the number
    cfg = resolve_config(_yaml(tmp_path, 'lr: 2e-4\nmicro_batch_size: "2"\nlora_alpha: 32\ncheckpoint_layers: 8\n'
                                         'gradient_checkpointing: false\nlow_memory: true\n'
                                         'lora_target_modules: [q_proj, v_proj]\nmax_steps:\n'))
    assert cfg.lr == 2e-4 and cfg.micro_batch_size == 2 and cfg.lora_alpha == 32.0
    assert cfg.checkpoint_layers == "8" and cfg.gradient_checkpointing is False and cfg.low_memory is True
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.max_steps is None


@pytest.mark.parametrize("line,pattern", [
    ("max_steps: 2.5", "--max-steps takes an integer, not 2.5"),
    ("seed: [1]", r"--seed takes an integer, not a list \(\[1\]\)"),
    ("micro_batch_size: two", "--micro-batch-size takes an integer, not 'two'"),
    ("micro_batch_size: true", "--micro-batch-size takes an integer, not True"),
    ("lr: fast", "--lr takes a number, not 'fast'"),
    ("lr:", "--lr takes a number, not an empty value"),
    ("optimizer: sgd", "--optimizer takes one of paged_adamw_8bit, adamw_8bit, paged_adamw, adamw_torch, not 'sgd'"),
    ("gradient_checkpointing: sometimes", "--gradient-checkpointing takes true or false, not 'sometimes'"),
    ("lora_target_modules: [1, 2]", "--lora-target-modules takes a list of projection names"),
    ("data: {dir: d}", r"--data takes a string, not a mapping"),
])
def test_yaml_values_that_do_not_convert_are_refused(tmp_path, line, pattern):
    key = line.split(":")[0]
    with pytest.raises(UserError, match=rf"^--config \S*recipe\.yaml: key '{key}': {pattern}") as e:
        resolve_config(_yaml(tmp_path, line + "\n"))
    assert "\n" not in str(e.value)


def test_unknown_lora_target_module_is_refused_before_anything_else():
    with pytest.raises(UserError, match=r"^--lora-target-modules q_proj,foo: unknown projection name\(s\) foo; valid "
                                        r"names: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj$"):
        finetune.main(["--estimate-memory", "--lora-target-modules", "q_proj,foo"])
    with pytest.raises(UserError, match="--lora-target-modules q_proj,q_proj: q_proj named twice"):
        resolve_config(["--model", "m", "--data", "d", "--output-dir", "o", "--lora-target-modules", "q_proj,q_proj"])


def test_help_shows_the_recipe_and_each_default():
    text = " ".join(build_parser(finetune.__doc__).format_help().split())  # argparse wraps lines anywhere
    assert "prepare_model_for_kbit_training" in text  # the docstring's reason for not upcasting
    assert "--lora-r R LoRA rank (64: QLoRA paper; 167,772,160 trainable params = 2.09% on Llama-3-8B) [default: 64]" \
        in text  # argparse's %-formatting of the help text, and the default after it
    assert "e.g. Meta-Llama-3-8B (required) --data DIR" in text
    assert "(default: --data's max_len when --data is given, else 8192; this flag wins over --data) --nproc N" in text


def test_estimate_memory_exits_without_loading_a_model(tmp_path, capsys):
    missing = tmp_path / "no_model"  # --estimate-memory never looks at --output-dir, and needs no model loaded
    assert finetune.main(["--estimate-memory", "--output-dir", str(missing)]) == 0
    assert capsys.readouterr().out.startswith("Estimated peak GPU memory per process: Llama-3-8B shape, seq 8192")
    assert not missing.exists()


@pytest.fixture
def liger_planned(monkeypatch):
    """--estimate-memory plans the fast path wherever liger-kernel is installed; fix that, for the same numbers."""
    import qlora.plan

    monkeypatch.setattr(qlora.plan, "_liger_installed", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_estimate_memory_plans_for_nproc_and_seq_len(liger_planned, finetune_task_data, capsys):
    # DDP's gradient buckets (a second fp32 copy of the LoRA gradients) push 4 processes over 90% of 39.4 GiB
    assert finetune.main(["--estimate-memory", "--nproc", "4", "--gpu-memory-gib", "39.4"]) == 0
    assert "seq 8192 x micro-batch 1" in (out := capsys.readouterr().out) and "1/32 blocks checkpointed" in out
    assert "DDP gradient buckets" in out
    assert finetune.main(["--estimate-memory", "--nproc", "1", "--gpu-memory-gib", "39.4"]) == 0
    assert "0/32 blocks checkpointed" in (out := capsys.readouterr().out) and "DDP gradient buckets" not in out
    assert finetune.main(["--estimate-memory", "--seq-len", "16384", "--gpu-memory-gib", "40"]) == 0
    assert "seq 16384 x micro-batch 1" in capsys.readouterr().out
    # the data's max_len is the default; --seq-len wins over it, and says so
    assert finetune.main(["--estimate-memory", "--data", str(finetune_task_data)]) == 0
    assert "seq 64 x micro-batch 1" in capsys.readouterr().out
    assert finetune.main(["--estimate-memory", "--data", str(finetune_task_data), "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "planning for --seq-len 128, not the max_len 64 of" in out and "seq 128 x micro-batch 1" in out


def test_estimate_memory_that_does_not_fit_exits_1_naming_the_knobs(liger_planned, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: finetune.main(["--estimate-memory", "--gpu-memory-gib", "8", "--micro-batch-size", "2"]))
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT a 8 GiB GPU" in captured.out  # the table comes first
    lines = [x for x in captured.err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("finetune.py: estimated peak GPU memory ")
    assert "does not fit the 8 GiB GPU" in lines[0] and "shows the table" not in lines[0]
    for knob in ("--micro-batch-size 1", "--max-len", "--gpu-memory-gib"):
        assert knob in lines[0]


def test_estimate_only_flags_stay_out_of_training(tmp_path):
    from qlora.config import as_dict

    for flag in ("--seq-len", "--nproc"):
        with pytest.raises(UserError, match=rf"^{flag} is only used with --estimate-memory"):
            resolve_config(["--model", "m", "--data", "d", "--output-dir", "o", flag, "4"])
        with pytest.raises(UserError, match=rf"^{flag} 0: must be >= 1"):
            resolve_config(["--estimate-memory", flag, "0"])
    cfg = resolve_config(["--estimate-memory", "--seq-len", "4096", "--nproc", "4"])
    assert cfg.seq_len == 4096 and cfg.nproc == 4
    assert not {"seq_len", "nproc"} & set(as_dict(cfg))  # config.json and the printed recipe


# ----------------------------------------------------------------------------------------------- one-line errors
@pytest.fixture(scope="module")
def error_cases(tmp_path_factory, tiny_model_dir, finetune_task_data):
    """Every bad input as (argv, extra env); all run as subprocesses in parallel to keep the suite fast."""
    tmp = tmp_path_factory.mktemp("errors")
    incomplete = tmp / "incomplete"
    shutil.copytree(tiny_model_dir, incomplete)
    (incomplete / "tokenizer.json").unlink()
    (incomplete / "model.safetensors").unlink()
    short_ctx = tmp / "short_ctx"
    shutil.copytree(tiny_model_dir, short_ctx)
    conf = json.loads((short_ctx / "config.json").read_text())
    conf["max_position_embeddings"] = 32
    (short_ctx / "config.json").write_text(json.dumps(conf))
    other_tok = write_rows(tmp / "other_tok", tiny_model_dir, 64, random_rows(tiny_model_dir, 4, 64),
                           tokenizer_sha256="0" * 64)
    empty = write_rows(tmp / "empty", tiny_model_dir, 64, [])
    fake_bnb = tmp / "fake_bnb" / "bitsandbytes"
    fake_bnb.mkdir(parents=True)
    (fake_bnb / "__init__.py").write_text("")
    (fake_bnb / "functional.py").write_text(
        "def quantize_4bit(*a, **k):\n    raise RuntimeError('CUDA Setup failed: libbitsandbytes_cuda126.so not found')\n")
    cases = {
        "missing_model": (args_for(tmp / "nope", finetune_task_data, tmp / "r1"), {},
                          "no such directory"),
        "incomplete_model": (args_for(incomplete, finetune_task_data, tmp / "r2"), {},
                             r"incomplete model directory, missing: tokenizer\.json, \*\.safetensors"),
        "other_tokenizer": (args_for(tiny_model_dir, other_tok, tmp / "r3"), {},
                            r"shards were tokenized with .*not this model's tokenizer .*rerun pretokenize.py"),
        "max_len_above_context": (args_for(short_ctx, finetune_task_data, tmp / "r4"), {},
                                  r"max_len 64 exceeds the model's context \(max_position_embeddings=32"),
        "empty_data": (args_for(tiny_model_dir, empty, tmp / "r5"), {}, "the train split has no rows"),
        "no_bnb_backend": (args_for(tiny_model_dir, finetune_task_data, tmp / "r6"),
                           {"PYTHONPATH": f"{fake_bnb.parent}{os.pathsep}{ROOT}"},
                           "bitsandbytes has no working backend on cpu .*CUDA Setup failed"),
        "bad_flag_combination": (args_for(tiny_model_dir, finetune_task_data, tmp / "r7", "--max-steps", 2,
                                          "--epochs", 1), {}, "give either --max-steps or --epochs"),
    }
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *argv], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
             for name, (argv, env, _) in cases.items()}
    results = {name: (p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    return {name: (*results[name], cases[name][2]) for name in cases}


@pytest.mark.parametrize("name", ["missing_model", "incomplete_model", "other_tokenizer", "max_len_above_context",
                                  "empty_data", "no_bnb_backend", "bad_flag_combination"])
def test_bad_input_gives_one_line_error(error_cases, name):
    code, out, err, pattern = error_cases[name]
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("finetune.py: error: ") and re.search(pattern, lines[0]), lines[0]


def test_cuda_out_of_memory_names_the_knobs(tiny_model_dir, finetune_task_data, tmp_path, monkeypatch, capsys):
    """OOM cannot happen on a CPU runner: raise the real exception type from inside the training forward."""
    import qlora.model

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(qlora.model, "forward_loss", oom)
    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: finetune.main(args_for(tiny_model_dir, finetune_task_data, tmp_path / "run",
                                                "--max-steps", 1)))
    assert exc.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines[-1].startswith("finetune.py: error: CUDA out of memory")
    for knob in ("--micro-batch-size", "--max-len", "--gradient-checkpointing", "--low-memory"):
        assert knob in lines[-1]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


# ----------------------------------------------------------------------------------------------- refused before loading
@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the base fails the test: what these refuse must be refused before it."""
    def load(*a, **k):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(finetune, "load_base_model", load)


@pytest.mark.parametrize("where,pattern", [
    ("model", r"--output-dir \S+: is the input --model "),
    ("model/run", r"--output-dir \S+: lies inside the input --model "),
    ("data", r"--output-dir \S+: is the input --data "),
    ("parent_of_data", r"--output-dir \S+: holds the input --data "),
    ("foreign", r"--output-dir \S+: exists and is not a finetune output \(its status.json does not say \"stage\": "
                r"\"finetune\"\)"),
])
def test_run_directory_that_would_overwrite_an_input_is_refused(tiny_model_dir, finetune_task_data, tmp_path,
                                                                 no_model_load, where, pattern):
    """--output-dir equal to --model overwrote the base's config.json (the base unusable afterwards); a run
    directory that is, holds or lies inside the model or data directory, or holds something else, is refused."""
    model, data = tmp_path / "model", tmp_path / "parent" / "data"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(finetune_task_data, data)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    run = {"model": model, "model/run": model / "run", "data": data, "parent_of_data": data.parent,
           "foreign": tmp_path / "foreign"}[where]
    before = {p: p.read_bytes() for p in [*model.rglob("*"), *data.rglob("*")] if p.is_file()}
    with pytest.raises(UserError, match=f"^{pattern}"):
        finetune.main(args_for(model, data, run, "--max-steps", 1))
    assert {p: p.read_bytes() for p in [*model.rglob("*"), *data.rglob("*")] if p.is_file()} == before
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_run_directories_are_recognised_old_and_new(tmp_path):
    """status.json says "stage": "finetune" since runs refuse foreign directories; runs from before are known by
    their state, so they still resume; a stop file alone is finetune.sbatch asking to stop before the start."""
    from qlora.rundir import RunDir, check_run_dir

    new = RunDir(tmp_path / "new", enabled=True)
    new.set_status(state="running", step=0)
    assert json.loads(new.status_path.read_text())["stage"] == "finetune"
    check_run_dir(new.path, {})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "status.json").write_text(json.dumps({"state": "stopped", "step": 3}))
    check_run_dir(tmp_path / "old", {})
    (tmp_path / "old" / "status.json").write_text(json.dumps({"state": "sleeping"}))  # control: not a run's state
    with pytest.raises(UserError, match="is not a finetune output"):
        check_run_dir(tmp_path / "old", {})
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "stop_requested").touch()
    check_run_dir(tmp_path / "early", {})
    (tmp_path / "early" / "notes.txt").touch()  # control: anything else is the user's
    with pytest.raises(UserError, match="is not a finetune output"):
        check_run_dir(tmp_path / "early", {})


@pytest.mark.parametrize("flag,value,what", [
    ("--adam-beta1", "1.0", "in [0, 1)"), ("--adam-beta2", "-0.1", "in [0, 1)"), ("--weight-decay", "-1.0", ">= 0"),
    ("--eval-max-rows", "0", ">= 1"), ("--lora-alpha", "0.0", "> 0"),
    ("--lr", "inf", "a finite number"), ("--lr", "nan", "a finite number"), ("--weight-decay", "inf", "a finite number"),
    ("--epochs", "inf", "a finite number"), ("--max-grad-norm", "inf", "a finite number"),
])
def test_out_of_range_optimiser_settings_are_one_line_errors(flag, value, what):
    with pytest.raises(UserError, match=rf"^{flag} {value}: must be {re.escape(what)}$"):
        resolve_config(["--model", "m", "--data", "d", "--output-dir", "o", flag, value])


def test_model_with_fewer_embeddings_than_tokenizer_ids_is_refused(tiny_model_dir, finetune_task_data, tmp_path,
                                                                   no_model_load):
    model = tmp_path / "small_vocab"
    shutil.copytree(tiny_model_dir, model)
    conf = json.loads((model / "config.json").read_text())
    conf["vocab_size"] = 1000
    (model / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match=r"^--model \S+small_vocab: config.json has vocab_size 1000, but its "
                                        r"tokenizer.json has 128256 ids"):
        finetune.main(args_for(model, finetune_task_data, tmp_path / "run", "--max-steps", 1))


@pytest.fixture
def copied_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def test_damaged_checkpoint_is_reported_in_one_line(copied_run, tiny_model_dir, finetune_task_data, no_model_load,
                                                    capsys):
    """A truncated file in the only checkpoint: --resume DIR and --resume auto each say so in one line (it was a
    traceback from deep inside torch.load); an empty step directory is reported, not skipped in silence."""
    step2 = copied_run / "checkpoints" / "step-0000002"
    size = (step2 / "optimizer.pt").stat().st_size
    with open(step2 / "optimizer.pt", "r+b") as f:
        f.truncate(size - 1)
    (copied_run / "checkpoints" / "step-0000003").mkdir()
    argv = args_for(tiny_model_dir, finetune_task_data, copied_run, "--max-steps", 3)
    with pytest.raises(UserError, match=rf"^--resume {step2}: damaged checkpoint \(optimizer.pt has {size - 1} bytes, "
                                        rf"{size} when saved\); resume from another one"):
        finetune.main([*argv, "--resume", str(step2)])
    with pytest.raises(UserError, match=r"^--resume \S+step-0000003: damaged checkpoint \(no trainer_state.json: not "
                                        r"a complete checkpoint\)"):
        finetune.main([*argv, "--resume", str(copied_run / "checkpoints" / "step-0000003")])
    capsys.readouterr()
    with pytest.raises(UserError, match=r"^--resume auto: every checkpoint in \S+ is damaged \(step-0000002: "
                                        r"optimizer.pt has "):
        finetune.main(argv)
    err = capsys.readouterr().err
    assert "finetune.py: warning: " in err and "step-0000003 has no trainer_state.json, so it is not a checkpoint" in err


def test_another_seed_is_refused_on_resume(copied_run, tiny_model_dir, finetune_task_data, no_model_load):
    """The data position of a checkpoint is a place in the row order --seed fixes: a new seed would repeat and skip
    rows unnoticed."""
    argv = args_for(tiny_model_dir, finetune_task_data, copied_run, "--max-steps", 3)
    argv[argv.index("--seed") + 1] = "1"
    with pytest.raises(UserError, match=r"^--seed 1: checkpoint \S+step-0000002 was trained with --seed 0"):
        finetune.main(argv)


# ----------------------------------------------------------------------------------------------- damage, rewind, changes
def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


def all_finite(path: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


@pytest.mark.slow
def test_rewind_then_resume_auto_continues_the_rewound_run(reference_run, tiny_model_dir, finetune_task_data,
                                                           tmp_path, monkeypatch):
    """--resume RUN/checkpoints/step-4 in a run that has step-6, stopped after step 5: rotation (keep 1) removes the
    abandoned step-6, not step-4 (resumed from) or step-5 (written last); --resume auto then continues from step-5
    and trains the same steps as the uninterrupted run. By step number, step-6 was kept and auto resumed from it."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "adapter")
    step4 = run / "checkpoints" / "step-0000004"
    train_step = finetune.train_step

    def stop_during_step_5(r):  # the stop protocol, from inside: a thread watching metrics.jsonl could be late
        if r.step == 4:
            r.run_dir.stop_path.touch()
        return train_step(r)

    with monkeypatch.context() as m:
        m.setattr(finetune, "train_step", stop_during_step_5)
        assert finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 6,
                                      "--keep-checkpoints", 1, "--resume", step4)) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]
    assert finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 6)) == 0
    assert json.loads((run / "config.json").read_text())["resumed_from"].endswith("step-0000005")
    ref, got = train_losses(reference_run), train_losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step
    assert_steps_differ(ref, rel=1e-6)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference_run, tiny_model_dir, finetune_task_data,
                                                                  tmp_path, capsys):
    """The last checkpoint's adapter cut short: rerunning the command warns in one line, resumes from step 4 and
    trains steps 5 and 6 again, as the uninterrupted run did (it was a traceback on every --resume auto)."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "adapter")  # the run did not finish: continue it
    weights = run / "checkpoints" / "step-0000006" / "adapter" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 10)
    assert finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 6)) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "step-0000006 is damaged (adapter/adapter_model.safetensors has " in warnings[0]
    assert json.loads((run / "config.json").read_text())["resumed_from"].endswith("step-0000004")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    ref, got = train_losses(reference_run), train_losses(run)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step
    from qlora.checkpoint import checkpoint_damage

    assert checkpoint_damage(run / "checkpoints" / "step-0000006") is None  # written again


@pytest.mark.slow
def test_changed_learning_rate_and_optimizer_settings_apply_from_the_resumed_step(finished_run, tiny_model_dir,
                                                                                   finetune_task_data, tmp_path):
    """The README says the learning rate may change between runs: the checkpoint's saved --lr (scheduler) and
    weight decay/betas (optimizer) used to win while config.json showed the new ones."""
    from qlora.training import lr_lambda

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    argv = args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 4, "--weight-decay", 0.1,
                    "--adam-beta1", 0.8, "--save-every", 1)
    argv[argv.index("--lr") + 1] = "1e-3"
    assert finetune.main(argv) == 0
    lrs = {s: r["lr"] for s, r in metric_records(run, "loss").items()}
    warmup = 1  # ceil(0.03 x 4)
    assert lrs[3] == pytest.approx(1e-3 * lr_lambda(warmup, 4, 0.1)(2))
    assert lrs[4] == pytest.approx(1e-3 * lr_lambda(warmup, 4, 0.1)(3))
    assert lrs[2] == pytest.approx(5e-3 * lr_lambda(warmup, 2, 0.1)(1))  # control: the first run's rate
    groups = torch.load(run / "checkpoints" / "step-0000003" / "optimizer.pt", weights_only=False)["param_groups"]
    assert groups[0]["weight_decay"] == 0.1 and groups[0]["betas"] == (0.8, 0.999)
    changed = json.loads((run / "config.json").read_text())["changed_at_resume"]
    assert changed["lr"] == [5e-3, 1e-3] and changed["weight_decay"] == [0.0, 0.1] and changed["max_steps"] == [2, 4]


@pytest.mark.slow
def test_diverged_run_fails_before_saving_anything_non_finite(tiny_model_dir, finetune_task_data, tmp_path,
                                                              monkeypatch, capsys):
    """--lr 1e30: the loss turns NaN at the second step. It used to finish "successfully" (exit 0) with every
    checkpoint and the final adapter NaN and bare NaN in status.json and metrics.jsonl."""
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: finetune.main(args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 4,
                                                "--save-every", 1, "--lr", "1e30")))
    assert exc.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines[-1].startswith("finetune.py: error: training diverged at step ") and "Lower --lr" in lines[-1]
    status = strict_json((run / "status.json").read_text())
    assert status["state"] == "failed" and "diverged" in status["message"]
    records = [strict_json(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["step"] <= status["step"] for r in records)
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert checkpoints, "the steps before the divergence were saved"
    for ckpt in checkpoints:
        assert all_finite(ckpt / "adapter" / "adapter_model.safetensors"), ckpt
        strict_json((ckpt / "trainer_state.json").read_text())
    assert not (run / "adapter").exists()


@pytest.mark.slow
def test_sigusr1_at_startup_stops_at_the_first_step(tiny_model_dir, finetune_task_data, tmp_path):
    """SIGUSR1 while finetune.py still imports torch used to kill it (the default action). Sent as soon as the
    process catches it (or after 1 s, which is inside the imports), it stops with a checkpoint at step 1."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"),
                             *args_for(tiny_model_dir, finetune_task_data, run, "--max-steps", 6)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1.0
    while time.time() < deadline and not _catches_sigusr1(proc.pid):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 1, status
    assert (run / "checkpoints" / "step-0000001" / "trainer_state.json").is_file()


def _catches_sigusr1(pid: int) -> bool:
    """Whether the process has a handler for SIGUSR1 (bit 10 of SigCgt in /proc/PID/status)."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1)
