"""Prompts formatted exactly as in training, batched generation with left padding, and scoring in the hand vocabulary.

Used by predict.py. Three pieces:
  * prompts: from --prompt, or a JSONL file (the validation.jsonl of data_processing.py, or {"prompt": ...} lines),
    formatted with the same qlora.llama3 helpers data_processing.py used, so the token ids the model sees are the
    training ids up to the first response token (tests/test_predict.py checks this against data_processing's output);
  * generation (predict.py --decode plain): transformers' generate() on left-padded batches (a decoder continues
    from the LAST position, so padding has to sit on the left), stopping at <|eot_id|> or <|end_of_text|>; the
    default continuous batching is qlora/decoding.py, which takes its prompts, samples and stop tokens from here;
  * scoring: completion text -> hand-vocab ids through HandVocab.text_to_ids; exact match and token accuracy
    against the reference response, pieces that are not vocabulary tokens counted as wrong, never dropped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError
from .llama3 import (BOS, END_OF_TEXT_ID, EOT, EOT_ID, EOT_TEXT, FORMATS, IGNORE_INDEX, PAD_ID,
                     format_chat_prompt)

STOP_IDS = (EOT_ID, END_OF_TEXT_ID)
BATCH_TOKENS = 8192  # padded tokens per forward over many prompts (a prefill, a reference-loss batch): large GEMMs,
#                      ~1.4 GB of activations on Llama-3-8B


@dataclass
class PromptRecord:
    """One prompt to complete. `prompt` is the user's hand-vocab text, `model_input` what the model is fed."""

    prompt: str
    format: str
    model_input: str
    system: str | None = None
    reference: str | None = None
    source: str = "--prompt"


def format_prompt(prompt: str, fmt: str, system: str | None = None) -> str:
    """The model input for one prompt, as data_processing.py wrote it up to where the answer starts.

    chat: BOS, optional system turn, the user turn, then the assistant header (the response follows in training);
    plain: BOS then the prompt text with no trailing joiner, so the tokenizer splits it as it split the training text
    (the model then generates the joiner itself, e.g. " c" after "a b").
    """
    if fmt == "chat":
        return format_chat_prompt(prompt, system)
    if fmt == "plain":
        if system:
            raise UserError("--system-prompt applies to chat prompts only, not --format plain")
        return BOS + prompt
    raise UserError(f"unknown prompt format {fmt!r} (expected chat or plain)")


def _strip_plain_record(text: str, where: str) -> str:
    if not text.startswith(BOS) or not text.endswith(EOT_TEXT):
        raise UserError(f"{where}: plain record's \"text\" must start with {BOS} and end with {EOT_TEXT}")
    return text[len(BOS):-len(EOT_TEXT)]


