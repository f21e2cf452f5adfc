"""finetune.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.sh) and outside SLURM, on CPU.

The SLURM tests skip, with the reason, where the cluster cannot start (not root, no apt-get, no network...). They
train the tiny Llama-3 on CPU with 2 processes (gloo), override the Raven-only resources on the sbatch command line
(--gres=none, --cpus-per-task=2) and pass the run settings through the environment, as a user would.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora.llama3 import format_plain
from run_metrics import train_losses

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "finetune.sbatch"
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
# Short training: 1 row per process per step, no periodic checkpoints or validation (only at the end / on stop).
TRAIN_FLAGS = ["--micro-batch-size", "1", "--grad-accum", "1", "--eval-every", "0", "--save-every", "1000"]
STEPS = 10
# Per-step train loss of a resumed run vs an uninterrupted one, same 2-process gloo layout on the same machine:
# the checkpoint restores adapter, optimizer, scheduler, RNG and data position, so they agree to float rounding.
LOSS_ATOL = 1e-5


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shards(tiny_model_dir, tmp_path_factory):
    """Plain-text documents -> pretokenize.py -> 10 train rows of 128 tokens (and 2 validation rows)."""
    root = tmp_path_factory.mktemp("sbatch_data")
    rng = random.Random(0)
    words = "do re mi fa sol la ti".split()
    (root / "jsonl").mkdir()
    for split, n in (("train", 64), ("validation", 8)):
        with open(root / "jsonl" / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
                f.write(json.dumps({"text": format_plain(text), "format": "plain"}) + "\n")
    out = root / "tok"
    subprocess.run([sys.executable, str(REPO / "pretokenize.py"), "--input", str(root / "jsonl"), "--tokenizer",
                    str(tiny_model_dir), "--output-dir", str(out), "--max-len", "128", "--num-proc", "1"],
                   check=True, capture_output=True, text=True, cwd=REPO)
    return out


@pytest.fixture(scope="module")
def slurm():
    """Start (or reuse) the local cluster; skip with the script's reason where it cannot start."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    p = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)
    if p.returncode == 2:
        pytest.skip(p.stderr.strip().splitlines()[-1])
    assert p.returncode == 0, f"tests/slurm_cluster.sh start failed:\n{p.stdout}\n{p.stderr}"


def job_env(tiny_model_dir, shards, run_dir, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(MODEL_DIR=str(tiny_model_dir), DATA_DIR=str(shards), RUN_DIR=str(run_dir), VENV=sys.prefix,
               PREREQ_MODULES="", **extra)
    return env


def submit(workdir: Path, env: dict, args: list[str]) -> int:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)  # the script's default --output=logs/%x-%j.out
    p = subprocess.run(["sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", "--time=00:30:00",
                        f"--chdir={workdir}", str(SBATCH), *args],
                       env=env, cwd=workdir, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().split(";")[0])


def job_info(jobid: int) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(jobid)], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def job_log(workdir: Path, jobid: int) -> str:
    logs = list((workdir / "logs").glob(f"*-{jobid}.out"))
    # errors="replace": a log is written by several processes at once; a stray byte must not hide what it says
    return logs[0].read_text(errors="replace") if logs else ""


def wait_for(what: str, predicate, timeout: float, jobid: int, workdir: Path, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    subprocess.run(["scancel", str(jobid)])
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; job {jobid}: {job_info(jobid)}\n"
                f"log:\n{job_log(workdir, jobid)[-6000:]}")


def node_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout.split()
    return bool(out) and all(state == "idle" for state in out)


def wait_done(jobid: int, workdir: Path, timeout: float = 240) -> dict:
    def done():
        info = job_info(jobid)
        return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE") else None
    return wait_for("the job to end", done, timeout, jobid, workdir)


