#!/usr/bin/env bash
# Every user-facing entry point end to end, most important first, on synthetic data and random-init models
# (no network): each stage prints what it measured, its exit status and its time; the script exits non-zero if
# any stage failed, and ends with the total time. On a GPU it runs the real shapes (GPT-2 124M, micro-batch 64);
# on a CPU the same stages with tiny shapes (tests/test_smoke.py runs both modes that way in CI).
#
#     bash bench/smoke.sh              # the GPU where there is one, else the CPU: every stage
#     bash bench/smoke.sh --quick      # a first check of a GPU: each entry point once, one cold compile of each
#                                      # recipe, HellaSwag on 1,000 examples, one checkpoint + resume, the
#                                      # HellaSwag and generation benchmarks short; no fp16/FSDP/bench_train stages
#     bash bench/smoke.sh cpu          # force a device (cpu, cuda, cuda:1, mps); --quick goes first
#     SMOKE_DIR=/tmp/smoke bash bench/smoke.sh   # keep the run folder (default: a temporary one, removed)
#     SMOKE_STAGE_TIMEOUT=300                    # seconds a stage may take before it counts as failed
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0; [[ ${1:-} == --quick ]] && { QUICK=1; shift; }
PY=${PYTHON:-python}
DEVICE=$($PY -c "import sys; from support.distributed import resolve_device; print(resolve_device(sys.argv[1]))" \
    "${1:-auto}") || exit 2
if [[ ${1:-auto} == auto && $DEVICE != cuda* ]] && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "smoke: nvidia-smi sees a GPU but this torch does not (a CPU build?): fix it, or run 'bash bench/smoke.sh cpu'"
    exit 2
