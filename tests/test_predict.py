"""predict.py and qlora/generation.py on CPU with the tiny Llama-3-shaped model.

Covers: prompts formatted exactly as data_processing.py wrote them (token ids compared), left padding giving the
same greedy output as one prompt at a time, stop tokens, the mapping back to hand ids and its scoring, the
--merge-to output (loads without peft, same logits as base + adapter), NF4 dequantised once being the trained
function, the default continuous decoding giving --decode plain's rows, sampling flags, and every one-line error.
qlora/decoding.py's own tests (token-for-token equality, slot refill, memory plan) are tests/test_decoding.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.errors import UserError
from qlora.generation import (PromptRecord, SamplingConfig, completion_to_hand, cut_at_stop, encode_prompts,
                              format_prompt, generate, left_pad, prompt_from_record, read_prompts_jsonl, score)
from qlora.llama3 import BOS, END_OF_TEXT_ID, EOT, EOT_ID, format_chat, load_tokenizer
from qlora.vocab import load_hand_vocab

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import predict  # noqa: E402

PROMPT_KW = dict(default_format=None, system_override=None, default_system=None, prefix_tokens=None, joiner=" ")


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    tokens = ["<pad>", "<s>", "</s>", "<sep>", "C4", "D4", "E4", "F4", "G4", "A4", "B4"]
    path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    return path


@pytest.fixture(scope="module")
def vocab(vocab_file):
    return load_hand_vocab(vocab_file)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _bf16_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()


def _save_adapter(model_dir, out, seed=0):
    """A LoRA adapter on all seven projections with random (non-zero) B, so it changes the model's outputs."""
    import peft

    torch.manual_seed(seed)
    model = _bf16_model(model_dir)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # make the adapter's effect clearly visible in the logits
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(out)
    return Path(out)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return _save_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    """data_processing.py output (chat, with a system prompt) on a small version of the bundled sample task."""
    root = tmp_path_factory.mktemp("sample")
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO, check=True, capture_output=True, text=True)
    run("examples/make_sample_data.py", "--out", str(root / "seq"), "--n", "300")
    run("data_processing.py", "--vocab", str(root / "seq" / "vocab.json"), "--input", str(root / "seq" / "sequences.jsonl"),
        "--output-dir", str(root / "chat"), "--system-prompt", "Transpose the notes.", "--val-fraction", "0.1")
    run("data_processing.py", "--vocab", str(root / "seq" / "vocab.json"), "--input", str(root / "seq" / "sequences.jsonl"),
        "--output-dir", str(root / "plain"), "--format", "plain", "--val-fraction", "0.1")
    return root


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------- prompt formatting
def test_format_prompt_chat_and_plain():
    assert format_prompt("C4 D4", "chat") == format_chat("C4 D4", "X")[: -len("X" + EOT)]
    assert format_prompt("C4 D4", "chat", "sys") == format_chat("C4 D4", "X", "sys")[: -len("X" + EOT)]
    assert format_prompt("C4 D4", "plain") == BOS + "C4 D4"
    with pytest.raises(UserError, match="chat prompts only"):
        format_prompt("C4", "plain", "sys")


def test_prompts_match_training_token_ids(sample_data, tokenizer):
    """The ids the model is fed are exactly the training ids up to the first answer token, for chat (with a system
    prompt, read from data_processing's metadata as predict.py does) and plain (--prefix-tokens)."""
    meta = json.loads((sample_data / "chat" / "metadata.json").read_text())
    system = meta["options"]["system_prompt"]
    chat = read_prompts_jsonl(sample_data / "chat" / "validation.jsonl", **dict(PROMPT_KW, default_system=system))
    lines = [json.loads(x) for x in (sample_data / "chat" / "validation.jsonl").read_text().splitlines()]
    assert len(chat) == len(lines) > 5
    for rec, line in zip(chat, lines):
        assert rec.system == "Transpose the notes." and rec.reference == line["response"]
        full = tokenizer(line["text"], add_special_tokens=False)["input_ids"]
        prompt = encode_prompts(tokenizer, [rec])[0]
        assert full[: len(prompt)] == prompt
        assert tokenizer.decode(full[len(prompt):]) == line["response"] + EOT
        assert prompt.count(128000) == 1 and prompt[0] == 128000

    plain = read_prompts_jsonl(sample_data / "plain" / "validation.jsonl", **dict(PROMPT_KW, prefix_tokens=3))
    lines = [json.loads(x) for x in (sample_data / "plain" / "validation.jsonl").read_text().splitlines()]
    for rec, line in zip(plain, lines):
        full = tokenizer(line["text"], add_special_tokens=False)["input_ids"]
        prompt = encode_prompts(tokenizer, [rec])[0]
        assert full[: len(prompt)] == prompt
        # the model's continuation is " " + reference: the leading joiner is dropped before mapping
        assert tokenizer.decode(full[len(prompt):]) == " " + rec.reference + "<|end_of_text|>"


