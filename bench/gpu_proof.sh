#!/usr/bin/env bash
# One command that proves the CUDA path on a bare, offline GPU machine (one NVIDIA H200 with PyTorch preinstalled),
# from a copy of this repository, in under 8 minutes:
#
#     bash bench/gpu_proof.sh                  # on the GPU machine; logs under $OUT (default: gpu_proof_out/)
#     bash bench/gpu_proof.sh --cpu-dry-run    # the same sequence at tiny sizes on CPU (~1-2 min; tests/test_gpu_proof.py)
#
# The machine lacks a few packages the project needs (rustbpe for the tokenizer; datasets, dill and multiprocess
# for the task loaders); they travel as wheels in the git-ignored folder .whl/, filled beforehand, where pip
# works, by (Python 3.12, x86-64, the versions this project is tested with):
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl rustbpe==0.1.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# The preinstalled torch is kept (pip install --no-deps): this script never installs torch.
# Steps, each bounded by `timeout` (seconds below; PROOF_TIMEOUT_SCALE multiplies them) and logging to one file:
#   00_setup         wheels + the project installed; offline inputs made by bench/gpu_proof_setup.py (synthetic
#                    pretraining text and conversations, a tokenizer trained on it, a random-init d12 checkpoint)
#   01_cuda_tests    pytest -m cuda (the tests that need CUDA; on CPU they are skipped)
#   02_sft_step_d12  bench.sft_step at d12: {pad, bestfit} x {eager, compiled} x {chunked, full}
#   03_sft_step_d20  the same at d20
#   04_model_step    bench.model_step at d20, compiled, bf16
#   05_chat_sft      chat_sft for ~2 minutes on the random-init d12 through torchrun --nproc_per_node=1 (NCCL):
#                    bestfit, compiled (chat_sft's default on CUDA; eager on CPU), bf16, validation loss and task metrics (ARC-Easy, GSM8K) on a few problems
#   06_base_train    20 steps of base_train at d12 on the synthetic text
#   summary.txt      one line per step: name, exit code (124: timed out), seconds
# A failing step does not stop the next ones; the exit code is 1 when any step failed.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
OUT=${OUT:-$REPO/gpu_proof_out}
WORK=${PROOF_WORK:-$(mktemp -d /tmp/gpu_proof_work.XXXXXX)}
PY=${PYTHON:-python3}
SCALE=${PROOF_TIMEOUT_SCALE:-1}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export NANOCHAT_DATA_DIR="$WORK/data" NANOCHAT_BASE_DIR="$WORK/base" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, one line in summary.txt
    local name=$1 limit=$2
    shift 2
    limit=$(( limit * SCALE ))
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    if [ "$(type -t "$1")" = function ]; then  # a shell function (setup): `timeout` cannot run it; its
        LIMIT=$limit "$@" >> "$OUT/$name.log" 2>&1  # commands carry their own time limits
    else
        timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    fi
    local rc=$?
    echo "$name rc=$rc seconds=$(( SECONDS - t0 ))" | tee -a "$OUT/summary.txt"
    [ $rc -ne 0 ] && failed=1
    return 0
}