fi
WORK=${SMOKE_DIR:-$(mktemp -d -t gpt2_smoke.XXXXXX)}
[ -n "${SMOKE_DIR:-}" ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"
rm -rf "$WORK/run" "$WORK/hf"  # a kept SMOKE_DIR's last run must not stand in for this one's

if [[ $DEVICE == cuda* ]]; then  # the default recipe's model and batch; a 12-step run
    MODEL=() SEQ=1024  # GPT-2 124M: the defaults
    BATCH=(--micro-batch-size 64 --seq-len $SEQ --total-batch-size 524288)
    HELLA_EXAMPLES=10042 BENCH_B=64 BENCH_CHUNKS=0,8192 BENCH_COMPILE=on,off BENCH_STEPS=(--warmup 5 --steps 10)
    GEN=(--max-new-tokens 256 --repeats 3) HELLA_BENCH=(-m "$WORK/run/model_00011.pt" -n 10042 --batched-only)
    MODERN_COMPILE=--compile
    if [ $QUICK = 1 ]; then
        HELLA_EXAMPLES=1000 GEN=(--max-new-tokens 64 --repeats 1)
        HELLA_BENCH=(-m "$WORK/run/model_00011.pt" -n 1000 --batched-only --repeats 1)
    fi
else  # tiny shapes, the same stages
    MODEL=(--n-layer 2 --n-head 2 --n-embd 64 --block-size 256) SEQ=64
    BATCH=(--micro-batch-size 4 --seq-len $SEQ --total-batch-size 512)
    HELLA_EXAMPLES=24 BENCH_B=4 BENCH_CHUNKS=0,64 BENCH_COMPILE=off BENCH_STEPS=(--warmup 1 --steps 3)
    GEN=(--max-new-tokens 16 --repeats 1) HELLA_BENCH=(-n 16 --repeats 1 --layers 1 --width 64)
    MODERN_COMPILE=--no-compile  # the train stage compiles on the CPU too; twice would double the stage's time
fi
GEN_MODEL=()  # bench_generate's own: a random GPT-2 124M
[[ $DEVICE == cuda* ]] || GEN_MODEL=(-m "$WORK/run/model_00011.pt")  # the 124M would take minutes on a CPU

FAILED=() START=$SECONDS
stage() {  # stage NAME COMMAND...: runs it, keeps its output in $WORK/NAME.log, prints its lines that matter
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "${SMOKE_STAGE_TIMEOUT:-300}" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    grep -E "$KEEP" "$WORK/$name.log" | tail -n 60
    if [ $rc -eq 0 ]; then echo "== $name: ok ($((SECONDS - t0)) s)"; else
        tail -n 15 "$WORK/$name.log"; echo "== $name: FAILED with exit status $rc ($((SECONDS - t0)) s)"
        FAILED+=("$name")
    fi
}
# the lines worth showing from each stage's output
KEEP='^(python|torch|device|sdpa|compile|step |saved|peak|resuming|rank 0 sample 0|sample 0|hellaswag|wrote|\|'
KEEP+='|same|speed|repeat|batched|data |model |[0-9]{4}-[0-9]{2}-[0-9]{2} \||[0-9,]+ parameters| *(un)?cached:)'
KEEP+='|examples/s|Recompil|Graph break|guard fail|GLOBAL_STATE|recipe |optimizer |schedule '

# 1. versions, the device, which SDPA kernel the training shapes select
stage env $PY - "$DEVICE" <<'EOF'
import sys
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

device = sys.argv[1]
cuda = device.startswith("cuda")
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuDNN {torch.backends.cudnn.version() if cuda else '-'}")
print(f"device {device}: {torch.cuda.get_device_name(device) if cuda else 'CPU'}")
B, nh, T, hs = (8, 12, 1024, 64) if cuda else (2, 2, 64, 32)  # GPT-2 124M's attention (fewer rows), or the tiny one's
dtype = torch.bfloat16 if cuda else torch.float32
q, k, v = (torch.randn(B, nh, T, hs, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()  # warm-up
with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
ops = sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name and "backward" not in e.name})
kernels = sorted({e.name[:80] for e in prof.events() if cuda and e.device_type.name == "CUDA"
                  and any(s in e.name.lower() for s in ("flash", "fmha", "attention", "cudnn", "sdpa"))})
print(f"sdpa at (B, nh, T, hs) = {(B, nh, T, hs)} {dtype}, causal: {', '.join(ops)}")
for kernel in kernels:
    print(f"sdpa kernel: {kernel}")
if cuda:  # fail here, not in the middle of training, where the compiler's toolchain is missing
    print(f"compile: {torch.compile(lambda x: x * 2)(torch.ones(4, device=device)).sum().item() == 8}")
EOF

# synthetic data: GPT-2 token ids in fineweb.py's shards, HellaSwag examples in the real schema
$PY - "$WORK" "$HELLA_EXAMPLES" <<'EOF' || { echo "== data: FAILED"; exit 1; }
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, ".")
from bench.bench_hellaswag import synthetic_examples

work, n = Path(sys.argv[1]), int(sys.argv[2])
(work / "shards").mkdir(exist_ok=True)
rng = np.random.default_rng(0)
for i, split in enumerate(["val", "train", "train"]):
    tokens = rng.integers(0, 50257, size=10_000_000 if n > 1000 else 200_000, dtype=np.uint16)
    np.save(work / "shards" / f"smoke_{split}_{i:06d}.npy", tokens)
