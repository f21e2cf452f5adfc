"""predict.py: sample from Llama-3 + a QLoRA adapter and map the answers back into the hand vocabulary.

    python predict.py --model Meta-Llama-3-8B --adapter runs/r1 --input data/validation.jsonl \
        --vocab vocab.json --eval --output samples.jsonl

Features, each with its trade-off:
  * --adapter RUN or an adapter directory (RUN/adapter, a checkpoint), or `none` for the base model alone: the
    untrained baseline. RUN/config.json supplies the training format and system prompt, so prompts are built as in
    training; an adapter whose shapes do not fit --model is refused before loading.
  * The weights (--quantize): nf4 (default) is the base training ran on, 4-bit NF4 that every training matmul
    dequantises to bf16; none is the original bf16 base. The default decoder turns NF4 into that bf16 once and
    merges the adapter in (16 GB for the 8B model): the trained function up to one bf16 rounding of each merged
    weight, at bf16 speed. Where that copy would not fit the GPU (e.g. a 70B model on a 40 GB card) it decodes in
    4-bit with the adapter unmerged (slower).
  * Prompts from --prompt, or --input JSONL: the validation.jsonl of data_processing.py or {"prompt": ...} lines.
    Formatted exactly as data_processing.py did (chat: Llama-3 headers with the same system prompt; plain: BOS +
    text), so the model sees the training token ids up to where the answer starts.
  * Continuous batching (--decode continuous, default; qlora/decoding.py): every sequence decodes in its own row of
    a static KV cache, one token per row per step (replayed as a CUDA graph on GPU), and the row of a finished
    answer takes the next prompt at once. As many sequences at once as fit 90% of the GPU's memory (36 GiB of a
    40 GB A100); --batch-size sets it. --decode plain is transformers' generate() on left-padded batches of
    --batch-size prompts with the adapter unmerged, as before: the reference the tests compare with (same greedy
    tokens). Prompts go longest first; the output keeps input order.
    Greedy by default (--temperature 0: deterministic, the right choice for --eval); sampling with --temperature,
    --top-p, --top-k, --num-samples. Stops at <|eot_id|> or <|end_of_text|>, else after --max-new-tokens. A progress
    bar shows new tokens/s and the ETA; the summary records tokens/s and the startup (load, dequantise, merge, CUDA
    graph) separately.
  * --vocab maps each completion back to hand-vocab ids; pieces that are not vocabulary tokens are listed in
    "unknown_pieces", never dropped. Its special tokens are the ones data_processing.py chose (recorded in
    RUN/config.json, else in the metadata.json next to --input), so a vocabulary that needed --pad-token etc. there
    needs nothing here; the same --*-token flags override, e.g. for an --input that is not data_processing output.
    --eval scores against reference responses: exact match and token accuracy (of the generated answer) and the
    reference loss (teacher-forced cross-entropy of the reference answer: for chat data the same tokens
    finetune.py's validation loss covers, and measurable for the untrained base too).
  * --merge-to DIR writes the adapter merged into a bf16 copy of the base, loadable by
    AutoModelForCausalLM.from_pretrained without peft. Merging needs unquantised weights, so with --merge-to the base
    is loaded with --quantize none (bf16); merging into 4-bit weights would re-round them and lose the adapter.
  * Output JSONL written atomically (to a temporary name, then renamed); stdout when --output is not given.
  * Everything that can be checked is checked before the base loads, so no work is thrown away at the end: the
    outputs (--output, --summary, --merge-to: never an input, nor inside an input directory, nor a foreign
    directory), the adapter file, every reference against --vocab (--eval), the model's vocab_size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

from qlora.cpu_kernels import pin_cpu_code_paths

pin_cpu_code_paths()  # before torch loads: the same numbers on AVX2-only and AVX-512 CPUs (qlora/cpu_kernels.py)
from qlora.atomic import check_output_dir, check_output_file  # noqa: E402
from qlora.errors import UserError, run_main  # noqa: E402
from qlora.llama3 import FORMATS  # noqa: E402
from qlora.rundir import ADAPTER_DIR, CONFIG_FILE, checkpoints_dir, run_dir_of_adapter  # noqa: E402
from qlora.vocab import ROLES, add_special_token_flags, load_hand_vocab, special_token_flags  # noqa: E402

# ------------------------------------------------------------------------------------------------- defaults
BATCH_SIZE = 8  # prompts per generate() call with --decode plain; x --num-samples sequences
DECODE = "continuous"
MAX_NEW_TOKENS = 256
TEMPERATURE = 0.0  # 0 = greedy
TOP_P = 1.0  # 1.0 = off
TOP_K = 0  # 0 = off
NUM_SAMPLES = 1
SEED = 0
JOINER = " "  # as data_processing.py --joiner
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")  # raised inside peft
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
MERGE_INFO = "merge_info.json"
# marks a --merge-to directory as predict.py's (check_output_dir); merges from before "stage" are known by "dtype"
MERGE_MARKER = {"stage": "merge", "dtype": "bfloat16"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default (where it has a plain one) after its help."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--model", required=True, help="local base model directory (e.g. Meta-Llama-3-8B, with config.json, "
                    "tokenizer.json and *.safetensors)")
    ap.add_argument("--adapter", required=True,
                    help="finetune.py run directory (uses RUN/adapter), an adapter directory (adapter_config.json + "
                         "adapter_model.safetensors, e.g. RUN/checkpoints/step-0000100), or 'none' for the base model "
                         "alone (the untrained baseline: a fresh LoRA adapter has B=0 and is identical to the base)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt, in hand-vocab text (tokens joined by --joiner)")
    src.add_argument("--input", metavar="FILE.jsonl",
                     help="prompts, one JSON object a line: the validation.jsonl/train.jsonl of data_processing.py, "
                          "or {\"prompt\": ..., \"response\": optional reference, \"format\": optional, "
                          "\"system\": optional}")
    ap.add_argument("--format", choices=["chat", "plain"], default=None,
                    help="prompt format for --prompt and for records without a \"format\" key "
                         "(default: the training data's format from RUN/config.json, else chat)")
    ap.add_argument("--system-prompt", default=None,
                    help="system prompt for chat prompts (default: each record's \"system\", else the one used in "
                         "training per RUN/config.json, else none). Must match training to get the trained behaviour")
    ap.add_argument("--prefix-tokens", type=int, default=None, metavar="N",
                    help="plain records of data_processing.py have no prompt/answer split: prompt with the first N "
                         "hand tokens of each \"text\" and use the rest as the reference")
    ap.add_argument("--vocab", default=None,
                    help="hand vocabulary file (as given to data_processing.py): adds completion_ids and "
                         "unknown_pieces to each output record; refused if it is not the vocabulary recorded in "
                         "RUN/config.json or next to --input (sha256 of its id->token mapping)")
    ap.add_argument("--joiner", default=None,
                    help=f"string between hand tokens (default: the one used in training per RUN/config.json, else "
                         f"per the metadata.json next to --input, else {JOINER!r})")
    sp = ap.add_argument_group(
        "hand vocabulary specials (with --vocab)",
        # the formatter keeps descriptions as written (for the module docstring), so this one is wrapped by hand
        "The special tokens, as in data_processing.py. Each defaults to the token data_processing.py\n"
        "chose, as recorded in RUN/config.json, else in the metadata.json next to --input (only when\n"
        "the vocabulary recorded there is --vocab's); without a record, to the token found by its\n"
        "common names.")
    add_special_token_flags(sp, default="as recorded by data_processing.py (see above)")
    ap.add_argument("--eval", action="store_true",
                    help="score completions against each record's reference \"response\": exact match and token "
                         "accuracy in hand-vocab ids, and the reference loss (mean cross-entropy of the reference "
                         "answer + end token given the prompt; needs --vocab and --input with references)")
    ap.add_argument("--output", metavar="FILE.jsonl", default=None,
                    help="write samples here (atomically); default: stdout")
    ap.add_argument("--summary", metavar="FILE.json", default=None,
                    help="also write the summary (samples, tokens/s, unknown pieces; with --eval exact_match and "
                         "token_accuracy) as JSON here, atomically")
    g = ap.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="stop after this many new tokens")
    g.add_argument("--temperature", type=float, default=TEMPERATURE, help="0 = greedy (deterministic); > 0 samples")
    g.add_argument("--top-p", type=float, default=TOP_P, help="nucleus sampling mass (1.0 = off; only when sampling)")
    g.add_argument("--top-k", type=int, default=TOP_K, help="sample from the k likeliest tokens (0 = off)")
    g.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="samples per prompt (> 1 needs --temperature > 0)")
    g.add_argument("--seed", type=int, default=SEED, help="RNG seed: same inputs, batch size and seed give the same samples")
    g.add_argument("--batch-size", type=int, default=None,
                   help="prompts decoded at once, each --num-samples sequences (default: continuous decoding takes "
                        "as many as fit 90%% of the GPU's memory, 8 on CPU; --decode plain 8 a generate() call)")
    g.add_argument("--decode", choices=["continuous", "plain"], default=DECODE,
                   help="continuous: each sequence in its own row of a static KV cache, a finished one's row refilled "
                        "at once, one CUDA graph a step on GPU (qlora/decoding.py); plain: transformers' generate() "
                        "on left-padded batches with the adapter unmerged, as before (slower; the tests' reference)")
    m = ap.add_argument_group("model")
    m.add_argument("--quantize", choices=["nf4", "none"], default=None,
                   help="nf4 (default): the base training ran on, 4-bit NF4 dequantised to bf16 in every matmul. "
                        "--decode continuous dequantises it once and merges the adapter in: the trained function up "
                        "to one bf16 rounding of each merged weight, at bf16 speed (2 bytes a parameter; it stays "
                        "4-bit, adapter unmerged and slower, where that does not fit the GPU). none: the original "
                        "bf16 base, which is not what the adapter was trained against. --merge-to loads with none")
    m.add_argument("--merge-to", metavar="DIR", default=None,
                   help="write the adapter merged into a bf16 copy of the base to DIR (loadable by "
                        "AutoModelForCausalLM.from_pretrained without peft). Loads the base unquantised (bf16), "
                        "since merging into 4-bit weights would lose precision; prompts, if given, then run on the "
                        "merged model")
    m.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    m.add_argument("--compute-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="dtype of activations and matmuls, as in finetune.py: auto = bf16 on CUDA, fp32 on the CPU "
                        "(bf16 is emulated and ~30x slower on CPUs without AVX-512 BF16); fp32 is CPU-only. "
                        "--merge-to merges in bf16 unless this says fp32")
    m.add_argument("--gpu-memory-gib", type=float, default=None, metavar="GIB",
                   help="plan the batch for a GPU of this size (default: this GPU's; 40 = an A100-40GB); the plan "
                        "uses 90%% of it, less what other processes hold")
    args = ap.parse_args(argv)
    given = [f"--{r}-token" for r in ROLES if getattr(args, f"{r}_token") is not None]
    if given and args.vocab is None:
        raise UserError(f"{given[0]} chooses a special token of the hand vocabulary: give --vocab too")
    return args


def resolve_device(flag: str | None) -> str:
    """--device checked up front: torch would only fail at model load, with a traceback."""
    import torch

    if flag is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {flag}: not a device; give cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {flag}: no CUDA GPU is visible to this process")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {flag}: only {torch.cuda.device_count()} CUDA GPU(s) visible "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return flag


# --------------------------------------------------------------------------------------------------- adapter / run
def resolve_adapter(arg: str) -> tuple[Path | None, Path | None]:
    """(adapter dir, run dir) for --adapter; (None, None) for 'none'."""
    if arg.lower() == "none":
        return None, None
    p = Path(arg)
    if not p.exists():
        raise UserError(f"--adapter {p}: no such directory (give a finetune.py run directory, an adapter directory or 'none')")
    if not p.is_dir():
        raise UserError(f"--adapter {p}: not a directory")
    if (p / ADAPTER_DIR).is_dir():  # a run directory, or one of its checkpoints (RUN/checkpoints/step-N/adapter)
        adapter = p / ADAPTER_DIR
    elif (p / "adapter_config.json").exists() or (p / "adapter_model.safetensors").exists():
        adapter = p
    elif checkpoints_dir(p).is_dir():
        from qlora.checkpoint import checkpoints_by_write_order

        written = checkpoints_by_write_order(p)
        hint = f"; its newest checkpoint is {written[-1]}" if written else ""
        raise UserError(f"--adapter {p}: run has no final adapter (RUN/adapter) yet{hint}")
    else:
        raise UserError(f"--adapter {p}: neither a run directory (RUN/adapter) nor an adapter directory "
                        f"(adapter_config.json, adapter_model.safetensors)")
    run = run_dir_of_adapter(adapter)
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / f).is_file()]
    if missing:
        raise UserError(f"--adapter {adapter}: incomplete adapter, missing: {', '.join(missing)}")
    read_json(adapter / "adapter_config.json", "--adapter")
    adapter_shapes(adapter)  # a truncated weights file: refused now, not after the base has loaded
    return adapter, run


def adapter_shapes(adapter: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from adapter_model.safetensors' header; the header covers the whole file, so a
    truncated file is refused here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
            return {key: f.get_slice(key).get_shape() for key in f.keys()}
    except SafetensorError as e:
        raise UserError(f"--adapter {adapter}: adapter_model.safetensors is damaged ({e})") from None


def read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path}: expected a JSON object")
    return obj


def _find(obj, *keys):
    """First value found under any of the dotted `keys` in a nested dict (run configs nest their sections)."""
    for key in keys:
        cur = obj
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                break
            cur = cur[part]
        else:
            return cur
    return None


def training_defaults(run: Path | None) -> dict:
    """What RUN/config.json (finetune.py) says about training: the base model, the data format, and from the
    data_processing.py metadata carried through pretokenize.py: system prompt, joiner and vocabulary hash."""
    if run is None:
        return {}
    cfg = read_json(run / CONFIG_FILE, "run config")
    fmt = _find(cfg, "data_metadata.format")
    stage1 = "data_metadata.input.metadata."
    return {
        "model": _find(cfg, "config.model"),
        "model_config": _find(cfg, "model_config"),
        "format": fmt if fmt in FORMATS else None,  # "mixed" data: each record says its own
        "system": _find(cfg, stage1 + "options.system_prompt"),
        "joiner": _find(cfg, stage1 + "options.joiner"),
        "vocab_sha256": _find(cfg, stage1 + "vocab.sha256"),
        "vocab": _find(cfg, stage1 + "vocab"),
    }


def recorded_specials(vocab_meta, vocab) -> dict[str, str]:
    """role -> token ("" for none) as data_processing.py recorded them in a metadata "vocab" entry.

    {} unless that entry is of this very vocabulary (same id->token sha256): only then is every recorded token
    sure to be one of its tokens, and choosing them again gives the ids the data was made with.
    """
    if not isinstance(vocab_meta, dict) or vocab_meta.get("sha256") != vocab.sha256:
        return {}
    specials = vocab_meta.get("specials")
    if not isinstance(specials, dict):
        return {}
    return {r: (specials[r].get("token") or "") for r in ROLES if isinstance(specials.get(r), dict)}


def load_vocab(args: argparse.Namespace, trained: dict, run: Path | None, data_meta: dict):
    """The --vocab HandVocab (None without --vocab), refused unless it is the one recorded in RUN/config.json and
    next to --input, with its specials chosen as data_processing.py chose them unless a --*-token flag says otherwise.
    """
    if args.vocab is None:
        return None
    if not Path(args.vocab).is_file():
        raise UserError(f"--vocab {args.vocab}: no such file")
    # Specials are chosen after the hash checks: a wrong --vocab is then reported as such, not as an ambiguous or
    # missing special token.
    vocab = load_hand_vocab(args.vocab, choose_specials=False)
    if trained.get("vocab_sha256") and trained["vocab_sha256"] != vocab.sha256:
        raise UserError(f"--vocab {args.vocab} is not the vocabulary the adapter was trained with (its id->token "
                        f"sha256 differs from the one data_processing.py recorded in {run / CONFIG_FILE})")
    data_vocab = _find(data_meta, "vocab.sha256")
    if data_vocab and data_vocab != vocab.sha256:
        raise UserError(f"--vocab {args.vocab} is not the vocabulary {args.input} was made with (its id->token "
                        f"sha256 differs from {Path(args.input).parent / 'metadata.json'})")
    chosen = recorded_specials(trained.get("vocab"), vocab) or recorded_specials(data_meta.get("vocab"), vocab)
    chosen.update((r, t) for r, t in special_token_flags(args).items() if t is not None)
    return vocab.with_specials(chosen)


def check_adapter_fits(model, adapter: Path) -> None:
    """Every LoRA matrix must match its module's shape in --model: a one-line error instead of peft's size-mismatch
    traceback when the adapter was trained on another base."""
    modules = dict(model.named_modules())
    for key, shape in adapter_shapes(adapter).items():
        for kind in (".lora_A.", ".lora_B."):
            if kind not in key:
                continue
            name = key.split(kind)[0].removeprefix("base_model.model.")
            mod = modules.get(name)
            if mod is None or not hasattr(mod, "in_features"):
                raise UserError(f"--adapter {adapter} was trained on another base model: --model has no "
                                f"linear layer {name}")
            need = mod.in_features if kind == ".lora_A." else mod.out_features
            have = shape[1] if kind == ".lora_A." else shape[0]
            if need != have:
                raise UserError(f"--adapter {adapter} was trained on another base model: {key} has shape "
                                f"{list(shape)} but {name} in --model has {mod.in_features} -> {mod.out_features}")


def check_outputs(args: argparse.Namespace, model_dir: Path, adapter: Path | None, run: Path | None) -> None:
    """--output, --summary and --merge-to, refused before anything loads when writing them would replace an input
    (or anything inside an input directory), a directory of something else, or cannot be done at all."""
    inputs = {"--model": model_dir, "--adapter": [p for p in (adapter, run and run / CONFIG_FILE) if p],
              "--input": [args.input, Path(args.input).parent / "metadata.json"] if args.input else None,
              "--vocab": args.vocab}
    for flag, path in (("--output", args.output), ("--summary", args.summary)):
        if path is not None:
            check_output_file(path, inputs, flag=flag)
    if args.output and args.summary and Path(args.output).resolve() == Path(args.summary).resolve():
        raise UserError(f"--summary {args.summary}: is also --output; give them different files")
    if args.merge_to:
        check_output_dir(args.merge_to, inputs, stage="predict.py --merge-to", marker=MERGE_MARKER,
                         marker_file=MERGE_INFO, flag="--merge-to")


def reference_ids(records, vocab, joiner: str) -> dict[int, list[int]]:
    """id(record) -> the hand ids of its reference, for --eval; refused now (before generating) if any reference
    has a piece that is not in --vocab."""
    out = {}
    for r in records:
        if r.reference is not None:
            ids, unknown = vocab.text_to_ids(r.reference, joiner=joiner)
            if unknown:
                raise UserError(f"{r.source}: reference response has pieces not in --vocab: {unknown[:5]} (wrong "
                                f"--vocab or --joiner?)")
            out[id(r)] = ids
    return out


def merge_and_save(peft_model, model_dir: Path, adapter: Path, out: Path):
    """Merge the LoRA weights into the bf16 base and save a self-contained model directory (atomically)."""
    from qlora.atomic import atomic_dir

    merged = peft_model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(model_dir / name, tmp / name)
        (tmp / MERGE_INFO).write_text(json.dumps(
            {**MERGE_MARKER, "base_model": str(model_dir.resolve()), "adapter": str(adapter.resolve())},
            indent=2) + "\n")
    print(f"merged adapter into bf16 base: {out}", file=sys.stderr)
    return merged


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    from qlora.generation import SamplingConfig, read_prompts_jsonl, prompt_from_record

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, num_samples=args.num_samples, seed=args.seed,
                              batch_size=args.batch_size if args.batch_size is not None else BATCH_SIZE)
    sampling.validate()
    if args.prompt is None and args.input is None and args.merge_to is None:
        raise UserError("nothing to do: give --prompt, --input or --merge-to")
    if args.eval and args.input is None:
        raise UserError("--eval needs reference responses: use --input with records that have a \"response\"")
    if args.eval and args.vocab is None:
        raise UserError("--eval scores in the hand vocabulary: give --vocab")
    if args.prefix_tokens is not None and args.prefix_tokens < 1:
        raise UserError(f"--prefix-tokens must be >= 1, got {args.prefix_tokens}")
    if args.merge_to and args.quantize == "nf4":
        raise UserError("--merge-to needs the unquantised bf16 base: drop --quantize nf4 (it loads with --quantize none)")
    if args.merge_to and args.adapter.lower() == "none":
        raise UserError("--merge-to needs an adapter to merge (--adapter none given)")
    model_dir = Path(args.model)
    adapter, run = resolve_adapter(args.adapter)
    check_outputs(args, model_dir, adapter, run)
    device = resolve_device(args.device)
    if args.gpu_memory_gib is not None and (args.gpu_memory_gib <= 0 or args.decode == "plain" or device == "cpu"):
        raise UserError(f"--gpu-memory-gib {args.gpu_memory_gib}: plans the GPU memory of --decode continuous; give "
                        f"a size > 0, on a GPU, without --decode plain")
    quantize = "none" if args.merge_to else (args.quantize or "nf4")
    from qlora.model import validate_model_dir

    model_config = validate_model_dir(model_dir)
    trained = training_defaults(run)
    if trained.get("model") and Path(trained["model"]).resolve() != model_dir.resolve():
        # Only a warning: a moved or re-downloaded copy of the same base is fine; a different one is caught by the
        # shape check below or shows up as different config values here.
        changed = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "rope_theta")
                   if (trained.get("model_config") or {}).get(k, model_config.get(k)) != model_config.get(k)]
        print(f"warning: the adapter was trained on --model {trained['model']}, this is {model_dir}"
              + (f" (config differs in {', '.join(changed)})" if changed else ""), file=sys.stderr)

    data_meta = {}
    if args.input is not None and (Path(args.input).parent / "metadata.json").is_file():
        data_meta = read_json(Path(args.input).parent / "metadata.json", "data metadata")
    vocab = load_vocab(args, trained, run, data_meta)
    joiner = args.joiner if args.joiner is not None else (
        trained.get("joiner") or _find(data_meta, "options.joiner") or JOINER)
    if args.prefix_tokens is not None and joiner == "":
        raise UserError("--prefix-tokens splits each text into hand tokens at the joiner, and --joiner is empty; "
                        "give the joiner the data was written with")
    default_system = trained.get("system") or _find(data_meta, "options.system_prompt")
    kw = dict(default_format=args.format or trained.get("format"), system_override=args.system_prompt,
              default_system=default_system, prefix_tokens=args.prefix_tokens, joiner=joiner)
    records = []
    if args.prompt is not None:
        records = [prompt_from_record({"prompt": args.prompt}, "--prompt", **kw)]
    elif args.input is not None:
        records = read_prompts_jsonl(args.input, **kw)
    if args.eval and not any(r.reference is not None for r in records):
        raise UserError(f"--eval: no record in {args.input} has a reference \"response\"")
    references = reference_ids(records, vocab, joiner) if args.eval else None

    import torch

    from qlora import decoding
    from qlora.generation import encode_prompts
    from qlora.llama3 import load_tokenizer
    from qlora.model import check_vocab_size, dtype_name, load_base_model, resolve_compute_dtype

    tokenizer = load_tokenizer(model_dir)
    check_vocab_size(model_dir, model_config, tokenizer)
    continuous = args.decode == "continuous" and bool(records)
    sequences = len(records) * args.num_samples
    # --merge-to writes bf16 weights and needs no fast matmuls: merging in bf16 keeps an 8B merge at 16 GB of RAM
    compute_dtype = resolve_compute_dtype("bf16" if args.merge_to and args.compute_dtype == "auto"
                                          else args.compute_dtype, device)
    print(f"loading {model_dir} ({'4-bit NF4' if quantize == 'nf4' else 'plain weights'}, "
          f"{dtype_name(compute_dtype)} compute) on {device}"
          f"{f' with adapter {adapter}' if adapter else ' without adapter'}", file=sys.stderr)
    model = load_base_model(model_dir, quantize=quantize, attn_implementation="sdpa", device=device,
                            compute_dtype=compute_dtype)
    if continuous:
        prompt_lengths = [len(x) for x in encode_prompts(tokenizer, records)]
        max_len = decoding.slot_length(prompt_lengths, args.max_new_tokens)
        plan = decoding.plan_decoding(model, device=torch.device(device), sequences=sequences, max_len=max_len,
                                      num_samples=args.num_samples, batch_size=args.batch_size,
                                      gpu_memory_gib=args.gpu_memory_gib)
        if plan.dequantize:
            # Before any forward: on CPU bitsandbytes repacks 4-bit weights for its inference kernel at the first
            # forward, and those no longer dequantise to the trained weights.
            model = model.dequantize(dtype=model.get_input_embeddings().weight.dtype)
    if adapter is not None:
        from peft import PeftModel

        check_adapter_fits(model, adapter)
        model = PeftModel.from_pretrained(model, str(adapter))
        if args.merge_to:
            model = merge_and_save(model, model_dir, adapter, Path(args.merge_to))
        elif continuous and not decoding.is_four_bit(model):
            # W + scale*B@A with fp32 LoRA weights, rounded once to the base's dtype
            model = model.merge_and_unload()
    model.eval()
    if not records:
        return 0
    four_bit = decoding.is_four_bit(model)
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    settings = {"decode": args.decode,
                "weights": "nf4" if four_bit else (f"nf4 dequantized to {dtype}" if quantize == "nf4" else dtype),
                "adapter": "none" if adapter is None else ("unmerged" if four_bit or not continuous else "merged")}
    decoder = None
    if continuous:
        decoder = decoding.make_decoder(model, plan, device=torch.device(device), sequences=sequences,
                                        max_len=max_len, max_new_tokens=args.max_new_tokens,
                                        prompt_lengths=prompt_lengths)
        settings.update(batch_size=decoder.slots, cuda_graph=decoder.graph is not None)
    else:
        settings.update(batch_size=sampling.batch_size * args.num_samples)
    print(f"decoding {sequences} sequence(s): {', '.join(f'{k} {v}' for k, v in settings.items())}", file=sys.stderr)
    summary = predict(model, tokenizer, records, sampling, vocab=vocab, joiner=joiner, references=references,
                      output=args.output, decoder=decoder, startup_seconds=time.perf_counter() - started,
                      settings=settings)
    print(summary.line(), file=sys.stderr)
    if args.summary:
        from qlora.atomic import write_json_atomic

        write_json_atomic(args.summary, summary.as_dict())
    return 0


def predict(model, tokenizer, records, sampling, *, vocab=None, joiner=JOINER, references=None, output=None,
            decoder=None, startup_seconds=0.0, settings=None):
    """Generate (continuous batching through `decoder`, else generate() on batches), map, score and write; returns
    the EvalSummary. references: reference_ids' {id(record): hand ids} to score against (--eval), or None."""
    from tqdm import tqdm

    from qlora.atomic import atomic_file
    from qlora.generation import EvalSummary, completion_to_hand, generate, score

    summary = EvalSummary(startup_seconds=startup_seconds, settings=settings or {})
    position = {id(r): i for i, r in enumerate(records)}
    losses = {}
    do_eval = references is not None
    if do_eval:
        from qlora.generation import reference_losses

        for rec, loss in zip(records, reference_losses(model, tokenizer, records, joiner)):
            if loss is not None:
                losses[id(rec)] = loss
                summary.loss_sum += loss[0]
                summary.loss_tokens += loss[1]
        summary.reference_loss_seconds = time.perf_counter() - summary.started
        summary.restart()
    rows = []
    # The bar counts the token budget (samples x --max-new-tokens): every step advances it and an answer that ends
    # early gives back the rest of its budget at once, so the ETA holds whether answers run long or stop early.
    total = len(records) * sampling.num_samples
    bar = tqdm(total=total * sampling.max_new_tokens, desc="generating", disable=total <= 1, file=sys.stderr,
               dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    done = new_tokens = 0

    def progress(n_samples, n_tokens, n_budget):
        nonlocal done, new_tokens
        done += n_samples
        new_tokens += n_tokens
        bar.set_postfix_str(f"{new_tokens / max(bar.format_dict['elapsed'], 1e-9):.0f} new tokens/s, "
                            f"{done}/{total} samples", refresh=False)
        bar.update(n_budget)

    if decoder is not None:
        from qlora.decoding import generate_continuous

        samples = generate_continuous(decoder, tokenizer, records, sampling, progress)
    else:
        samples = generate(model, tokenizer, records, sampling, progress)
    for s in samples:
        row = {"source": s.record.source, "prompt": s.record.prompt, "format": s.record.format, "sample": s.index,
               "completion": s.text, "stop_reason": s.stop_reason}
        unknown = exact = acc = None
        if vocab is not None:
            ids, unknown, positional = completion_to_hand(vocab, s.text, s.record.format, joiner)
            row.update(completion_ids=ids, unknown_pieces=unknown)
            if s.record.reference is not None:
                row["reference"] = s.record.reference
                if do_eval:
                    exact, acc = score(positional, references[id(s.record)])
                    row.update(exact_match=exact, token_accuracy=acc)
                    nll, n = losses[id(s.record)]
                    row["reference_loss"] = nll / max(n, 1)
        summary.add(s, unknown, exact, acc)
        rows.append((position[id(s.record)], s.index, row))
    summary.stop()
    bar.close()
    rows.sort(key=lambda r: r[:2])
    if output is None:
        for _, _, row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        with atomic_file(output) as f:
            for _, _, row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return summary


if __name__ == "__main__":
    run_main(main)