setup() {  # each command bounded by a share of the step's limit ($LIMIT)
    local t=$(( LIMIT / 3 ))
    if [ $DRY -eq 0 ]; then
        nvidia-smi || true
        if ls .whl/*.whl > /dev/null 2>&1; then  # the device notes' recipe: a target folder on PYTHONPATH
            timeout $t $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/proof_site .whl/*.whl || return 1
            export PYTHONPATH="$PYTHONPATH:/tmp/proof_site"
        fi
        timeout $t $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . \
            || echo "(editable install failed; the project is imported through PYTHONPATH)"
    fi
    timeout $t $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || return 1
    timeout $t $PY -m bench.gpu_proof_setup "$WORK" "${SETUP_ARGS[@]}"
}

if [ $DRY -eq 1 ]; then  # tiny sizes on CPU: the same steps and code paths, seconds each
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DEPTH_SMALL=2; DEPTH_LARGE=3
    SETUP_ARGS=(--depth=2 --head_dim=32 --sequence_len=64 --vocab_size=512 --chars=200000 --conversations=200)
    SFT_STEP_ARGS=(--device=cpu --max_seq_len=32 --device_batch_size=2 --vocab_size=512 --head_dim=32 --steps=1 --warmup=1 --only=pad/eager/chunked,bestfit/eager/full)
    MODEL_STEP_ARGS=(--device=cpu --depth=2 --seq_len=32 --batch_size=2 --vocab_size=512 --head_dim=32 --steps=1 --warmup=1)
    SFT_ARGS=(--device_type=cpu --max_seq_len=64 --device_batch_size=2 --target_examples_per_step=2 --max_iterations=3 --eval_every=3 --eval_steps=1 --eval_metrics_every=3 "--eval_metrics_tasks=['ARC-Easy:2','GSM8K:1']" --eval_max_new_tokens=8)
    BASE_ARGS=(--device_type=cpu --aspect_ratio=32 --head_dim=32 --max_seq_len=64 --device_batch_size=2 --total_batch_size=128 --num_iterations=3 --eval_every=3 --eval_tokens=256)
    T_TESTS=60; T_SFT_STEP=60; T_MODEL_STEP=60; T_CHAT_SFT=120; T_BASE=90; T_SETUP=120
else
    DEPTH_SMALL=12; DEPTH_LARGE=20
    SETUP_ARGS=(--depth=12 --vocab_size=8192 --chars=3000000 --conversations=4000)
    # CUDA defaults otherwise: 2048 positions, batch 8, vocab 65536; bestfit rows first (each row is printed when
    # done, so a step stopped at its limit keeps what it measured)
    SFT_STEP_ARGS=(--pad_bucket=256 --steps=5 --warmup=2 "--only=bestfit/compiled/chunked,bestfit/compiled/full,bestfit/eager/chunked,bestfit/eager/full,pad/eager/chunked,pad/eager/full,pad/compiled/chunked,pad/compiled/full")
    MODEL_STEP_ARGS=(--depth=20 --seq_len=2048 --batch_size=8 --compile)
    SFT_ARGS=(--device_batch_size=8 --target_examples_per_step=8 --max_iterations=150 --eval_every=75 --eval_steps=4 --eval_metrics_every=150 "--eval_metrics_tasks=['ARC-Easy:16','GSM8K:4']" --eval_max_new_tokens=64)
    BASE_ARGS=(--max_seq_len=2048 --device_batch_size=16 --total_batch_size=32768 --num_iterations=20 --eval_every=20 --eval_tokens=131072)
    T_TESTS=50; T_SFT_STEP=70; T_MODEL_STEP=40; T_CHAT_SFT=140; T_BASE=60; T_SETUP=45  # 7.9 min in all
fi

step 00_setup $T_SETUP setup
step 01_cuda_tests $T_TESTS $PY -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_gpu_path.py
step 02_sft_step_d$DEPTH_SMALL $T_SFT_STEP $PY -m bench.sft_step --depth=$DEPTH_SMALL "${SFT_STEP_ARGS[@]}"
step 03_sft_step_d$DEPTH_LARGE $T_SFT_STEP $PY -m bench.sft_step --depth=$DEPTH_LARGE "${SFT_STEP_ARGS[@]}"
step 04_model_step $T_MODEL_STEP $PY -m bench.model_step "${MODEL_STEP_ARGS[@]}"
step 05_chat_sft $T_CHAT_SFT $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m scripts.chat_sft -- \
    --source=base --model_tag=d$DEPTH_SMALL --packing=bestfit --dtype=bfloat16 \
    "--train_mixture=['CustomJSON:$WORK/conversations.jsonl']" "--val_mixture=['CustomJSON:$WORK/conversations.jsonl:0:64']" \
    "${SFT_ARGS[@]}"
step 06_base_train $T_BASE $PY -m scripts.base_train --depth=$DEPTH_SMALL --output_tag=proof_d$DEPTH_SMALL \
    --sample_every=-1 --core_metric_every=-1 --save_every=-1 "${BASE_ARGS[@]}"

[ -z "${PROOF_WORK:-}" ] && rm -rf "$WORK"
echo "logs in $OUT; failed=$failed"
exit $failed