def test_prompt_records_and_their_errors(tmp_path):
    r = prompt_from_record({"prompt": "C4", "response": "D4", "format": "plain"}, "f:1", **PROMPT_KW)
    assert (r.format, r.model_input, r.reference) == ("plain", BOS + "C4", "D4")
    r = prompt_from_record({"prompt": "C4", "system": "s"}, "f:1", **PROMPT_KW)
    assert r.format == "chat" and r.system == "s"
    r = prompt_from_record({"prompt": "C4", "system": "s"}, "f:1", **dict(PROMPT_KW, system_override="o"))
    assert r.system == "o"
    r = prompt_from_record({"text": BOS + "C4 D4 E4<|end_of_text|>", "format": "plain"}, "f:1",
                           **dict(PROMPT_KW, prefix_tokens=1))
    assert (r.prompt, r.reference) == ("C4", "D4 E4")
    for rec, kw, msg in [
        ({"response": "x"}, {}, r"f:1: record has no \"prompt\" field"),
        ({"prompt": "x", "format": "json"}, {}, r"f:1: \"format\" is 'json'"),
        ({"prompt": 3}, {}, r"f:1: \"prompt\" must be a string"),
        (["x"], {}, "f:1: expected a JSON object"),
        ({"text": BOS + "C4<|end_of_text|>", "format": "plain"}, {}, "f:1: plain record has no \"prompt\"; pass --prefix-tokens"),
        ({"text": BOS + "C4<|end_of_text|>", "format": "plain"}, {"prefix_tokens": 1}, "not more than --prefix-tokens 1"),
        ({"text": "C4", "format": "plain"}, {"prefix_tokens": 1}, "must start with"),
    ]:
        with pytest.raises(UserError, match=msg):
            prompt_from_record(rec, "f:1", **dict(PROMPT_KW, **kw))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "C4"}\n\n{"prompt": "D4"\n')
    with pytest.raises(UserError, match=rf"^{bad}:3: not valid JSON"):
        read_prompts_jsonl(bad, **PROMPT_KW)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="file has no records"):
        read_prompts_jsonl(tmp_path / "empty.jsonl", **PROMPT_KW)
    with pytest.raises(UserError, match="no such file"):
        read_prompts_jsonl(tmp_path / "missing.jsonl", **PROMPT_KW)


# ------------------------------------------------------------------------------------------ mapping and scoring
def test_completion_to_hand_reports_unknown_pieces(vocab):
    ids, unknown, pos = completion_to_hand(vocab, "C4 D4 H9 E4", "chat", " ")
    assert ids == [4, 5, 6] and unknown == ["H9"] and pos == [4, 5, None, 6]
    ids, unknown, pos = completion_to_hand(vocab, " C4  D4\n", "plain", " ")  # model's spacing tolerated
    assert ids == [4, 5] and unknown == [] and pos == [4, 5]
    ids, unknown, pos = completion_to_hand(vocab, ",C4,D4,x", "plain", ",")  # the leading joiner of a continuation
    assert ids == [4, 5] and unknown == ["x"] and pos == [4, 5, None]
    ids, unknown, pos = completion_to_hand(vocab, "C4<|start_header_id|>", "chat", " ")
    assert ids == [] and unknown == ["C4<|start_header_id|>"]
    assert completion_to_hand(vocab, "", "chat", " ") == ([], [], [])


@pytest.mark.parametrize("pred, ref, exact, acc", [
    ([4, 5, 6], [4, 5, 6], True, 1.0),
    ([4, 9, 6], [4, 5, 6], False, 2 / 3),
    ([4, 5], [4, 5, 6], False, 2 / 3),  # missing token
    ([4, 5, 6, 7], [4, 5, 6], False, 3 / 4),  # extra token
    ([4, None, 6], [4, 5, 6], False, 2 / 3),  # unknown piece keeps its position
    ([5, 6], [4, 5, 6], False, 0.0),  # shifted by one: nothing agrees position-wise
    ([], [4, 5], False, 0.0),
    ([], [], True, 1.0),
])
def test_score(pred, ref, exact, acc):
    got_exact, got_acc = score(pred, ref)
    assert got_exact is exact and got_acc == pytest.approx(acc)


def test_cut_at_stop():
    assert cut_at_stop([1, 2, EOT_ID, 3]) == ([1, 2], "stop")
    assert cut_at_stop([1, END_OF_TEXT_ID, EOT_ID]) == ([1], "stop")
    assert cut_at_stop([1, 2]) == ([1, 2], "length")


@pytest.mark.parametrize("kw, msg", [
    (dict(max_new_tokens=0), "--max-new-tokens"), (dict(temperature=-1), "--temperature"),
    (dict(top_p=0), "--top-p"), (dict(top_k=-1), "--top-k"), (dict(num_samples=0), "--num-samples must"),
    (dict(num_samples=2), "needs --temperature > 0"), (dict(batch_size=0), "--batch-size"),
])
def test_sampling_config_errors(kw, msg):
    with pytest.raises(UserError, match=msg):
        SamplingConfig(**kw).validate()


# --------------------------------------------------------------------------------------------------- generation
def _records(prompts, fmt="chat"):
    return [PromptRecord(prompt=p, format=fmt, model_input=format_prompt(p, fmt)) for p in prompts]