def final_val_loss(run_dir: Path) -> float:
    vals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    return vals[-1]["val_loss"]


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file(), f"no adapter_config.json in {adapter}"
    return load_file(adapter / "adapter_model.safetensors")


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def assert_env_printed(log: str) -> None:
    assert re.search(r"torch 2\.\S+ \(cuda \S+, cudnn \S+\), bitsandbytes \d", log), log[-3000:]
    assert "finetune.sbatch: gpu " in log


# ----------------------------------------------------------------------------------------------- on SLURM
@pytest.fixture(scope="module")
def uninterrupted(slurm, tiny_model_dir, shards, tmp_path_factory):
    """One sbatch job, 2 processes on CPU, STEPS steps, no signal: the reference run."""
    work = tmp_path_factory.mktemp("sbatch_plain")
    run_dir = work / "run"
    # Flags both ways a user can pass them: FINETUNE_ARGS in the environment and arguments after the script.
    env = job_env(tiny_model_dir, shards, run_dir, NPROC="2", FINETUNE_ARGS=" ".join(TRAIN_FLAGS))
    jobid = submit(work, env, ["--max-steps", str(STEPS)])
    info = wait_done(jobid, work)
    return dict(jobid=jobid, info=info, run=run_dir, log=job_log(work, jobid))


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_trains_on_slurm(uninterrupted):
    r = uninterrupted
    assert r["info"]["JobState"] == "COMPLETED", r["log"][-4000:]
    assert r["info"]["Restarts"] == "0"  # a finished job does not requeue
    st = status(r["run"])
    assert st["state"] == "finished" and st["step"] == STEPS and st["world_size"] == 2
    assert sorted(train_losses(r["run"])) == list(range(1, STEPS + 1))
    tensors = adapter_tensors(r["run"])
    assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)
    log = r["log"]
    assert "finetune.sbatch: SLURM_RESTART_COUNT=0" in log
    assert_env_printed(log)
    assert "1 node(s) x 2 process(es)" in log
    assert re.search(r"srun .*torch\.distributed\.run --nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d "
                     r"--rdzv_endpoint=\S+:\d+ --rdzv_id=" + str(r["jobid"]), log)
    assert "requeueing" not in log and "state=finished" in log


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes(uninterrupted, tiny_model_dir, shards, tmp_path_factory):
    """USR1 to the batch shell early in training -> checkpoint + "stopped" -> scontrol requeue -> the same job runs
    again (SLURM_RESTART_COUNT=1), resumes from the checkpoint and ends with the uninterrupted run's losses."""
    work = tmp_path_factory.mktemp("sbatch_requeue")
    run_dir = work / "run"
    env = job_env(tiny_model_dir, shards, run_dir, NPROC="2")
    jobid = submit(work, env, ["--max-steps", str(STEPS), *TRAIN_FLAGS])

    def trained_a_step():
        return (run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= 1
    wait_for("the first training step", trained_a_step, 180, jobid, work, every=0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(jobid)], check=True)

    def requeued():
        info = job_info(jobid)
        return info if info.get("Restarts") == "1" else None
    info = wait_for("the requeue", requeued, 120, jobid, work, every=0.2)
    if info.get("JobState") == "PENDING":
        # SLURM holds a requeued job ~2 minutes (BeginTime) before it is eligible again; lift the hold, but only
        # once the node has finished completing the old instance: started while it still completes, the new one is
        # killed ("Killing non-startable batch JobId=15: Job credential revoked", seen once in ten runs here).
        wait_for("the node to finish the old instance", node_idle, 60, jobid, work, every=0.2)
        # slurmd compares a new launch credential's creation time with the old one's revocation in whole seconds:
        # allocated within the second of the requeue, the new instance was still killed as "credential revoked"
        # (slurmctld.log, 2026-12-02: requeue at :03.327, hold lifted at :03.423 with the node idle, killed at :03.612)
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], check=True)
    stopped = re.search(r"status\.json: state=stopped step=(\d+)", job_log(work, jobid))
    assert stopped, job_log(work, jobid)[-4000:]
    k = int(stopped.group(1))
    assert 1 <= k < STEPS
    assert (run_dir / "checkpoints" / f"step-{k:07d}" / "trainer_state.json").is_file()

    info = wait_done(jobid, work)
    log = job_log(work, jobid)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["Restarts"] == "1"
    st = status(run_dir)
    assert st["state"] == "finished" and st["step"] == STEPS
    # one log for both runs (--open-mode=append)
    assert "finetune.sbatch: SLURM_RESTART_COUNT=0" in log and "finetune.sbatch: SLURM_RESTART_COUNT=1" in log
    assert "finetune.sbatch: USR1 at" in log
    assert f"state=stopped step={k}" in log and f"requeueing job {jobid} (restart 1); it resumes from step {k}" in log
    assert f"step-{k:07d} (step {k})" in log  # finetune.py's "resume from .../step-000000k (step k)"
    assert_env_printed(log)

    ref, got = train_losses(uninterrupted["run"]), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= LOSS_ATOL, (step, got[step], ref[step])
    assert abs(final_val_loss(run_dir) - final_val_loss(uninterrupted["run"])) <= LOSS_ATOL
    a, b = adapter_tensors(run_dir), adapter_tensors(uninterrupted["run"])
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].float() - b[name].float()).abs().max().item() <= 1e-5, name


