"""predict.py's speed on the Llama-3-8B shape (issue 9): today's path beside continuous batching, in one process.

    python bench/bench_predict.py --model /tmp/llama3-8b-random --out $OUT/predict.json   (device_run.sh predict)
    python bench/bench_predict.py --model TINY --out /tmp/p.json --device cpu --prompts 8 --new-tokens 8   (smoke)

Workload (the issue's): 128 plain prompts of 40-120 words, 64 new tokens, greedy, --adapter none and a random non-zero
LoRA adapter (r=64 on the seven projections). Random weights never emit an end token, so every answer runs to 64;
the early-stop workload gives <|eot_id|> the lm_head row of a token the model produces at mixed positions (scaled
by 1 + 2^-6), so each answer ends where that token first appeared, as a trained model's answers end at mixed lengths.

Rows, in this order (each appended to --out as soon as it is measured):
  e2e      predict.main() end to end: default flags on the workload; one --prompt with the defaults and with
           --decode plain (the summary's startup_seconds and tokens/s, and the call's wall time)
  today    --decode plain on the 4-bit model as predict.py loads it: defaults (--batch-size 8; first 16 prompts),
           --batch-size 64; with the adapter; early stop
  new      the NF4 model dequantised in place (timed), then continuous batching: planned batch (the defaults),
           --batch-size 64, early stop, adapter merged (timed), --gpu-memory-gib 40 with 8 samples a prompt and 256
           new tokens (planned slots vs the allocator's measured peak)
  hf_cb    transformers' own continuous batching (generate_batch, paged sdpa) on the same bf16 model, for the record
Each "new" greedy row counts the answers identical to the "today" row of the same workload. A short table is printed
before the hf_cb row (last).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import predict  # noqa: E402
from qlora import decoding  # noqa: E402
from qlora.generation import SamplingConfig, encode_prompts, generate, read_prompts_jsonl  # noqa: E402
from qlora.llama3 import EOT_ID, load_tokenizer  # noqa: E402
from qlora.llama3 import LORA_TARGETS  # noqa: E402
from qlora.memory import CUDA_CONTEXT_BYTES, GiB, projection_shapes  # noqa: E402
from qlora.model import load_base_model  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not but after first new two one their its also who into time other year all there more when been can only "
         "city river music game band film world people school team water light early south north over under").split()
TODAY_DEFAULT_PROMPTS = 16  # today's defaults run ~90 tokens/s: the first 16 prompts show it
DEVICE = torch.device("cuda")  # --device
PROMPT_KW = dict(default_format="plain", system_override=None, default_system=None, prefix_tokens=None, joiner=" ")


def write_prompts(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))),
                                "format": "plain"}) + "\n")


def write_random_adapter(out: Path, model_dir: Path, r: int = 64, seed: int = 0) -> Path:
    """A LoRA adapter as finetune.py saves one (r=64, alpha 16, the seven projections), B non-zero: each merged
    weight moves by ~1% of its size."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    LoraConfig(r=r, lora_alpha=16, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM").save_pretrained(out)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, (n_in, n_out) in projection_shapes(cfg).items():
            module = ("self_attn." if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + name
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, n_in, generator=g, device=DEVICE) / n_in ** 0.5).cpu()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(n_out, r, generator=g, device=DEVICE) * 0.01).cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