PROMPTS = ["C4", "C4 D4 E4 F4 G4 A4 B4 C4 D4 E4 F4 G4", "G4 A4", "B4 B4 B4 B4 D4"]


def _greedy_reference(model, ids, n):
    """Greedy decoding without cache or padding: argmax of a full forward pass, one token at a time."""
    ids = list(ids)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        ids.append(t)
    return out


def test_left_padding_gives_the_same_greedy_output(tiny_model_dir, tokenizer, tmp_path):
    # A Meta-like generation_config.json (do_sample=True, temperature=0.6) must not leak into our greedy decoding.
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": 128001, "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    model = _bf16_model(model_dir)
    records = _records(PROMPTS)
    cfg = SamplingConfig(max_new_tokens=6, batch_size=len(records))
    batched = {s.record.prompt: s.token_ids for s in generate(model, tokenizer, records, cfg)}
    ids, mask = left_pad(encode_prompts(tokenizer, records))
    assert (mask == 0).any(), "prompts of different lengths must be padded"
    for rec in records:
        alone = [s.token_ids for s in generate(model, tokenizer, [rec], SamplingConfig(max_new_tokens=6, batch_size=1))]
        assert batched[rec.prompt] == alone[0]
        # cut_at_stop may have shortened it; the reference decodes the same tokens up to that point
        ref = _greedy_reference(model, encode_prompts(tokenizer, [rec])[0], 6)
        assert ref[: len(alone[0])] == alone[0]


def test_generation_stops_at_eot_and_end_of_text(tiny_model_dir, tokenizer):
    """Force <|eot_id|> for row 0 at its 3rd new token and <|end_of_text|> for row 1 at its 5th; row 2 runs to
    --max-new-tokens. Real transformers generate() with our stop list must end each row there."""
    model = _bf16_model(tiny_model_dir)
    records = _records(["C4", "D4 E4", "F4 G4 A4"])
    calls = {"n": 0}

    def force(_module, _inputs, logits):
        step = calls["n"]  # call 0 = prefill (predicts new token 0)
        calls["n"] += 1
        logits = logits.clone()
        rows = {0: (2, EOT_ID), 1: (4, END_OF_TEXT_ID)}
        for row, (at, tok) in rows.items():
            if step == at:
                logits[row, -1, tok] = 1e4
        return logits

    handle = model.lm_head.register_forward_hook(force)
    try:
        # batch order is by length (longest first): map back by prompt
        recs = sorted(records, key=lambda r: -len(encode_prompts(tokenizer, [r])[0]))
        out = {s.record.prompt: s for s in generate(model, tokenizer, recs, SamplingConfig(max_new_tokens=8, batch_size=3))}
    finally:
        handle.remove()
    first, second, third = (out[r.prompt] for r in recs)
    assert (len(first.token_ids), first.stop_reason) == (2, "stop")
    assert (len(second.token_ids), second.stop_reason) == (4, "stop")
    assert (len(third.token_ids), third.stop_reason) == (8, "length")
    assert EOT_ID not in first.token_ids and END_OF_TEXT_ID not in second.token_ids


def test_sampling_is_seeded_and_num_samples(tiny_model_dir, tokenizer):
    model = _bf16_model(tiny_model_dir)
    records = _records(PROMPTS[:2])
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.5, top_k=50, top_p=0.95, num_samples=3, seed=7, batch_size=2)
    a = [(s.record.prompt, s.index, s.token_ids) for s in generate(model, tokenizer, records, cfg)]
    b = [(s.record.prompt, s.index, s.token_ids) for s in generate(model, tokenizer, records, cfg)]
    assert a == b and len(a) == 6
    assert sorted((p, i) for p, i, _ in a) == sorted((p, i) for p in PROMPTS[:2] for i in range(3))
    assert len({tuple(t) for _, _, t in a}) > 1  # temperature 1.5 on a random model: samples differ


# ------------------------------------------------------------------------------------------------- predict.py CLI
def _run(*argv):
    return predict.main([str(a) for a in argv])