# ----------------------------------------------------------------------------------------------- no SLURM
@pytest.mark.slow
def test_bash_outside_slurm_stops_and_resumes(tiny_model_dir, shards, tmp_path):
    """`bash finetune.sbatch` on a machine without SLURM or GPUs: 1 process on CPU by default; USR1 to the script
    stops training at a checkpoint (no requeue outside SLURM) and the same command resumes and finishes."""
    run_dir = tmp_path / "run"
    env = job_env(tiny_model_dir, shards, run_dir, CUDA_VISIBLE_DEVICES="")
    env.pop("NPROC", None)
    cmd = ["bash", str(SBATCH), "--max-steps", "6", *TRAIN_FLAGS]
    log1 = tmp_path / "first.log"
    with open(log1, "w") as f:
        p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not ((run_dir / "metrics.jsonl").is_file() and train_losses(run_dir)):
            assert p.poll() is None, log1.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "no training step within 180 s:\n" + log1.read_text(errors="replace")[-4000:]
            time.sleep(0.2)
        p.send_signal(signal.SIGUSR1)
        assert p.wait(timeout=120) == 0, log1.read_text(errors="replace")[-4000:]
    finally:
        if p.poll() is None:
            p.kill()
    first = log1.read_text(errors="replace")
    assert "job none (not under SLURM)" in first and "1 node(s) x 1 process(es) (0 GPU(s)" in first
    assert "--standalone" in first and "srun" not in first
    assert_env_printed(first)
    st = status(run_dir)
    assert st["state"] == "stopped" and st["step"] < 6, st
    assert f"stopped at step {st['step']}; run the same command again to resume" in first

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    st = status(run_dir)
    assert st["state"] == "finished" and st["step"] == 6
    assert sorted(train_losses(run_dir)) == list(range(1, 7))
    assert adapter_tensors(run_dir)


@pytest.mark.slow
def test_usr1_during_setup_still_stops_at_a_checkpoint(tiny_model_dir, shards, tmp_path):
    """USR1 before training starts (while the script loads the environment) is kept, not fatal: training stops at
    its first step boundary with a checkpoint, instead of the shell dying (bash's default) or the request being lost."""
    run_dir = tmp_path / "run"
    env = job_env(tiny_model_dir, shards, run_dir, CUDA_VISIBLE_DEVICES="")
    env.pop("NPROC", None)
    log = tmp_path / "early.log"
    with open(log, "w") as f:
        p = subprocess.Popen(["bash", str(SBATCH), "--max-steps", "6", *TRAIN_FLAGS], env=env, cwd=tmp_path,
                             stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "finetune.sbatch: job none" not in log.read_text(errors="replace"):  # printed after the trap is set, before setup
            assert p.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)
        early = "finetune.sbatch: run:" not in log.read_text(errors="replace")
        assert p.wait(timeout=300) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if p.poll() is None:
            p.kill()
    assert early, "the signal came after the launch; this test is meant for the setup phase"
    out = log.read_text(errors="replace")
    assert "finetune.sbatch: USR1 at" in out
    st = status(run_dir)
    assert st["state"] == "stopped" and 1 <= st["step"] < 6, st
    assert (run_dir / "checkpoints" / f"step-{st['step']:07d}" / "trainer_state.json").is_file()
    assert f"stopped at step {st['step']}; run the same command again to resume" in out


