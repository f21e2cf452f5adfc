"""Write a random-weight checkpoint with the exact Llama-3-8B config (bf16 safetensors shards + config + tokenizer).

Speed and memory do not depend on the weights' values, so the bench uses this instead of Meta's weights (which cannot
be downloaded on the device machine). It is laid out like Meta's download, so it loads through the same
`from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4))` path. Weights are drawn on the GPU (seconds)
with the usual init (normal std 0.02, norms at 1).

    python bench/build_8b_checkpoint.py OUT_DIR [--layers 32]
    python bench/build_8b_checkpoint.py OUT_DIR --shape 70b --layers 4   (Llama-3-70B's width, 4 of its 80 blocks:
        a whole random 70B is ~141 GB in bf16, more than the GPU machine's disk; 1.7 GB a block + 4.2 GB)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora.llama3 import LLAMA3_8B_CONFIG, LLAMA3_70B_CONFIG  # noqa: E402
from qlora.tiny_model import write_tokenizer_files  # noqa: E402

SHAPES = {"8b": LLAMA3_8B_CONFIG, "70b": LLAMA3_70B_CONFIG}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    out = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=32, help="number of blocks (32 = the real Llama-3-8B)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="block width: Llama-3-8B's or 70B's")
    ap.add_argument("--shard-gib", type=float, default=4.0, help="safetensors shard size")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[args.shape], num_hidden_layers=args.layers, dtype="bfloat16", transformers_version="5.17.0")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2))
    write_tokenizer_files(out, "meta")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    shard, shard_bytes, shard_files, weight_map, total = {}, 0, [], {}, 0
    limit = int(args.shard_gib * 2**30)

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shard_files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            shard_files.append(name)
            for k in shard:
                weight_map[k] = name
            shard, shard_bytes = {}, 0

    for name, shape in shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        if shard_bytes >= limit:
            flush()
    flush()
    # Rename to the n-of-N names of a real download and write the index.
    n = len(shard_files)
    final = {}
    for j, name in enumerate(shard_files):
        new = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / new)
        final[name] = new
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, indent=2))
    print(f"wrote {out}: {total / 1e9:.2f} GB in {n} shards, {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