def test_cli_writes_mapped_and_scored_jsonl(tiny_model_dir, adapter_dir, vocab_file, tmp_path):
    inp = _write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "C4 D4", "response": "E4 F4"}, {"prompt": "G4", "response": "A4"},
        {"prompt": "B4 C4 D4 E4 F4", "response": "G4"}, {"prompt": "A4 A4"}])
    out, summ = tmp_path / "out.jsonl", tmp_path / "summary.json"
    assert _run("--model", tiny_model_dir, "--adapter", adapter_dir, "--input", inp, "--vocab", vocab_file, "--eval",
                "--output", out, "--summary", summ, "--max-new-tokens", 4, "--batch-size", 2) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["C4 D4", "G4", "B4 C4 D4 E4 F4", "A4 A4"]  # input order kept
    assert [r["source"] for r in rows] == [f"{inp}:{i}" for i in range(1, 5)]
    for r in rows:
        assert r["sample"] == 0 and r["format"] == "chat" and r["stop_reason"] in ("stop", "length")
        assert isinstance(r["completion"], str) and isinstance(r["completion_ids"], list)
        assert isinstance(r["unknown_pieces"], list)
        assert len(r["completion_ids"]) + len(r["unknown_pieces"]) == len(r["completion"].split())
    assert all("exact_match" in r and 0 <= r["token_accuracy"] <= 1 for r in rows[:3]) and "exact_match" not in rows[3]
    s = json.loads(summ.read_text())
    assert s["samples"] == 4 and s["scored"] == 3
    assert s["exact_match"] == sum(r["exact_match"] for r in rows[:3]) / 3
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary file left
    # how it decoded: the defaults (continuous batching of NF4 dequantised once, adapter merged), --batch-size 2
    assert (s["decode"], s["weights"], s["adapter"], s["batch_size"], s["cuda_graph"]) == (
        "continuous", "nf4 dequantized to float32", "merged", 2, False)
    assert s["startup_seconds"] > 0 and s["tokens_per_s"] > 0 and s["reference_loss_seconds"] > 0


def test_cli_continuous_and_plain_decoding_give_the_same_answers(stopping_model_dir, tmp_path):
    """predict.py's default decoding and --decode plain (generate()), same bf16 weights and batch size: the same
    rows, answers ending at <|eot_id|> at mixed lengths included. (A different batch size can flip a bf16 near-tie
    of this random model in either path; qlora/decoding.py's tests compare token for token in fp32.)"""
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": p, "format": f} for p in PROMPTS + ["A4 B4 C4", "D4"]
                                               for f in ("chat", "plain")])
    common = ["--model", stopping_model_dir, "--adapter", "none", "--input", inp, "--max-new-tokens", 12,
              "--quantize", "none", "--batch-size", 8]
    rows = {}
    for decode in ("continuous", "plain"):
        out, summ = tmp_path / f"{decode}.jsonl", tmp_path / f"{decode}.json"
        assert _run(*common, "--decode", decode, "--output", out, "--summary", summ) == 0
        rows[decode] = [json.loads(x) for x in out.read_text().splitlines()]
        s = json.loads(summ.read_text())
        assert (s["decode"], s["weights"], s["adapter"], s["batch_size"]) == (decode, "float32", "none", 8)  # CPU: fp32 compute
    assert rows["continuous"] == rows["plain"] and len(rows["plain"]) == 12
    assert {r["stop_reason"] for r in rows["plain"]} == {"stop", "length"}  # control: mixed lengths


def test_cli_adapter_none_and_run_dir_and_stdout(tiny_model_dir, adapter_dir, tmp_path, capsys):
    """--adapter none is the bare base; a run directory's config.json supplies the format (plain here)."""
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    (run / "config.json").write_text(json.dumps({"config": {"model": str(tiny_model_dir)},
                                                 "data_metadata": {"format": "plain"}}))
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 1, "max_steps": 1}))
    assert _run("--model", tiny_model_dir, "--adapter", run, "--prompt", "C4 D4", "--max-new-tokens", 3) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["format"] == "plain" and row["prompt"] == "C4 D4" and "completion_ids" not in row
    # a checkpoint of the run (RUN/checkpoints/step-N/adapter) finds the run's config.json three levels up
    shutil.copytree(adapter_dir, run / "checkpoints" / "step-0000001" / "adapter")
    assert _run("--model", tiny_model_dir, "--adapter", run / "checkpoints" / "step-0000001", "--prompt", "C4 D4",
                "--max-new-tokens", 3) == 0
    assert json.loads(capsys.readouterr().out) == row
    assert _run("--model", tiny_model_dir, "--adapter", "none", "--prompt", "C4 D4", "--format", "plain",
                "--max-new-tokens", 3) == 0
    base_row = json.loads(capsys.readouterr().out)
    # The same prompt through the bare base (4-bit) and a bf16 forward of the same model: greedy tokens agree on
    # the first token at least; the adapter (random B) must change the output.
    assert base_row["completion"] != row["completion"]


def test_untrained_adapter_equals_base(tiny_model_dir, tmp_path, capsys):
    """A freshly initialised LoRA adapter (B = 0) gives exactly the base model's samples: the step-0 baseline."""
    import peft

    pm = peft.get_peft_model(_bf16_model(tiny_model_dir), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "a0")
    common = ["--model", tiny_model_dir, "--prompt", "C4 D4 E4", "--max-new-tokens", 6, "--quantize", "none"]
    _run(*common, "--adapter", tmp_path / "a0")
    with_adapter = json.loads(capsys.readouterr().out)
    _run(*common, "--adapter", "none")
    assert json.loads(capsys.readouterr().out) == with_adapter