# ----------------------------------------------------------------------------------------------- static checks
# (last in the file: on a fresh CI machine tests/slurm_cluster.sh installs shellcheck along with SLURM)
def test_script_syntax_and_directives():
    """bash -n clean, and every #SBATCH line before the first command (sbatch silently ignores later ones)."""
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command, "an #SBATCH line comes after the first command"
    text = "\n".join(lines[i] for i in directives)
    for want in ("--gres=gpu:a100:4", "--ntasks-per-node=1", "--cpus-per-task=72", "--signal=B:USR1@", "--requeue",
                 "--open-mode=append", "--output=logs/%x-%j.out", "--time=24:00:00"):
        assert want in text, want


def repo_dir_found(script: Path, workdir: Path, **env_extra) -> subprocess.CompletedProcess:
    """Run the batch script up to its venv check (VENV points nowhere, so it stops there, before anything heavy):
    its error names the REPO_DIR the script settled on, or says it found no finetune.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "REPO_DIR", "VENV"))}
    env.update(RUN_DIR=str(workdir / "run"), VENV=str(workdir / "no-venv"), PREREQ_MODULES="", **env_extra)
    return subprocess.run(["bash", str(script)], env=env, cwd=workdir, capture_output=True, text=True, timeout=60)


def test_sbatch_finetune_is_the_same_script(tmp_path):
    """`sbatch finetune`, the users' command from their first README: `finetune` is a relative symlink to
    finetune.sbatch (so it works in any clone), and the script finds the checkout through either name, both as
    SLURM runs it (a copy in a spool directory; the submitted path comes from `scontrol show job`) and with bash."""
    link = REPO / "finetune"
    assert link.is_symlink() and os.readlink(link) == "finetune.sbatch"
    assert link.resolve() == SBATCH.resolve()
    found = f"run 'bash install_prereqs' in {REPO} (or set VENV)"

    # outside SLURM: the script's own path
    for name in ("finetune", "finetune.sbatch"):
        p = repo_dir_found(REPO / name, tmp_path)
        assert p.returncode == 1 and found in p.stderr, p.stderr

    # under SLURM: a spool copy of the script, and an scontrol that reports the submitted command
    spool, fakebin = tmp_path / "spool" / "job00042", tmp_path / "bin"
    spool.mkdir(parents=True)
    fakebin.mkdir()
    shutil.copy(SBATCH, spool / "slurm_script")

    def under_slurm(submitted: Path):
        (fakebin / "scontrol").write_text(f"#!/bin/sh\necho '   Command={submitted} --max-steps 5'\n")
        (fakebin / "scontrol").chmod(0o755)
        return repo_dir_found(spool / "slurm_script", tmp_path, SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=str(tmp_path),
                              PATH=f"{fakebin}{os.pathsep}{os.environ['PATH']}")

    for name in ("finetune", "finetune.sbatch"):
        p = under_slurm(REPO / name)
        assert p.returncode == 1 and found in p.stderr, p.stderr
    # control: submitted from a directory without finetune.py, and submitted from there too -> refused, naming it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "finetune").symlink_to(SBATCH)
    p = under_slurm(elsewhere / "finetune")
    assert p.returncode == 1 and f"no finetune.py in REPO_DIR={tmp_path}" in p.stderr, p.stderr


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    p = subprocess.run(["shellcheck", str(SBATCH), str(CLUSTER)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