(work / "hellaswag_val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in synthetic_examples(n)))
print(f"data {work}: 3 shards, {n} HellaSwag examples")
EOF

# 2. the default recipe through the real command line: compile, autocast, fused AdamW (CUDA), accumulation,
#    in-loop validation + HellaSwag + samples, a checkpoint; recompiles and graph breaks logged
EVERY=6; [ $QUICK = 1 ] && EVERY=0  # quick: evaluations at steps 0 and 11, the one checkpoint at step 11
TRAIN=(train_gpt2.py --data "$WORK/shards" --log-dir "$WORK/run" ${MODEL[@]+"${MODEL[@]}"} "${BATCH[@]}"
       --device "$DEVICE" --compile --eval-interval $((EVERY ? EVERY : 11)) --val-steps 2
       --hellaswag-file "$WORK/hellaswag_val.jsonl" --num-samples 2 --checkpoint-interval $EVERY --warmup-steps 4)
TORCH_LOGS=recompiles,graph_breaks stage train $PY "${TRAIN[@]}" --max-steps 12

# 3. the checkpoint through every command that takes one, and a resumed run
CKPT="$WORK/run/model_00011.pt"
stage sample $PY train_gpt2.py sample -m "$CKPT" --device "$DEVICE" --num-samples 2 --max-new-tokens 24
stage hellaswag $PY hellaswag.py -m "$CKPT" -d "$DEVICE" --data-file "$WORK/hellaswag_val.jsonl"
stage export $PY train_gpt2.py export "$CKPT" "$WORK/hf"
stage resume $PY "${TRAIN[@]}" --max-steps 14 --resume --checkpoint-interval 0

# 3b. the modern recipe (nanochat's model and optimizer: value embeddings, smear, NorMuon; WSD) on the same shapes:
#     stopped after step 3 with a checkpoint, then resumed to the end
MODERN=(train_gpt2.py --recipe modern --data "$WORK/shards" --log-dir "$WORK/modern" ${MODEL[@]+"${MODEL[@]}"}
        "${BATCH[@]}" --device "$DEVICE" $MODERN_COMPILE --eval-interval 3 --val-steps 2 --no-hellaswag
        --num-samples 1 --checkpoint-interval 3 --max-steps 6)
stage modern $PY "${MODERN[@]}" --stop-after-step 3
stage modern_resume $PY "${MODERN[@]}" --resume

# 4. the memory levers (compiled on a GPU): float16 with loss scaling and activation checkpointing in one
#    process; FSDP over 2 ranks (Gloo on a CPU; on GPUs where there are 2)
LEVERS=(train_gpt2.py --data "$WORK/shards" ${MODEL[@]+"${MODEL[@]}"} "${BATCH[@]}" --device "$DEVICE"
        --eval-interval 0 --no-hellaswag --num-samples 0 --max-steps 4 --warmup-steps 2 --checkpoint-interval 0)
[ $QUICK = 1 ] || stage float16_ac $PY "${LEVERS[@]}" --log-dir "$WORK/float16_ac" --dtype float16 \
    --activation-checkpointing
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
if [ $QUICK = 0 ] && { [[ $DEVICE != cuda* ]] || [ "$GPUS" -ge 2 ]; }; then
    DEV=(); [[ $DEVICE == cuda* ]] && DEV=(--device auto)  # under torchrun each rank takes its own GPU
    stage fsdp $PY -m torch.distributed.run --standalone --nproc_per_node 2 "${LEVERS[@]}" --log-dir "$WORK/fsdp" \
        --shard fsdp --activation-checkpointing ${DEV[@]+"${DEV[@]}"}
fi

# 5. the benchmarks
[ $QUICK = 1 ] || stage bench_train $PY bench/bench_train.py ${MODEL[@]+"${MODEL[@]}"} --seq-len "$SEQ" \
    --device "$DEVICE" --micro-batch-sizes "$BENCH_B" --compile "$BENCH_COMPILE" --loss-chunks "$BENCH_CHUNKS" \
    "${BENCH_STEPS[@]}"
stage bench_hellaswag $PY bench/bench_hellaswag.py -d "$DEVICE" "${HELLA_BENCH[@]}"  # GPU: the 124M checkpoint
stage bench_generate $PY bench/bench_generate.py --device "$DEVICE" ${GEN_MODEL[@]+"${GEN_MODEL[@]}"} "${GEN[@]}"

MODE=all; [ $QUICK = 1 ] && MODE=quick
if [ ${#FAILED[@]} -gt 0 ]; then echo "smoke: FAILED: ${FAILED[*]} (logs in $WORK; $((SECONDS - START)) s)"; exit 1; fi
echo "smoke: $MODE stages ok on $DEVICE in $((SECONDS - START)) s"