def prompt_from_record(rec: dict, where: str, *, default_format: str | None, system_override: str | None,
                       default_system: str | None, prefix_tokens: int | None, joiner: str) -> PromptRecord:
    """A PromptRecord from one JSONL object.

    Accepted: a data_processing.py record (chat: "prompt"/"response"[/"system"]; plain: "text"), or a hand-written
    {"prompt": ..., "response": optional reference, "format": optional, "system": optional}.
    Plain records from data_processing.py have no prompt/answer split: --prefix-tokens N prompts with the first N
    hand tokens of "text" and scores the rest as the reference.
    """
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    fmt = rec.get("format", default_format)
    if fmt is None:
        fmt = "chat"
    if fmt not in FORMATS:
        raise UserError(f"{where}: \"format\" is {fmt!r}, expected chat or plain")
    for key in ("prompt", "response", "system", "text"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise UserError(f"{where}: \"{key}\" must be a string, got {type(rec[key]).__name__}")
    reference = rec.get("response")
    if "prompt" in rec:
        prompt = rec["prompt"]
    elif fmt == "plain" and "text" in rec:
        if prefix_tokens is None:
            raise UserError(f"{where}: plain record has no \"prompt\"; pass --prefix-tokens N to prompt with the "
                            f"first N hand tokens of its \"text\" and score the rest")
        pieces = _strip_plain_record(rec["text"], where).split(joiner)
        if len(pieces) <= prefix_tokens:
            raise UserError(f"{where}: text has {len(pieces)} hand tokens, not more than --prefix-tokens {prefix_tokens}")
        prompt, reference = joiner.join(pieces[:prefix_tokens]), joiner.join(pieces[prefix_tokens:])
    else:
        raise UserError(f"{where}: record has no \"prompt\" field (keys: {', '.join(sorted(rec)) or 'none'})")
    if fmt == "plain":
        if system_override:
            raise UserError(f"{where}: --system-prompt applies to chat prompts only, not plain ones")
        system = None  # a training-time system prompt (RUN/config.json) belongs to chat records only
    else:
        system = system_override if system_override is not None else rec.get("system", default_system)
    return PromptRecord(prompt=prompt, format=fmt, model_input=format_prompt(prompt, fmt, system), system=system,
                        reference=reference, source=where)


def read_prompts_jsonl(path: str | Path, **kw) -> list[PromptRecord]:
    """Every line of a JSONL file as a PromptRecord; a bad line is a UserError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append(prompt_from_record(rec, where, **kw))
    if not records:
        raise UserError(f"--input {path}: file has no records")
    return records


# ------------------------------------------------------------------------------------------------------------ generation

@dataclass
class Sample:
    record: PromptRecord
    index: int  # which of the --num-samples samples of this prompt
    token_ids: list[int]  # generated Llama-3 ids, stop token excluded
    text: str
    stop_reason: str  # "stop" (hit <|eot_id|>/<|end_of_text|>) or "length" (hit --max-new-tokens)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.num_samples < 1:
            raise UserError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise UserError("--num-samples > 1 needs --temperature > 0 (greedy decoding gives the same sample each time)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")

    def generation_config(self):
        """A complete decoding config. generate() below replaces model.generation_config with it, because generate()
        fills unset fields from the model's generation_config.json (Meta's sets do_sample=True, temperature=0.6,
        top_p=0.9), which would silently change our decoding."""
        from transformers import GenerationConfig

        common = dict(max_new_tokens=self.max_new_tokens, num_beams=1, num_return_sequences=self.num_samples,
                      repetition_penalty=1.0, eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID, use_cache=True)
        if self.temperature == 0:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                **common)


def encode_prompts(tokenizer, records: list[PromptRecord]) -> list[list[int]]:
    # add_special_tokens=False: the BOS is in the text already, as in pretokenize.py (no double BOS with Meta's files).
    return tokenizer([r.model_input for r in records], add_special_tokens=False)["input_ids"]


def left_pad(batch: list[list[int]], pad_id: int = PAD_ID):
    """input_ids and attention_mask tensors with padding on the left. generate() derives position ids from the
    mask, so a padded prompt sees the same positions 0..n-1 as it would alone."""
    import torch

    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids, mask


def cut_at_stop(ids: list[int]) -> tuple[list[int], str]:
    for i, t in enumerate(ids):
        if t in STOP_IDS:
            return ids[:i], "stop"
    return ids, "length"


def generate(model, tokenizer, records: list[PromptRecord], cfg: SamplingConfig,
             progress: Callable[[int, int, int], None] | None = None) -> Iterator[Sample]:
    """Samples for every record, in input order within each batch.

    Prompts are sorted by length before batching (less padding, fewer wasted positions) and batches are yielded
    in that order; each Sample carries its record. The seed is set once: the same inputs, batch size and seed give
    the same samples. `progress(samples_done, new_tokens, budget_tokens)` is called after each batch (the budget is
samples x max_new_tokens: a batch uses all of its rows').
    """
    cfg.validate()
    gen_cfg = cfg.generation_config()
    # A PeftModel generates through its base model, which reads its own generation_config.
    (model.get_base_model() if hasattr(model, "get_base_model") else model).generation_config = gen_cfg
    device = next(model.parameters()).device
    # generate() feeds the lm_head a strided slice (the last position of each row). torch 2.13's matmul does not
    # fold a non-contiguous 3-D input into one matmul when the weight is frozen: it expands the [vocab x hidden]
    # weight once per row and runs bmm (measured: 5 s instead of 12 ms for 32 rows on the tiny model; on Llama-3-8B
    # a 1 GB copy per row). A contiguous input takes the fast path.
    lm_head = model.get_output_embeddings()
    hook = lm_head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield from _generate(model, tokenizer, records, cfg, gen_cfg, device, progress)
    finally:
        hook.remove()


def _generate(model, tokenizer, records, cfg, gen_cfg, device, progress):
    import torch

    encoded = encode_prompts(tokenizer, records)
    order = sorted(range(len(records)), key=lambda i: -len(encoded[i]))
    torch.manual_seed(cfg.seed)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        ids, mask = left_pad([encoded[i] for i in idx])
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        new = out[:, ids.shape[1]:].tolist()
        n_tokens = 0
        for row, token_ids in enumerate(new):
            rec_i, sample_i = idx[row // cfg.num_samples], row % cfg.num_samples
            token_ids, reason = cut_at_stop(token_ids)
            n_tokens += len(token_ids) + (reason == "stop")
            # clean_up_tokenization_spaces=False: "a ." must stay "a ." for the mapping back to hand tokens.
            text = tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            yield Sample(records[rec_i], sample_i, token_ids, text, reason)
        if progress is not None:
            progress(len(new), n_tokens, len(new) * cfg.max_new_tokens)


def reference_text(record: PromptRecord, joiner: str) -> str:
    """The rest of the training document after the prompt: the reference answer and its end token."""
    if record.format == "chat":
        return record.reference + EOT
    return (joiner if record.prompt else "") + record.reference + EOT_TEXT


def reference_losses(model, tokenizer, records: list[PromptRecord], joiner: str, max_tokens: int = BATCH_TOKENS):
    """Teacher-forced cross-entropy of each record's reference answer (+ end token) given its prompt.

    Returns [(sum of token losses, number of tokens)] per record (None where there is no reference). For chat
    data these are exactly the tokens finetune.py's validation loss is computed on (the assistant turn and its
    <|eot_id|>), so sum/sum over a validation set is comparable to finetune's val_loss, and it can be measured
    for the untrained base too (--adapter none). Right-padded batches (positions are then 0..n-1 without help) of
    at most `max_tokens` padded tokens, longest first; the lm_head and loss run a chunk of tokens at a time
    (qlora.loss), so no [rows x length x vocabulary] logits tensor is ever made.
    """
    import torch

    from .loss import linear_cross_entropy_sum, shift_labels

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = base.get_input_embeddings().weight.device
    out: list[tuple[float, int] | None] = [None] * len(records)
    todo = []
    for i, r in enumerate(records):
        if r.reference is None:
            continue
        prompt_ids = tokenizer(r.model_input, add_special_tokens=False)["input_ids"]
        full = tokenizer(r.model_input + reference_text(r, joiner), add_special_tokens=False)["input_ids"]
        # The prompt tokenizes to a prefix of the whole document (tests/test_predict.py); guard anyway.
        n_prompt = len(prompt_ids) if full[:len(prompt_ids)] == prompt_ids else len(prompt_ids) - 1
        todo.append((i, full, n_prompt))
    todo.sort(key=lambda t: -len(t[1]))
    start = 0
    while start < len(todo):
        width = len(todo[start][1])
        chunk = todo[start:start + max(1, max_tokens // width)]
        start += len(chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (_, full, n_prompt) in enumerate(chunk):
            ids[row, :len(full)] = torch.tensor(full)
            mask[row, :len(full)] = 1
            labels[row, n_prompt:len(full)] = torch.tensor(full[n_prompt:])
        targets = shift_labels(labels).to(device)
        with torch.inference_mode():
            hidden = base.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for row, (i, _, _) in enumerate(chunk):
                nll = linear_cross_entropy_sum(hidden[row], base.get_output_embeddings().weight, targets[row])
                out[i] = (float(nll), int((targets[row] != IGNORE_INDEX).sum()))
    return out


# --------------------------------------------------------------------------------------------------------------- scoring

def completion_to_hand(vocab, sample_text: str, fmt: str, joiner: str):
    """(ids, unknown_pieces, positional) of a completion in the hand vocabulary.

    ids and unknown_pieces are HandVocab.text_to_ids's answer (the output record's completion_ids/unknown_pieces);
    positional has one entry per piece, None where the piece is not a vocabulary token, for position-wise scoring
    (text_to_ids leaves unknown pieces out of ids or maps them to unk, which would shift or fake positions).
    A plain continuation starts with the joiner that separated it from the prompt ("a b" -> " c d"); that one
    leading joiner is not a piece of the answer and is removed first.
    """
    if fmt == "plain" and joiner and sample_text.startswith(joiner):
        sample_text = sample_text[len(joiner):]
    ids, unknown = vocab.text_to_ids(sample_text, joiner=joiner)
    # The same split as text_to_ids (whitespace runs for a whitespace joiner), piece by piece.
    pieces = sample_text.split() if joiner.isspace() else (sample_text.split(joiner) if sample_text else [])
    positional = [vocab.token_to_id.get(p) for p in pieces]
    return ids, unknown, positional


def score(pred: list[int | None], ref_ids: list[int]) -> tuple[bool, float]:
    """(exact match, token accuracy) of a completion against a reference, both in hand-vocab ids.

    pred is position-wise, None for a piece that is not a vocabulary token (never equal to a reference id).
    exact match: the same sequence. token accuracy: positions where the two agree, divided by the longer length,
    so a missing, extra or unknown token always costs and 1.0 means an exact match. Two empty sequences: 1.0.
    """
    denom = max(len(pred), len(ref_ids))
    if denom == 0:
        return True, 1.0
    agree = sum(p is not None and p == r for p, r in zip(pred, ref_ids))
    return list(pred) == list(ref_ids), agree / denom


@dataclass
class EvalSummary:
    samples: int = 0
    scored: int = 0
    exact: int = 0
    token_accuracy_sum: float = 0.0
    with_unknown: int = 0
    loss_sum: float = 0.0
    loss_tokens: int = 0
    stopped: int = 0
    new_tokens: int = 0
    startup_seconds: float = 0.0  # before the first token: load, dequantise, merge, CUDA graph (predict.py)
    reference_loss_seconds: float = 0.0
    settings: dict = field(default_factory=dict)  # how it decoded (predict.py): decode, weights, batch size, ...
    started: float = field(default_factory=time.perf_counter)  # generation's start (restart() after --eval's loss)
    seconds: float | None = None  # generation's wall time, fixed by stop()

    def restart(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.started

    def add(self, sample: Sample, unknown: list[str] | None, exact: bool | None, acc: float | None) -> None:
        self.samples += 1
        self.stopped += sample.stop_reason == "stop"
        self.new_tokens += len(sample.token_ids)
        self.with_unknown += bool(unknown)
        if exact is not None:
            self.scored += 1
            self.exact += exact
            self.token_accuracy_sum += acc

    def as_dict(self) -> dict:
        seconds = self.seconds if self.seconds is not None else time.perf_counter() - self.started
        d = {"samples": self.samples, "stopped": self.stopped, "new_tokens": self.new_tokens,
             "seconds": round(seconds, 2), "tokens_per_s": round(self.new_tokens / max(seconds, 1e-9), 1),
             "startup_seconds": round(self.startup_seconds, 2), "with_unknown_pieces": self.with_unknown,
             **self.settings}
        if self.scored:
            d.update(scored=self.scored, exact_match=self.exact / self.scored,
                     token_accuracy=self.token_accuracy_sum / self.scored)
        if self.loss_tokens:
            d.update(reference_loss=self.loss_sum / self.loss_tokens, reference_tokens=self.loss_tokens,
                     reference_loss_seconds=round(self.reference_loss_seconds, 2))
        return d

    def line(self) -> str:
        d = self.as_dict()
        s = (f"{d['samples']} samples, {d['stopped']} stopped at an end token, {d['new_tokens']} new tokens in "
             f"{d['seconds']:.1f}s ({d['tokens_per_s']:.0f} tokens/s; startup {d['startup_seconds']:.1f}s), "
             f"{d['with_unknown_pieces']} with unknown pieces")
        if self.scored:
            s += f"; exact match {d['exact_match']:.4f}, token accuracy {d['token_accuracy']:.4f} over {d['scored']} scored"
        if self.loss_tokens:
            s += f"; reference loss {d['reference_loss']:.4f} over {d['reference_tokens']} tokens"
        return s