def test_merge_to_loads_without_peft_and_matches(tiny_model_dir, adapter_dir, tmp_path):
    """Merged bf16 model vs base (bf16) + adapter: same logits within bf16 rounding of the merged weights.

    Tolerance: max |difference| <= 0.05 on logits of magnitude ~1 (each merged weight W + BA is rounded once to
    bf16, relative error 2^-8, accumulated over two layers); the argmax agrees at >= 90% of positions (measured: max diff 0.012, 98% argmax agreement, adapter effect 1.3).
    """
    from peft import PeftModel

    out = tmp_path / "merged"
    assert _run("--model", tiny_model_dir, "--adapter", adapter_dir, "--merge-to", out) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    # Loads in a fresh interpreter where importing peft fails.
    code = ("import sys; sys.modules['peft'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "assert not any('lora' in n for n, _ in m.named_parameters())\n"
            "print(type(m).__name__, next(m.parameters()).dtype)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LlamaForCausalLM torch.bfloat16" in res.stdout

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    with_adapter = PeftModel.from_pretrained(_bf16_model(tiny_model_dir), str(adapter_dir)).eval()
    base = _bf16_model(tiny_model_dir)
    x = torch.randint(0, 128000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = merged(x).logits.float(), with_adapter(x).logits.float(), base(x).logits.float()
    assert (a - b).abs().max() <= 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9  # near-ties of a random model may flip
    assert (b - c).abs().max() > 0.2  # the adapter really changes the model, so the comparison means something


def test_dequantized_nf4_is_the_trained_function(tiny_model_dir, adapter_dir):
    """The default decoder's weights: NF4 dequantised once is exactly what every training matmul computes with
    (bitsandbytes dequantises, then a bf16 matmul), and merging the adapter into them changes the result only by one
    bf16 rounding of each merged weight (tolerances as test_merge_to_loads_without_peft_and_matches)."""
    from peft import PeftModel

    from qlora.model import load_base_model

    def training_kernel(model):  # the Linear4bit path training runs (not bitsandbytes' CPU inference kernel)
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        return model

    x = torch.randint(0, 128000, (2, 24), generator=torch.Generator().manual_seed(0))
    nf4 = training_kernel(load_base_model(tiny_model_dir, quantize="nf4", device="cpu")).eval()
    dequantized = load_base_model(tiny_model_dir, quantize="nf4", device="cpu").dequantize().eval()
    with torch.no_grad():
        assert torch.equal(nf4(x).logits, dequantized(x).logits)
    trained = PeftModel.from_pretrained(nf4, str(adapter_dir)).eval()
    merged = PeftModel.from_pretrained(dequantized, str(adapter_dir)).merge_and_unload().eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        a, b = merged(x).logits.float(), trained(x).logits.float()
        base = load_base_model(tiny_model_dir, quantize="nf4", device="cpu").dequantize().eval()(x).logits.float()
    assert (a - b).abs().max() <= 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (b - base).abs().max() > 0.2  # control: the adapter changes the model


def test_merge_to_refuses_a_foreign_directory(tiny_model_dir, adapter_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"exists and is not a predict.py --merge-to output \(its merge_info.json does "
                                        r"not say \"stage\": \"merge\"\)"):
        _run("--model", tiny_model_dir, "--adapter", adapter_dir, "--merge-to", tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    # a merge written before merge_info.json had "stage" is still replaced by the next merge
    (tmp_path / "old_merge").mkdir()
    (tmp_path / "old_merge" / "merge_info.json").write_text(json.dumps({"base_model": "b", "dtype": "bfloat16"}))
    predict.check_output_dir(tmp_path / "old_merge", {}, stage="merge", marker=predict.MERGE_MARKER,
                             marker_file=predict.MERGE_INFO)


# ------------------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory):
    """An adapter trained on a differently shaped base (hidden 64)."""
    from qlora.tiny_model import build_tiny_llama3

    root = tmp_path_factory.mktemp("other")
    other = build_tiny_llama3(root / "model", hidden=64, intermediate=128)
    return _save_adapter(other, root / "adapter")


def test_errors(tiny_model_dir, adapter_dir, other_base_adapter, vocab_file, tmp_path):
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "C4"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "C4"}\nnot json\n')
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    run_no_adapter = tmp_path / "run"
    (run_no_adapter / "checkpoints" / "step-0000010").mkdir(parents=True)
    (run_no_adapter / "checkpoints" / "step-0000010" / "trainer_state.json").write_text('{"step": 10}')
    m, a = ["--model", tiny_model_dir], ["--adapter", adapter_dir]
    cases = [
        ([*m, *a], "nothing to do"),
        ([*m, "--adapter", tmp_path / "nope", "--prompt", "C4"], "--adapter .*nope: no such directory"),
        ([*m, "--adapter", no_weights, "--prompt", "C4"], "incomplete adapter, missing: adapter_model.safetensors"),
        ([*m, "--adapter", run_no_adapter, "--prompt", "C4"], "run has no final adapter .*step-0000010"),
        ([*m, "--adapter", tmp_path, "--prompt", "C4"], "neither a run directory"),
        ([*m, "--adapter", other_base_adapter, "--prompt", "C4"], "was trained on another base model"),
        (["--model", tmp_path / "nomodel", *a, "--prompt", "C4"], "--model .*nomodel: no such directory"),
        ([*m, *a, "--input", bad], rf"{bad}:2: not valid JSON"),
        ([*m, *a, "--input", tmp_path / "missing.jsonl"], "--input .*missing.jsonl: no such file"),
        ([*m, *a, "--prompt", "C4", "--vocab", tmp_path / "v.json"], "--vocab .*v.json: no such file"),
        ([*m, *a, "--input", inp, "--eval"], "--eval scores in the hand vocabulary: give --vocab"),
        ([*m, *a, "--prompt", "C4", "--eval", "--vocab", vocab_file], "--eval needs reference responses"),
        ([*m, *a, "--input", inp, "--eval", "--vocab", vocab_file], "no record in .* has a reference"),
        ([*m, *a, "--merge-to", tmp_path / "x", "--quantize", "nf4"], "--merge-to needs the unquantised bf16 base"),
        ([*m, "--adapter", "none", "--merge-to", tmp_path / "x"], "--merge-to needs an adapter"),
        ([*m, *a, "--prompt", "C4", "--num-samples", 2], "needs --temperature > 0"),
        ([*m, *a, "--prompt", "C4", "--prefix-tokens", 0], "--prefix-tokens must be >= 1"),
        ([*m, *a, "--prompt", "C4", "--format", "plain", "--system-prompt", "s"], "chat prompts only"),
        ([*m, *a, "--prompt", "C4", "--gpu-memory-gib", 40, "--device", "cpu"],
         "--gpu-memory-gib 40.0: plans the GPU memory of --decode continuous; give a size > 0, on a GPU"),
        ([*m, *a, "--prompt", "C4", "--batch-size", 0], "--batch-size must be >= 1"),
    ]
    for argv, msg in cases:
        with pytest.raises(UserError, match=msg):
            _run(*argv)
    assert not (tmp_path / "x").exists()


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the base fails the test: what these refuse must be refused before it."""
    import qlora.model

    def load(*a, **k):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(qlora.model, "load_base_model", load)


def test_refused_before_the_base_loads(tiny_model_dir, adapter_dir, vocab_file, tmp_path, no_model_load):
    """Outputs that would replace an input (--output equal to --input replaced the prompts file), outputs that
    cannot be written, a damaged adapter, a reference outside --vocab (found only after all generation was done)
    and the rest: each a one-line error before anything is loaded or generated."""
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "C4", "response": "D4"}])
    refs = _write_jsonl(tmp_path / "refs.jsonl", [{"prompt": "C4", "response": "C4 X9"}])
    plain = _write_jsonl(tmp_path / "plain.jsonl", [{"text": "<|begin_of_text|>C4D4E4", "format": "plain"}])
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    truncated = tmp_path / "truncated"
    shutil.copytree(adapter_dir, truncated)
    with open(truncated / "adapter_model.safetensors", "r+b") as f:
        f.truncate((truncated / "adapter_model.safetensors").stat().st_size - 100)
    small_vocab = tmp_path / "small_vocab"
    shutil.copytree(tiny_model_dir, small_vocab)
    conf = json.loads((small_vocab / "config.json").read_text())
    conf["vocab_size"] = 1000
    (small_vocab / "config.json").write_text(json.dumps(conf))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in [inp, vocab_file, *model.rglob("*"), *adapter_dir.rglob("*")] if p.is_file()}
    m, a = ["--model", model], ["--adapter", adapter_dir]
    cases = [
        ([*m, *a, "--input", inp, "--output", inp], rf"^--output {inp}: is the input --input "),
        ([*m, *a, "--input", inp, "--vocab", vocab_file, "--output", tmp_path / "o.jsonl", "--summary", vocab_file],
         rf"^--summary {vocab_file}: is the input --vocab "),
        ([*m, *a, "--input", inp, "--output", model / "config.json"], r"^--output \S+config.json: lies inside the "
                                                                      r"input --model "),
        ([*m, *a, "--input", inp, "--output", adapter_dir / "x.jsonl"], "lies inside the input --adapter "),
        ([*m, *a, "--input", inp, "--output", tmp_path / "s.json", "--summary", tmp_path / "s.json"],
         "--summary .*s.json: is also --output"),
        ([*m, *a, "--input", inp, "--output", tmp_path], rf"^--output {tmp_path}: is a directory"),
        ([*m, *a, "--input", inp, "--output", tmp_path / "a_file" / "o.jsonl"], "cannot be created, .*a_file is a file"),
        ([*m, *a, "--merge-to", tmp_path / "a_file"], rf"^--merge-to {tmp_path / 'a_file'}: exists and is not a "
                                                      r"directory"),
        ([*m, *a, "--merge-to", tmp_path / "merged"], "is not a predict.py --merge-to output"),
        ([*m, *a, "--merge-to", model], rf"^--merge-to {model}: is the input --model "),
        ([*m, "--adapter", truncated, "--prompt", "C4"],
         r"^--adapter \S+truncated: adapter_model.safetensors is damaged \(.*incomplete metadata"),
        ([*m, *a, "--input", refs, "--eval", "--vocab", vocab_file],
         r"refs.jsonl:1: reference response has pieces not in --vocab: \['X9'\]"),
        ([*m, *a, "--input", plain, "--prefix-tokens", 1, "--joiner", ""],
         "^--prefix-tokens splits each text into hand tokens at the joiner, and --joiner is empty"),
        (["--model", small_vocab, *a, "--prompt", "C4"],
         r"^--model \S+small_vocab: config.json has vocab_size 1000, but its tokenizer.json has 128256 ids"),
    ]
    for argv, msg in cases:
        with pytest.raises(UserError, match=msg):
            _run(*argv)
    assert {p: p.read_bytes() for p in before} == before
    assert (tmp_path / "merged" / "notes.txt").read_text() == "mine"


def test_error_is_one_line_with_exit_code_2(tiny_model_dir, tmp_path):
    res = subprocess.run([sys.executable, "predict.py", "--model", str(tiny_model_dir), "--adapter",
                          str(tmp_path / "missing"), "--prompt", "C4"], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("predict.py: error: --adapter ") and "Traceback" not in res.stderr


@pytest.mark.parametrize("device, msg", [
    ("foo", "--device foo: not a device; give cpu, cuda or cuda:N"),
    ("cuda", "--device cuda: no CUDA GPU is visible to this process"),
])
def test_device_mistakes_are_one_line_errors(tiny_model_dir, device, msg):
    # CUDA_VISIBLE_DEVICES="" makes the machine CPU-only for torch, so the cuda case holds on a GPU machine too
    res = subprocess.run([sys.executable, "predict.py", "--model", str(tiny_model_dir), "--adapter", "none",
                          "--prompt", "C4", "--device", device], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert [x for x in res.stderr.splitlines() if x.strip()][-1] == f"predict.py: error: {msg}"


def test_resolve_device(monkeypatch):
    assert predict.resolve_device("cpu") == "cpu"
    assert predict.resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    for flag in ("meta", "cuda:x", "", "CUDA"):
        with pytest.raises(UserError, match=rf"^--device {flag}: not a device; give cpu, cuda or cuda:N$"):
            predict.resolve_device(flag)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert predict.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UserError, match=r"^--device cuda:2: only 2 CUDA GPU\(s\) visible \(cuda:0 to cuda:1\)$"):
        predict.resolve_device("cuda:2")


# --------------------------------------------------------------------------------------- hand vocabulary specials
@pytest.fixture(scope="module")
def ambiguous_data(sample_data, tmp_path_factory):
    """The sample vocabulary plus "[PAD]" (two pad tokens: data_processing.py needs --pad-token), and its
    data_processing.py output made with --pad-token '<pad>'."""
    root = tmp_path_factory.mktemp("ambiguous")
    tokens = json.loads((sample_data / "seq" / "vocab.json").read_text())
    tokens["[PAD]"] = max(tokens.values()) + 1
    vocab = root / "v2.json"
    vocab.write_text(json.dumps(tokens))
    subprocess.run([sys.executable, "data_processing.py", "--vocab", str(vocab), "--input",
                    str(sample_data / "seq" / "sequences.jsonl"), "--output-dir", str(root / "data"),
                    "--pad-token", "<pad>", "--val-fraction", "0.05"], cwd=REPO, check=True, capture_output=True)
    return vocab, root / "data"


def test_ambiguous_vocab_evaluates_like_data_processing(tiny_model_dir, adapter_dir, ambiguous_data, tmp_path):
    """A vocabulary that needed --pad-token in data_processing.py: predict.py takes the choice from the metadata.json
    next to --input, and has the same flag for an --input without one."""
    vocab, data = ambiguous_data
    common = ["--model", tiny_model_dir, "--adapter", adapter_dir, "--vocab", vocab, "--eval", "--quantize", "none",
              "--max-new-tokens", 1, "--batch-size", 16]
    out = tmp_path / "out.jsonl"
    assert _run(*common, "--input", data / "validation.jsonl", "--output", out) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all("exact_match" in r for r in rows)

    refs = _write_jsonl(tmp_path / "refs.jsonl", [{"prompt": "C4 D4", "response": "E4"}])
    with pytest.raises(UserError, match=r"several pad tokens \(<pad>, \[PAD\]\); choose one with --pad-token$"):
        _run(*common, "--input", refs, "--output", out)
    assert _run(*common, "--input", refs, "--output", out, "--pad-token", "[PAD]") == 0
    assert "exact_match" in json.loads(out.read_text())


def test_specials_flags_over_run_config_over_input_metadata(ambiguous_data, sample_data):
    vocab, data = ambiguous_data
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["vocab"]["specials"]["pad"]["token"] == "<pad>"

    def names(*flags, trained=None, data_meta=meta):
        args = predict.parse_args(["--model", "m", "--adapter", "none", "--vocab", str(vocab), "--input",
                                   str(data / "validation.jsonl"), *flags])
        return predict.load_vocab(args, trained or {}, None, data_meta).special_names()

    assert names() == {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "sep": "<sep>", "unk": None}
    assert names("--pad-token", "[PAD]")["pad"] == "[PAD]"
    assert names("--sep-token", "") == {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "sep": None, "unk": None}
    # what training recorded (RUN/config.json) wins over the metadata next to --input, a flag over both
    run_vocab = json.loads(json.dumps(meta["vocab"]))
    run_vocab["specials"]["pad"]["token"] = "[PAD]"
    run_vocab["specials"]["sep"]["token"] = None
    trained = {"vocab_sha256": run_vocab["sha256"], "vocab": run_vocab}
    assert names(trained=trained) == {"pad": "[PAD]", "bos": "<s>", "eos": "</s>", "sep": None, "unk": None}
    assert names("--pad-token", "<pad>", trained=trained)["pad"] == "<pad>"
    # a record without the vocabulary's hash may be of another vocabulary: not used, so detection decides
    with pytest.raises(UserError, match=r"several pad tokens \(<pad>, \[PAD\]\); choose one with --pad-token$"):
        names(data_meta={"vocab": {"specials": meta["vocab"]["specials"]}})
    # the wrong --vocab is reported as such, not as its ambiguous pad token
    with pytest.raises(UserError, match="is not the vocabulary .* was made with"):
        names(data_meta=json.loads((sample_data / "chat" / "metadata.json").read_text()))
    with pytest.raises(UserError, match="^--unk-token chooses a special token of the hand vocabulary: give --vocab"):
        predict.parse_args(["--model", "m", "--adapter", "none", "--prompt", "C4", "--unk-token", "<unk>"])


def test_run_config_supplies_system_prompt_and_checks_vocab(tiny_model_dir, adapter_dir, vocab_file, tmp_path, capsys):
    """finetune.py's RUN/config.json carries pretokenize's metadata, which carries data_processing's: the chat
    system prompt and vocabulary hash used in training come from there, and a --vocab that differs is refused."""
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    stage1 = {"options": {"system_prompt": "Transpose.", "joiner": " "}, "vocab": {"sha256": "0" * 64}}
    (run / "config.json").write_text(json.dumps({"config": {"model": str(tmp_path / "elsewhere")},
                                                 "model_config": {"hidden_size": 4096},
                                                 "data_metadata": {"format": "chat", "input": {"metadata": stage1}}}))
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 1, "max_steps": 1}))
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "C4"}, {"prompt": "D4", "system": "Own."}])
    assert _run("--model", tiny_model_dir, "--adapter", run, "--input", inp, "--max-new-tokens", 2) == 0
    out, err = capsys.readouterr()
    assert "warning: the adapter was trained on --model" in err and "config differs in hidden_size" in err
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["C4", "D4"]
    with pytest.raises(UserError, match="is not the vocabulary the adapter was trained with"):
        _run("--model", tiny_model_dir, "--adapter", run, "--input", inp, "--vocab", vocab_file)
    # system prompt: from the run config, a record's own "system" wins, --system-prompt overrides both
    kw = dict(PROMPT_KW, default_system=predict.training_defaults(run)["system"])
    a, b = read_prompts_jsonl(inp, **kw)
    assert (a.system, b.system) == ("Transpose.", "Own.")
    assert a.model_input == format_prompt("C4", "chat", "Transpose.")
    assert read_prompts_jsonl(inp, **dict(kw, system_override="X"))[1].system == "X"


def test_reference_loss_equals_loss_on_pretokenize_labels(sample_data, tiny_model_dir, tokenizer, tmp_path):
    """--eval's reference loss covers exactly the tokens pretokenize.py labels for chat data (the assistant turn
    and its <|eot_id|>): the same sum of cross-entropies as a forward over each packed document with its labels.
    Tolerance 1e-3 relative: same model and tokens, only batching/padding differ (bf16 logits, fp32 loss)."""
    import pyarrow.parquet as pq

    from qlora.generation import reference_losses

    subprocess.run([sys.executable, "pretokenize.py", "--input", str(sample_data / "chat"), "--tokenizer",
                    str(tiny_model_dir), "--output-dir", str(tmp_path / "tok"), "--max-len", "256", "--num-proc", "1"],
                   cwd=REPO, check=True, capture_output=True)
    model = _bf16_model(tiny_model_dir)
    meta = json.loads((sample_data / "chat" / "metadata.json").read_text())
    records = read_prompts_jsonl(sample_data / "chat" / "validation.jsonl",
                                 **dict(PROMPT_KW, default_system=meta["options"]["system_prompt"]))
    ours = reference_losses(model, tokenizer, records, " ", max_tokens=128)  # several right-padded batches
    want_sum, want_n = 0.0, 0
    for row in pq.read_table(tmp_path / "tok" / "validation").to_pylist():
        start = 0
        for n in row["doc_lens"]:
            ids = torch.tensor([row["input_ids"][start:start + n]])
            labels = torch.tensor(row["labels"][start:start + n])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].float()
            want_sum += float(torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum"))
            want_n += int((labels[1:] != -100).sum())
            start += n
    assert sum(n for _, n in ours) == want_n
    assert sum(s for s, _ in ours) == pytest.approx(want_sum, rel=1e-3)
