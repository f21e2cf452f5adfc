"""Outputs of the data stages (qlora/atomic.py through data_processing.py and pretokenize.py): an output directory
that holds an input or something else of the user's is refused, files get the umask's permissions, an interrupted
or killed run leaves no temporary behind, and a full disk or an output that cannot be created is one line."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data_processing
import pretokenize
from qlora.atomic import HOST, atomic_dir, check_output_dir, write_json_atomic
from qlora.errors import UserError, run_main
from qlora.llama3 import format_plain

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample"
VOCAB = SAMPLE / "vocab.json"


def fails(capsys, main, *args) -> str:
    """A script's main as its __main__ runs it: exit status 2 and ONE line on stderr; returns the message."""
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main([str(a) for a in args]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0].split(": error: ", 1)[1]


def temporaries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def stage1_output(d: Path) -> Path:
    assert data_processing.main(["--vocab", str(VOCAB), "--input", str(SAMPLE / "sequences.npy"),
                                 "--output-dir", str(d)]) == 0
    return d


# ------------------------------------------------------------------------------------------------------------------
# check_output_dir


def test_check_output_dir_refuses_what_replacing_would_lose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "deep").mkdir()
    (tmp_path / "data" / "deep" / "v.json").write_text("{}")
    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "data" / "link.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")

    def refused(path, inputs, match):
        with pytest.raises(UserError, match=match) as e:
            check_output_dir(path, inputs, stage="demo")
        assert "\n" not in str(e.value)

    refused("data", {"--vocab": "data/deep/v.json"}, r"^--output-dir data: holds the input --vocab data/deep/v\.json")
    refused("data", {"--input": ["x.npy", "data"]}, r"^--output-dir data: is the input --input data")
    refused("data/deep/out", {"--input": "data"}, r"lies inside the input --input data")
    refused("data", {"--vocab": "data/link.json"}, r"holds the input --vocab data/link\.json")  # the link itself
    refused(".", {}, r"^--output-dir \.: holds the working directory")
    refused(tmp_path, {}, r"holds the working directory")
    refused("afile", {}, r"^--output-dir afile: exists and is not a directory")
    refused("afile/out/x", {}, r"^--output-dir afile/out/x: cannot be created, .*afile is a file")
    refused("notes", {}, r'^--output-dir notes: exists and is not a demo output \(its metadata\.json does not say '
                         r'"stage": "demo"\); refusing to replace it')
    # an output that is a symlink to the input's directory
    (tmp_path / "out_link").symlink_to(tmp_path / "data")
    refused("out_link", {"--vocab": "data/deep/v.json"}, r"holds the input --vocab data/deep/v\.json")

    # accepted: a new path (parents created later), an empty directory, an earlier output of the stage
    check_output_dir("new/deeper/out", {"--input": "data"}, stage="demo")
    (tmp_path / "empty").mkdir()
    check_output_dir("empty", {"--input": "data"}, stage="demo")
    (tmp_path / "notes" / "metadata.json").write_text(json.dumps({"stage": "demo"}))
    check_output_dir("notes", {"--input": "data", "--unused": None}, stage="demo")
    (tmp_path / "notes" / "metadata.json").write_text(json.dumps({"made_by": "demo.py"}))
    refused("notes", {}, "is not a demo output")
    check_output_dir("notes", {}, stage="demo", marker={"stage": "demo", "made_by": "demo.py"})
    (tmp_path / "notes" / "metadata.json").write_text("[1, 2]")
    refused("notes", {}, "is not a demo output")