class Bench:
    def __init__(self, out: Path):
        self.out, self.rows = out, []

    def record(self, name: str, **fields) -> dict:
        row = {"name": name, **fields}
        self.rows.append(row)
        self.out.write_text(json.dumps(self.rows, indent=1) + "\n")
        print(f"[bench_predict] {json.dumps(row)}", flush=True)
        return row

    def guarded(self, name: str, fn):
        """Run one measurement; a failure is recorded (with its traceback) and the rest goes on."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a bench row must not stop the others
            traceback.print_exc()
            self.record(name, error=f"{type(e).__name__}: {e}")
            return None


def free_cuda() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synced() -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def gib(nbytes) -> float | None:
    return round(nbytes / GiB, 2) if DEVICE.type == "cuda" else None


def tokens_of(samples) -> dict:
    return {(id(s.record), s.index): s.token_ids for s in samples}


def identical(a: dict, b: dict) -> str:
    return f"{sum(a[k] == b.get(k) for k in a)}/{len(a)}"


def run_plain(model, tokenizer, records, batch_size: int, new_tokens: int) -> tuple[dict, dict]:
    start = synced()
    samples = list(generate(model, tokenizer, records, SamplingConfig(max_new_tokens=new_tokens,
                                                                      batch_size=batch_size)))
    seconds = synced() - start
    new = sum(len(s.token_ids) for s in samples)
    return tokens_of(samples), dict(batch_size=batch_size, samples=len(samples), new_tokens=new,
                                    seconds=round(seconds, 2), tokens_per_s=round(new / seconds, 1),
                                    stopped=sum(s.stop_reason == "stop" for s in samples))


def run_continuous(model, tokenizer, records, cfg: SamplingConfig, *, batch_size=None, gpu_memory_gib=None):
    """As predict.main() decodes: plan, make_decoder (timed as startup), generate_continuous (timed)."""
    device = torch.device("cuda", torch.cuda.current_device()) if DEVICE.type == "cuda" else DEVICE
    free_cuda()
    sequences = len(records) * cfg.num_samples
    prompt_lengths = [len(x) for x in encode_prompts(tokenizer, records)]
    max_len = decoding.slot_length(prompt_lengths, cfg.max_new_tokens)
    start = synced()
    plan = decoding.plan_decoding(model, device=device, sequences=sequences, max_len=max_len,
                                  num_samples=cfg.num_samples, batch_size=batch_size, gpu_memory_gib=gpu_memory_gib)
    decoder = decoding.make_decoder(model, plan, device=device, sequences=sequences, max_len=max_len,
                                    max_new_tokens=cfg.max_new_tokens, prompt_lengths=prompt_lengths)
    startup = synced() - start
    start = time.perf_counter()
    samples = list(decoding.generate_continuous(decoder, tokenizer, records, cfg))
    seconds = synced() - start
    new = sum(len(s.token_ids) for s in samples)
    fields = dict(batch_size=decoder.slots, cuda_graph=decoder.graph is not None, samples=len(samples),
                  new_tokens=new, seconds=round(seconds, 2), tokens_per_s=round(new / seconds, 1),
                  startup_seconds=round(startup, 2), decode_steps=decoder.steps,
                  stopped=sum(s.stop_reason == "stop" for s in samples),
                  peak_reserved_gib=gib(torch.cuda.max_memory_reserved()) if DEVICE.type == "cuda" else None,
                  budget_gib=gib(plan.budget_bytes or 0))
    del decoder
    free_cuda()
    return tokens_of(samples), fields


def stop_token(answers: dict, n_new: int) -> int:
    """The token whose first appearance in the answers is most spread out over positions 2..n_new-2 while it appears
    in most answers: replacing it by an end token ends answers at mixed lengths."""
    first: dict[int, list[int]] = {}
    for toks in answers.values():
        seen = set()
        for pos, t in enumerate(toks):
            if t not in seen:
                seen.add(t)
                first.setdefault(t, []).append(pos)
    def spread(t):
        pos = [p for p in first[t] if 2 <= p <= n_new - 2]
        return len(set(pos)) + len(pos) / len(answers)
    return max(first, key=spread)


def set_stop_row(model, token: int | None, saved: dict) -> None:
    """lm_head row of <|eot_id|> := the row of `token` x (1 + 2^-6), so the end token wins where `token` would have
    (its logit is then the largest and positive); None puts the original row back."""
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        if token is None:
            w[EOT_ID] = saved.pop("row")
        else:
            saved["row"] = w[EOT_ID].clone()
            w[EOT_ID] = w[token] * (1 + 2 ** -6)


def e2e(bench: Bench, name: str, argv: list[str], summary: Path) -> None:
    free_cuda()
    start = time.perf_counter()
    predict.main([str(a) for a in argv] + ["--summary", str(summary), "--device", str(DEVICE)])
    wall = synced() - start
    s = json.loads(summary.read_text())
    bench.record(name, wall_seconds=round(wall, 2), **{k: s[k] for k in (
        "samples", "new_tokens", "seconds", "tokens_per_s", "startup_seconds", "decode", "weights", "batch_size")},
        cuda_graph=s.get("cuda_graph"))
    free_cuda()


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-hf-cb", action="store_true", help="leave out transformers' generate_batch row")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end predict.py rows")
    args = ap.parse_args()
    DEVICE = torch.device(args.device)
    bench = Bench(args.out)
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, args.prompts)
    adapter = write_random_adapter(work / "adapter", args.model)
    tokenizer = load_tokenizer(args.model)
    records = read_prompts_jsonl(prompts, **PROMPT_KW)
    lengths = [len(x) for x in encode_prompts(tokenizer, records)]
    n_new = args.new_tokens
    bench.record("workload", prompts=len(records), prompt_tokens_min=min(lengths), prompt_tokens_max=max(lengths),
                 new_tokens=n_new, torch=torch.__version__, transformers=__import__("transformers").__version__,
                 gpu=torch.cuda.get_device_name() if DEVICE.type == "cuda" else None)
    first = json.loads(prompts.read_text().splitlines()[0])["prompt"]
    common = ["--model", args.model, "--max-new-tokens", n_new, "--output", work / "out.jsonl"]

    # ---- end to end, as a researcher runs it
    bench.guarded("e2e defaults", lambda: e2e(bench, "e2e defaults", [*common, "--adapter", "none", "--input", prompts],
                                              work / "s1.json"))
    bench.guarded("e2e one --prompt", lambda: e2e(bench, "e2e one --prompt", [
        *common, "--adapter", "none", "--prompt", first, "--format", "plain"], work / "s2.json"))
    bench.guarded("e2e one --prompt, --decode plain", lambda: e2e(bench, "e2e one --prompt, --decode plain", [
        *common, "--adapter", "none", "--prompt", first, "--format", "plain", "--decode", "plain"], work / "s3.json"))

    if args.e2e_only:
        print_table(bench.rows)
        return

    # ---- today's path: generate() on the 4-bit model
    start = synced()
    model = load_base_model(args.model, quantize="nf4", attn_implementation="sdpa", device=DEVICE).eval()
    bench.record("load nf4", seconds=round(synced() - start, 2))
    ref = {}

    def today(name, key, recs, batch):
        ref[key], fields = run_plain(model, tokenizer, recs, batch, n_new)
        bench.record(name, **fields)

    bench.guarded("today defaults", lambda: today("today defaults (batch 8)", "b8", records[:TODAY_DEFAULT_PROMPTS], 8))
    bench.guarded("today b64", lambda: today("today --batch-size 64", "none", records, 64))
    saved = {}
    eos = stop_token(ref["none"], n_new) if "none" in ref else None
    if eos is not None:
        set_stop_row(model, eos, saved)
        bench.guarded("today early stop", lambda: today(f"today --batch-size 64, early stop (token {eos})", "stop",
                                                        records, 64))
        set_stop_row(model, None, saved)

    def today_adapter():
        from peft import PeftModel

        nonlocal model
        wrapped = PeftModel.from_pretrained(model, str(adapter)).eval()
        ref["adapter"], fields = run_plain(wrapped, tokenizer, records, 64, n_new)
        bench.record("today --batch-size 64, adapter", **fields)
        model = wrapped.unload()

    bench.guarded("today adapter", today_adapter)

    # ---- continuous batching on the NF4 weights dequantised once (what predict.main does by default)
    start = synced()
    model = model.dequantize(dtype=model.get_input_embeddings().weight.dtype)
    free_cuda()
    bench.record("dequantize nf4", seconds=round(synced() - start, 2),
                 allocated_gib=gib(torch.cuda.memory_allocated()) if DEVICE.type == "cuda" else None)
    greedy = SamplingConfig(max_new_tokens=n_new)

    def new(name, key, cfg=greedy, **kw):
        try:
            got, fields = run_continuous(model, tokenizer, records, cfg, **kw)
        except Exception as e:  # noqa: BLE001 - record a failed CUDA graph and measure the eager step instead
            if decoding.GRAPH_MIN_STEPS > 10**8:
                raise
            traceback.print_exc()
            bench.record(name, error=f"{type(e).__name__}: {e}")
            decoding.GRAPH_MIN_STEPS = 10**9
            name += " (eager: the CUDA graph failed)"
            got, fields = run_continuous(model, tokenizer, records, cfg, **kw)
        return bench.record(name, **fields, identical_to_today=identical(got, ref[key]) if key in ref else None)

    bench.guarded("new planned", lambda: new("new defaults (planned batch)", "none"))
    bench.guarded("new b64", lambda: new("new --batch-size 64", "none", batch_size=64))
    if eos is not None:
        set_stop_row(model, eos, saved)
        bench.guarded("new early stop", lambda: new(f"new defaults, early stop (token {eos})", "stop"))
        bench.guarded("new early stop b64", lambda: new("new --batch-size 64, early stop", "stop", batch_size=64))
        set_stop_row(model, None, saved)

    def sampled_40gib():
        cfg = SamplingConfig(max_new_tokens=4 * n_new, temperature=1.0, top_p=0.95, num_samples=8, seed=0)
        row = new(f"new --gpu-memory-gib 40, 8 samples x {4 * n_new} tokens", None, cfg,
                  gpu_memory_gib=40 if DEVICE.type == "cuda" else None)
        if row.get("peak_reserved_gib") is not None:
            bench.record("planned for an A100-40GB", budget_gib=row["budget_gib"],
                         peak_with_context_gib=round(row["peak_reserved_gib"] + CUDA_CONTEXT_BYTES / GiB, 2))

    bench.guarded("new 40 GiB", sampled_40gib)

    def merged_adapter():
        from peft import PeftModel

        nonlocal model
        start = synced()
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
        free_cuda()
        bench.record("merge adapter", seconds=round(synced() - start, 2))
        new("new defaults, adapter merged", "adapter")

    bench.guarded("new adapter", merged_adapter)

    def hf_continuous_batching():
        from transformers import GenerationConfig

        from qlora.generation import PAD_ID, STOP_IDS

        model.set_attn_implementation("sdpa")  # generate_batch picks its paged variant of the model's attention
        gen = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID)
        free_cuda()
        start = synced()
        out = model.generate_batch(inputs=encode_prompts(tokenizer, records), generation_config=gen)
        seconds = synced() - start
        new_tokens = sum(len(o.generated_tokens) for o in out.values())
        bench.record("transformers generate_batch (first call, adapter merged)", samples=len(out),
                     new_tokens=new_tokens, seconds=round(seconds, 2), tokens_per_s=round(new_tokens / seconds, 1))

    print_table(bench.rows)  # before transformers' row: its first call may take long (a timeout then loses nothing)
    if not args.skip_hf_cb:
        bench.guarded("hf generate_batch", hf_continuous_batching)

    def equality_fp32():
        """Random bf16 weights give near-tied logits, so any change of kernel or batch shape flips some greedy
        tokens (bf16 rows above); in fp32 both paths must give the same answers on the 8B shape."""
        from transformers import AutoModelForCausalLM

        nonlocal model
        del model
        free_cuda()
        fp32 = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32,
                                                    device_map={"": DEVICE} if DEVICE.type == "cuda" else "cpu")
        fp32.eval()
        cfg = SamplingConfig(max_new_tokens=32)
        want, _ = run_plain(fp32, tokenizer, records, 64, 32)
        got, fields = run_continuous(fp32, tokenizer, records, cfg)
        bench.record("fp32 weights: continuous vs generate() batch 64, 32 new tokens", **fields,
                     identical_to_today=identical(got, want))

    bench.guarded("fp32 equality", equality_fp32)


def print_table(rows: list[dict]) -> None:
    print("\n| row | tokens/s | new tokens | s | startup s | batch | graph | identical to today | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" not in r and "error" not in r:
            continue
        cells = [r.get("tokens_per_s", r.get("error", "")), r.get("new_tokens", ""), r.get("seconds", ""),
                 r.get("startup_seconds", ""), r.get("batch_size", ""), r.get("cuda_graph", ""),
                 r.get("identical_to_today", ""), r.get("peak_reserved_gib", "")]
        print(f"| {r['name']} | " + " | ".join(str(c) for c in cells) + " |")
    for r in rows:
        if "tokens_per_s" not in r and "error" not in r:
            print(f"{r['name']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "name"))


if __name__ == "__main__":
    main()
