"""Build a tiny Llama-3-shaped model directory (real Llama-3 tokenizer, random weights) for tests and the quick start.

No weights can be downloaded in CI, so tests and the quick start train on this: same vocabulary, special tokens,
module names and file layout as Meta-Llama-3-8B, just a few narrow layers. `python -m qlora.tiny_model DIR` builds one.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .llama3 import BOS, BOS_ID, EOT_TEXT, LLAMA3_8B_CONFIG, bundled_tokenizer_json


def write_tokenizer_files(out: Path, style: str = "meta") -> None:
    """style="meta": like Meta's download (post-processor adds BOS); "bare": the tokenizer.json as shipped (no BOS)."""
    tok = json.loads(Path(bundled_tokenizer_json()).read_text())
    if style == "meta":
        tok["post_processor"] = {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}}},
            ],
        }
    elif style != "bare":
        raise ValueError(f"unknown tokenizer style {style!r}")
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT_TEXT,
         "model_max_length": 1000000000000000019884624838656, "clean_up_tokenization_spaces": True}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOT_TEXT}, indent=2))


def build_tiny_llama3(out_dir: str | Path, *, layers: int = 2, hidden: int = 128, intermediate: int = 256,
                      heads: int = 4, kv_heads: int = 2, max_position_embeddings: int = 8192,
                      tie_word_embeddings: bool = True, tokenizer_style: str = "meta", seed: int = 0,
                      init_std: float = 0.02) -> Path:
    """Random-weight Llama-3-shaped model saved in bf16 safetensors with config and tokenizer files.

    Embeddings are tied by default: with a frozen random lm_head a tiny LoRA-only model learns a task far slower.
    init_std (Llama's initializer_range, 0.02) bounds how confident a LoRA-only tiny model can ever be: the final
    norm and the tied embeddings are frozen, so a logit is at most init_std * hidden (2.6 at hidden 128: the loss
    cannot fall below ~9). The quick start uses a larger one so the model can learn the sample task.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = dict(LLAMA3_8B_CONFIG, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads,
               max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
               initializer_range=init_std)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer_files(out, tokenizer_style)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir", help="directory to create (replaced if it exists)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--tokenizer-style", choices=["meta", "bare"], default="meta",
                    help="meta: tokenizer adds BOS itself like Meta's files; bare: it does not")
    ap.add_argument("--init-std", type=float, default=0.02,
                    help="std of the random weights (Llama's initializer_range); larger lets a LoRA-only tiny "
                         "model reach a low loss (see build_tiny_llama3)")
    args = ap.parse_args()
    print(build_tiny_llama3(args.out_dir, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                            tokenizer_style=args.tokenizer_style, init_std=args.init_std))


if __name__ == "__main__":
    main()