def test_a_previous_output_holding_an_input_is_refused_and_kept(tmp_path, capsys):
    """The vocabulary copied into an earlier output, an input in a subfolder of it: both were deleted before."""
    out = stage1_output(tmp_path / "out")
    shutil.copy(VOCAB, out / "vocab.json")
    (out / "raw").mkdir()
    shutil.copy(SAMPLE / "sequences.npy", out / "raw" / "seq.npy")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    msg = fails(capsys, data_processing.main, "--vocab", out / "vocab.json", "--input", SAMPLE / "sequences.npy",
                "--output-dir", out)
    assert msg == (f"--output-dir {out}: holds the input --vocab {out}/vocab.json, which replacing the output would "
                   f"delete; choose another output directory")
    msg = fails(capsys, data_processing.main, "--vocab", VOCAB, "--input", out / "raw" / "*.npy", "--output-dir", out)
    assert msg.startswith(f"--output-dir {out}: holds the input --input {out}/raw/seq.npy")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # control: the same command with the inputs outside replaces the earlier output
    assert data_processing.main(["--vocab", str(VOCAB), "--input", str(SAMPLE / "sequences.npy"),
                                 "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "train.jsonl", "validation.jsonl"]


def test_pretokenize_refuses_an_output_holding_its_input_or_tokenizer(tmp_path, capsys, llama3_tokenizer_json):
    tok = tmp_path / "tok"
    (tok / "data").mkdir(parents=True)
    (tok / "data" / "train.jsonl").write_text(json.dumps({"text": format_plain("hello")}) + "\n")
    (tok / "metadata.json").write_text(json.dumps({"created_by": "pretokenize.py"}))  # an output of today's code
    msg = fails(capsys, pretokenize.main, "--input", tok / "data", "--tokenizer", llama3_tokenizer_json,
                "--output-dir", tok)
    assert msg.startswith(f"--output-dir {tok}: holds the input --input {tok}/data")
    shutil.copy(llama3_tokenizer_json, tok / "tokenizer.json")
    msg = fails(capsys, pretokenize.main, "--input", tmp_path / "nowhere", "--tokenizer", tok / "tokenizer.json",
                "--output-dir", tok)
    assert msg == f"--input {tmp_path / 'nowhere'}: no such directory"  # the input is checked first
    shutil.copytree(tok / "data", tmp_path / "data")
    msg = fails(capsys, pretokenize.main, "--input", tmp_path / "data", "--tokenizer", tok / "tokenizer.json",
                "--output-dir", tok)
    assert msg.startswith(f"--output-dir {tok}: holds the input --tokenizer {tok}/tokenizer.json")
    msg = fails(capsys, pretokenize.main, "--input", tmp_path / "data", "--tokenizer", llama3_tokenizer_json,
                "--output-dir", tmp_path / "data" / "tok")
    assert msg.startswith(f"--output-dir {tmp_path / 'data' / 'tok'}: lies inside the input --input")
    assert (tok / "data" / "train.jsonl").is_file() and (tok / "tokenizer.json").is_file()


def test_output_under_a_file_is_one_line(tmp_path, capsys, llama3_tokenizer_json):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train.jsonl").write_text(json.dumps({"text": format_plain("hello")}) + "\n")
    for main, args in [(data_processing.main, ["--vocab", VOCAB, "--input", SAMPLE / "sequences.npy"]),
                       (pretokenize.main, ["--input", tmp_path / "in", "--tokenizer", llama3_tokenizer_json])]:
        msg = fails(capsys, main, *args, "--output-dir", tmp_path / "afile" / "out")
        assert msg == f"--output-dir {tmp_path}/afile/out: cannot be created, {tmp_path}/afile is a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in"]


# ------------------------------------------------------------------------------------------------------------------
# Permissions and temporaries


def test_atomic_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o002)
    try:
        write_json_atomic(tmp_path / "status.json", {"a": 1})
        with open(tmp_path / "plain.json", "w") as f:  # what the outputs must match
            f.write("{}")
        with atomic_dir(tmp_path / "out") as d:
            (d / "x").write_text("x")
        os.umask(0o077)
        write_json_atomic(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("plain.json") == 0o664 and mode("status.json") == 0o664
    assert mode("out") == 0o775 and mode("out/x") == 0o664
    assert mode("private.json") == 0o600
    assert json.loads((tmp_path / "status.json").read_text()) == {"a": 1} and temporaries(tmp_path) == []


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_of_dead_processes_are_removed_on_the_next_run(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    out = tmp_path / "out"
    stale = [f".out.tmp-{dead}", f".out.tmp-{HOST}-{dead}", f".out.old-{HOST}-{dead}"]  # the first: today's names
    kept = [f".out.tmp-{HOST}-{alive}", f".out.tmp-othernode-{dead}", ".other.tmp-1", ".out.tmp-notes"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard").write_text("x")
    out.mkdir()
    with atomic_dir(out) as d:
        (d / "new").write_text("new")
    assert temporaries(tmp_path) == sorted(kept)
    assert [p.name for p in out.iterdir()] == ["new"]
    # killed between the two renames of a swap: the output is missing and the old one was moved aside
    shutil.rmtree(out)
    (tmp_path / f".out.old-{HOST}-{dead}").mkdir()
    (tmp_path / f".out.old-{HOST}-{dead}" / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out):
            raise RuntimeError("a failed run must leave the restored output as it was")
    assert [p.name for p in out.iterdir()] == ["old"] and temporaries(tmp_path) == sorted(kept)
    # files: a killed atomic_file write
    (tmp_path / f".status.json.tmp-{HOST}-{dead}").write_text("half")
    write_json_atomic(tmp_path / "status.json", {})
    assert temporaries(tmp_path) == sorted(kept)


def fifo_run(tmp_path: Path, sig: int):
    """data_processing reading a FIFO: it blocks mid-run with its temporary open, until the signal comes."""
    fifo = tmp_path / "rows.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "data_processing.py", "--vocab", str(VOCAB), "--input", str(fifo),
                             "--output-dir", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    with open(fifo, "w") as writer:
        writer.write("1 4 3 5 2\n" * 100)
        writer.flush()
        deadline = time.time() + 60
        while not temporaries(tmp_path) and time.time() < deadline:
            time.sleep(0.05)
        assert temporaries(tmp_path) == [f".out.tmp-{HOST}-{proc.pid}"]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    return proc.returncode, err, out


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_an_interrupted_stage_removes_its_temporary(tmp_path, sig, code, said):
    returncode, err, out = fifo_run(tmp_path, sig)
    assert (returncode, err) == (code, f"{said}\n")
    assert not out.exists() and temporaries(tmp_path) == []


@pytest.mark.slow
def test_pretokenize_stopped_by_scancel_removes_its_temporary(tmp_path, llama3_tokenizer_json):
    """SIGTERM to the whole process group (as scancel sends it) with tokenizer workers: multiprocessing.Pool hung
    for ever in terminate() once a worker died holding its queue lock, and the executor hung at exit once a worker
    died writing its result (1 in ~8 runs on a loaded machine, until the workers ignored SIGTERM and were stopped by
    the parent: 16 of 16); SIGINT to the group is Ctrl-C."""
    words = "the of and to in is it you that he was for on are with as his they be at one have this".split()
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "train.jsonl", "w") as f:
        for i in range(15000):
            text = " ".join(words[(i + j) % len(words)] for j in range(200))
            f.write(json.dumps({"text": format_plain(text)}) + "\n")
    for sig, code in [(signal.SIGTERM, 143), (signal.SIGINT, 130)]:
        out = tmp_path / f"out{sig}"
        proc = subprocess.Popen([sys.executable, "pretokenize.py", "--input", str(tmp_path / "in"), "--tokenizer",
                                 llama3_tokenizer_json, "--output-dir", str(out), "--num-proc", "2", "--max-len",
                                 "1024", "--chunk-bytes", "100000"],
                                cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 120
        while not list(tmp_path.glob(f".{out.name}.tmp-*/train/*")) and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert not out.exists() and temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------------
# A full disk, a read-only file system: a small tmpfs in a private mount namespace (no root needed where user
# namespaces are allowed; nothing is mounted outside the test's own process).


def in_tmpfs(mount_options: str, dirname: Path, command: list[str]) -> subprocess.CompletedProcess:
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a mount namespace here (unshare -rm)")
    dirname.mkdir()
    script = f'mount -t tmpfs -o {mount_options} tmpfs "$0" && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(dirname), *command], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    proc = in_tmpfs("size=64k", disk, [sys.executable, "data_processing.py", "--vocab", str(VOCAB),
                                       "--input", str(SAMPLE / "sequences.npy"), "--output-dir", f"{disk}/out"])
    assert one_line_error(proc) == f"data_processing.py: error: --output-dir {disk}/out: cannot write (No space " \
                                   f"left on device)"
    # the tmpfs is gone with the namespace; nothing was written to the directory under it
    assert list(disk.iterdir()) == []


def test_read_only_output_is_one_line(tmp_path):
    disk = tmp_path / "ro"
    proc = in_tmpfs("ro", disk, [sys.executable, "data_processing.py", "--vocab", str(VOCAB),
                                 "--input", str(SAMPLE / "sequences.npy"), "--output-dir", f"{disk}/out/data"])
    assert one_line_error(proc) == f"data_processing.py: error: --output-dir {disk}/out/data: cannot be created, " \
                                   f"{disk} is not writable"


@pytest.mark.slow
def test_pretokenize_full_disk_is_one_line(tmp_path, llama3_tokenizer_json):
    (tmp_path / "in").mkdir()
    rng = random.Random(0)
    with open(tmp_path / "in" / "train.jsonl", "w") as f:  # random hex: ~150k tokens that zstd cannot shrink much
        for _ in range(4000):
            f.write(json.dumps({"text": format_plain(f"{rng.getrandbits(256):064x}")}) + "\n")
    disk = tmp_path / "disk"
    proc = in_tmpfs("size=64k", disk, [sys.executable, "pretokenize.py", "--input", str(tmp_path / "in"),
                                       "--tokenizer", llama3_tokenizer_json, "--output-dir", f"{disk}/out",
                                       "--max-len", "256", "--num-proc", "1"])
    assert one_line_error(proc) == f"pretokenize.py: error: --output-dir {disk}/out: cannot write (No space left " \
                                   f"on device)"
