#!/usr/bin/env bash
# Quick start: all four stages on the bundled sample task (examples/sample: transpose a few notes up two steps)
# with a tiny Llama-3-shaped model built here (real Llama-3 tokenizer, random weights), on CPU, in a few minutes.
#
#   bash examples/quickstart.sh                  # outputs in examples/out/
#   STEPS=20 OUT=/tmp/qs bash examples/quickstart.sh   # any setting below can be overridden from the environment
#
# It measures the untrained model (predict.py --adapter none: the base alone, which is what a fresh LoRA adapter
# with B = 0 computes), trains, measures again, prints both and exits 1 unless the validation loss fell by at
# least a third and exact match rose. Every stage is the real script with its real defaults except the flags
# below, chosen for a 2-core CPU:
set -euo pipefail
cd "$(dirname "$0")/.."

# $PYTHON, else the active python, else the venv's (as finetune.sbatch finds it): the first that imports torch.
if [ -n "${PYTHON:-}" ]; then candidates=("$PYTHON"); else candidates=(python .venv/bin/python); fi
for PYTHON in "${candidates[@]}"; do
  "$PYTHON" -c 'import torch' 2>/dev/null && break
  [ "$PYTHON" != "${candidates[-1]}" ] ||
    { echo "quickstart.sh: $PYTHON lacks the requirements: run 'bash install_prereqs' then 'source .venv/bin/activate'" >&2; exit 1; }
done
OUT=${OUT:-examples/out}
SAMPLE=${SAMPLE:-examples/sample}
# Tiny model: 2 blocks of width 256. --init-std 0.1 instead of Llama's 0.02: with LoRA only, the final norm and
# the tied embeddings stay frozen, which caps every logit at about init_std x width; at 0.02 the loss cannot
# fall below ~9 nats, at 0.1 it can reach ~0.
LAYERS=${LAYERS:-2}
HIDDEN=${HIDDEN:-256}
INTERMEDIATE=${INTERMEDIATE:-512}
INIT_STD=${INIT_STD:-0.1}
# Rows of 512 tokens: a sample document is 27 tokens, so 512 packs 18 of them at 95% fill, and a step of 2 rows
# stays ~0.8 s on 2 cores. 8192 (the default) would make a row a tenth of the data set.
MAX_LEN=${MAX_LEN:-512}
# Training: LoRA r=16 (alpha 32) on all seven projections; a learning rate far above the 8B recipe's 2e-4, since
# a random tiny model has everything to learn in ~2 epochs (1e-2 diverged, measured). Steps of 2 rows, not 4:
# the same tokens in twice the optimizer steps learn far more here (measured, bench/NOTES.md).
STEPS=${STEPS:-150}
MICRO_BATCH=${MICRO_BATCH:-2}
LR=${LR:-5e-3}
LORA_R=${LORA_R:-16}
LORA_ALPHA=${LORA_ALPHA:-32}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}  # answers are 4 notes = 8 tokens + the end token
REQUIRE_EXACT_MATCH_RISE=${REQUIRE_EXACT_MATCH_RISE:-1}  # 0: only the loss must fall (the short test run)

start=$(date +%s)
stage() { echo; echo "== $* ($(( $(date +%s) - start ))s)"; }

stage "tiny Llama-3-shaped model -> $OUT/tiny-llama3"
"$PYTHON" -m qlora.tiny_model "$OUT/tiny-llama3" --layers "$LAYERS" --hidden "$HIDDEN" \
    --intermediate "$INTERMEDIATE" --init-std "$INIT_STD"

stage "stage 1, data_processing.py: hand-vocab ids -> Llama-3 chat JSONL"
"$PYTHON" data_processing.py --vocab "$SAMPLE/vocab.json" --input "$SAMPLE/sequences.npy" --output-dir "$OUT/data"

stage "stage 2, pretokenize.py: JSONL -> packed $MAX_LEN-token parquet rows"
"$PYTHON" pretokenize.py --input "$OUT/data" --tokenizer "$OUT/tiny-llama3" --output-dir "$OUT/tokens" \
    --max-len "$MAX_LEN"

EVAL=(--model "$OUT/tiny-llama3" --input "$OUT/data/validation.jsonl" --vocab "$SAMPLE/vocab.json" --eval
      --max-new-tokens "$MAX_NEW_TOKENS" --batch-size 64)
stage "stage 4 before training, predict.py --adapter none: the untrained model on the validation set"
"$PYTHON" predict.py "${EVAL[@]}" --adapter none --output "$OUT/before.jsonl" --summary "$OUT/before.json"

stage "stage 3, finetune.py: $STEPS steps of $MICRO_BATCH rows"
rm -rf "$OUT/run"  # a fresh run each time (rerunning finetune.py on a finished run would just report it)
"$PYTHON" finetune.py --model "$OUT/tiny-llama3" --data "$OUT/tokens" --output-dir "$OUT/run" \
    --max-steps "$STEPS" --micro-batch-size "$MICRO_BATCH" --grad-accum 1 --lr "$LR" --warmup-steps 5 \
    --lora-r "$LORA_R" --lora-alpha "$LORA_ALPHA" --eval-every 0 --save-every "$STEPS" --keep-checkpoints 1

stage "stage 4 after training, predict.py --adapter $OUT/run"
"$PYTHON" predict.py "${EVAL[@]}" --adapter "$OUT/run" --output "$OUT/after.jsonl" --summary "$OUT/after.json"

stage "before / after"
"$PYTHON" - "$OUT" "$(( $(date +%s) - start ))" "$REQUIRE_EXACT_MATCH_RISE" <<'EOF'
import json, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
before = json.loads((out / "before.json").read_text())
after = json.loads((out / "after.json").read_text())
val = [json.loads(x)["val_loss"] for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
print(f"{'':34}{'untrained':>12}{'trained':>12}")
print(f"{'validation loss (reference loss)':34}{before['reference_loss']:12.4f}{after['reference_loss']:12.4f}")
print(f"{'exact match':34}{before['exact_match']:12.4f}{after['exact_match']:12.4f}")
print(f"{'token accuracy':34}{before['token_accuracy']:12.4f}{after['token_accuracy']:12.4f}")
print(f"{'samples with unknown pieces':34}{before['with_unknown_pieces']:12d}{after['with_unknown_pieces']:12d}")
print(f"finetune.py's own validation loss at the end: {val[-1]:.4f}; {after['scored']} validation prompts; "
      f"{seconds}s in all")
for line in (out / "after.jsonl").read_text().splitlines()[:3]:
    r = json.loads(line)
    print(f"  {r['prompt']:<18} -> {r['completion']:<18} (reference {r['reference']})")
fell = after["reference_loss"] <= before["reference_loss"] * 2 / 3
rose = after["exact_match"] > before["exact_match"] or sys.argv[3] == "0"
print(("OK" if fell and rose else "NOT LEARNED") + f": validation loss fell by {1 - after['reference_loss'] / before['reference_loss']:.0%} "
      f"(need >= 33%), exact match {before['exact_match']:.4f} -> {after['exact_match']:.4f} (need a rise)")
sys.exit(0 if fell and rose else 1)
EOF
