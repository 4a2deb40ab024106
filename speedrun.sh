#!/usr/bin/env bash
# The whole nanochat pipeline in one go: tokenizer -> base model -> midtraining -> chat SFT -> evaluation
# -> report card, then one sample answer. The CPU profile adds an RL stage (chat_rl) on SpellingBee, a skill
# it visibly learns: its accuracy after base, mid, SFT and RL is a row of the report's summary table.
#
#   bash speedrun.sh          the reference run, as nanochat's: 8 GPUs, depth 20, FineWeb-Edu from the hub
#                             (~4 hours on 8xH100). WANDB_RUN=name to log to wandb.
#   bash speedrun.sh cpu      the CPU profile: every stage at a tiny size, on local data, in <= 20 minutes on
#                             a 2-core machine. Data: $NANOCHAT_DATA_DIR, default ../shared/data (the mirror).
#                             NANOCHAT_CPU_TINY=1 makes it smaller still (the end-to-end test: ~3 minutes).
#
# Both profiles create the virtual environment .venv (or reuse a working one), write everything under
# $NANOCHAT_BASE_DIR (default ~/.cache/nanochat), print the time of every stage, and leave the report at
# $NANOCHAT_BASE_DIR/report/report.md (summary table, loss plots in report/plots/).
#
# A speedrun starts from scratch by design: every training stage gets overwrite = 1, so the tokenizer and the
# checkpoints of an earlier run in the same $NANOCHAT_BASE_DIR are replaced (the script says so in its log)
# and `bash speedrun.sh cpu` can run twice in a row. To keep an earlier run, use another NANOCHAT_BASE_DIR.
set -euo pipefail
cd "$(dirname "$0")"

PROFILE="${1:-gpu}"
if [ "$PROFILE" != "gpu" ] && [ "$PROFILE" != "cpu" ]; then
    echo "usage: bash speedrun.sh [cpu]" >&2
    exit 2
fi
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export WANDB_RUN="${WANDB_RUN:-dummy}"  # 'dummy' disables wandb
mkdir -p "$NANOCHAT_BASE_DIR"
OVERWRITE=--overwrite=1  # see the header: a speedrun replaces an earlier run's tokenizer and checkpoints
echo "speedrun: every training stage runs with overwrite = 1: the tokenizer and checkpoints of an earlier run" \
     "in $NANOCHAT_BASE_DIR are replaced (use another NANOCHAT_BASE_DIR to keep them)"

# -----------------------------------------------------------------------------
# Python environment (idempotent: a .venv that already imports everything is reused)

# NANOCHAT_PYTHON=/path/to/python skips the set-up and uses that interpreter (the end-to-end test does).
if [ -n "${NANOCHAT_PYTHON:-}" ]; then
    PY="$NANOCHAT_PYTHON"
else
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    if ! .venv/bin/python -c "import torch, tiktoken, rustbpe, pyarrow, matplotlib, nanochat" >/dev/null 2>&1; then
        .venv/bin/pip install torch==2.13.0 -e .
    fi
    PY=.venv/bin/python
fi

# -----------------------------------------------------------------------------
# Stage timing

STAGE_NAMES=()
STAGE_SECONDS=()
RUN_START=$(date +%s)
stage() {  # stage "name" command...: run it, remember how long it took
    local name="$1"
    shift
    echo
    echo "=== $name: $* ==="
    local t0
    t0=$(date +%s)
    "$@"
    STAGE_NAMES+=("$name")
    STAGE_SECONDS+=($(( $(date +%s) - t0 )))
    echo "=== $name: done in ${STAGE_SECONDS[-1]}s ==="
}
print_timings() {  # to the terminal, and as a "Stage timings" section of the report
    local i pairs=()
    echo
    echo "Stage timings:"
    for i in "${!STAGE_NAMES[@]}"; do
        printf "  %-16s %6ss\n" "${STAGE_NAMES[$i]}" "${STAGE_SECONDS[$i]}"
        pairs+=("${STAGE_NAMES[$i]}=${STAGE_SECONDS[$i]}")
    done
    local total=0
    for i in "${!STAGE_SECONDS[@]}"; do total=$(( total + STAGE_SECONDS[i] )); done
    printf "  %-16s %6ss (sum of the stages; %ss since the start)\n" "total" "$total" "$(( $(date +%s) - RUN_START ))"
    $PY -m nanochat.report timings "${pairs[@]}" >/dev/null
}

# -----------------------------------------------------------------------------
# The reference run: 8 GPUs, depth 20 (nanochat's speedrun)

if [ "$PROFILE" = "gpu" ]; then
    unset NANOCHAT_DATA_DIR  # pretraining shards and task data come from the hub
    export OMP_NUM_THREADS=1
    NPROC="${NPROC_PER_NODE:-8}"
    TORCHRUN=(.venv/bin/torchrun --standalone --nproc_per_node="$NPROC")

    stage report_reset $PY -m nanochat.report reset
    # ~2B characters for the tokenizer need 8 shards (250M characters each); 240 shards (~24GB) for depth 20
    stage data_init $PY -m nanochat.dataset -n 8
    $PY -m nanochat.dataset -n 240 &
    DATASET_PID=$!
    stage tok_train $PY -m scripts.tok_train --max_chars=2000000000 $OVERWRITE
    stage tok_eval $PY -m scripts.tok_eval
    if [ ! -d "$NANOCHAT_BASE_DIR/eval_bundle" ]; then
        curl -L -o "$NANOCHAT_BASE_DIR/eval_bundle.zip" https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip
        unzip -q "$NANOCHAT_BASE_DIR/eval_bundle.zip" -d "$NANOCHAT_BASE_DIR"
        rm "$NANOCHAT_BASE_DIR/eval_bundle.zip"
    fi
    echo "Waiting for the pretraining shards..."
    wait "$DATASET_PID"

    stage base_train "${TORCHRUN[@]}" -m scripts.base_train -- --depth=20 --run="$WANDB_RUN" $OVERWRITE
    stage base_loss "${TORCHRUN[@]}" -m scripts.base_loss
    stage base_eval "${TORCHRUN[@]}" -m scripts.base_eval
    stage mid_train "${TORCHRUN[@]}" -m scripts.mid_train -- --run="$WANDB_RUN" $OVERWRITE
    stage chat_eval_mid "${TORCHRUN[@]}" -m scripts.chat_eval -- -i mid
    stage chat_sft "${TORCHRUN[@]}" -m scripts.chat_sft -- --run="$WANDB_RUN" $OVERWRITE
    stage chat_eval_sft "${TORCHRUN[@]}" -m scripts.chat_eval -- -i sft
    print_timings
    $PY -m nanochat.report generate
    echo
    $PY -m scripts.chat_cli -i sft -p "Why is the sky blue?"
    exit 0
fi

# -----------------------------------------------------------------------------
# The CPU profile: tiny sizes, local data

export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$(cd .. && pwd)/shared/data}"
if [ ! -d "$NANOCHAT_DATA_DIR/pretrain" ]; then
    echo "No dataset mirror at $NANOCHAT_DATA_DIR (expected $NANOCHAT_DATA_DIR/pretrain/*.parquet): set NANOCHAT_DATA_DIR" >&2
    exit 1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
echo "CPU profile | data: $NANOCHAT_DATA_DIR | outputs: $NANOCHAT_BASE_DIR | threads: $OMP_NUM_THREADS"

if [ "${NANOCHAT_CPU_TINY:-0}" = "1" ]; then  # the end-to-end test's size
    TOK_CHARS=1000000; VOCAB=1024
    DEPTH=2; ASPECT=32; HEAD_DIM=32; SEQ=128; BASE_BS=4; BASE_TOTAL=1024; BASE_ITERS=20
    EVAL_TOKENS=2048; SPLIT_TOKENS=2048
    MID_BS=4; MID_TOTAL=1024; MID_ITERS=10
    MID_TRAIN='["ChitChat:train", "GSM8K:main:train", "SpellingBee:train:0:1000"]'
    SFT_BS=2; SFT_EXAMPLES=4; SFT_ITERS=6
    SFT_TRAIN='["ChitChat:train:0:200", "GSM8K:main:train:0:50", "SpellingBee:train:0:100"]'
    EVAL_PROBLEMS=4; EVAL_TOKENS_GEN=16; SKILL_PROBLEMS=4
    RL_ARGS=(--max_iterations=2 --examples_per_step=2 --num_samples=2 --device_batch_size=2 --eval_examples=4
             --eval_samples=2)
else  # about 15 minutes on 2 cores, before the one-off environment set-up
    TOK_CHARS=10000000; VOCAB=2048
    DEPTH=4; ASPECT=48; HEAD_DIM=64; SEQ=256; BASE_BS=16; BASE_TOTAL=4096; BASE_ITERS=250
    EVAL_TOKENS=32768; SPLIT_TOKENS=65536
    MID_BS=16; MID_TOTAL=4096; MID_ITERS=80
    # SpellingBee @10: its short conversations are then about half of midtraining's tokens (a few thousand examples:
    # fewer, and the model does not learn to copy the word into the tool call)
    MID_TRAIN='["ChitChat:train", "GSM8K:main:train", "SpellingBee:train@10"]'
    SFT_BS=4; SFT_EXAMPLES=16; SFT_ITERS=40
    SFT_TRAIN='["ChitChat:train", "ARC:ARC-Easy:train", "ARC:ARC-Challenge:train", "GSM8K:main:train", "SpellingBee:train"]'
    EVAL_PROBLEMS=32; EVAL_TOKENS_GEN=64; SKILL_PROBLEMS=100
    RL_ARGS=()  # configs/rl_cpu.txt as it is
fi
CHAT_TASKS="ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval"
SKILL=(-a SpellingBee -x $SKILL_PROBLEMS -m 32)  # the synthetic skill, on more held-out problems than the others

stage report_reset $PY -m nanochat.report reset
stage tok_train $PY -m scripts.tok_train --max_chars=$TOK_CHARS --vocab_size=$VOCAB $OVERWRITE
stage tok_eval $PY -m scripts.tok_eval
stage base_train $PY -m scripts.base_train --depth=$DEPTH --aspect_ratio=$ASPECT --head_dim=$HEAD_DIM \
    --max_seq_len=$SEQ --device_batch_size=$BASE_BS --total_batch_size=$BASE_TOTAL --num_iterations=$BASE_ITERS \
    --eval_every=$(( BASE_ITERS / 5 )) --eval_tokens=$EVAL_TOKENS --sample_every=-1 --core_metric_every=-1 \
    --run="$WANDB_RUN" $OVERWRITE
stage base_loss $PY -m scripts.base_loss --device_batch_size=$BASE_BS --split_tokens=$SPLIT_TOKENS
stage base_eval $PY -m scripts.base_eval --max_per_task=16
stage skill_base $PY -m scripts.chat_eval -i base "${SKILL[@]}"
stage mid_train $PY -m scripts.mid_train --device_batch_size=$MID_BS --total_batch_size=$MID_TOTAL \
    --num_iterations=$MID_ITERS --eval_every=$(( MID_ITERS / 3 )) --eval_tokens=$EVAL_TOKENS \
    --train_mixture="$MID_TRAIN" --val_mixture='["ChitChat:test", "GSM8K:main:test:0:100"]' \
    --run="$WANDB_RUN" $OVERWRITE
stage chat_eval_mid $PY -m scripts.chat_eval -i mid -a "$CHAT_TASKS" -x $EVAL_PROBLEMS -m $EVAL_TOKENS_GEN
stage skill_mid $PY -m scripts.chat_eval -i mid "${SKILL[@]}"
stage chat_sft $PY -m scripts.chat_sft --source=mid --device_batch_size=$SFT_BS \
    --target_examples_per_step=$SFT_EXAMPLES --max_iterations=$SFT_ITERS --max_seq_len=$SEQ \
    --train_mixture="$SFT_TRAIN" --val_mixture='["ChitChat:test"]' --eval_every=$(( SFT_ITERS / 2 )) --eval_steps=4 \
    --eval_metrics_every=-1 --run="$WANDB_RUN" $OVERWRITE
stage chat_eval_sft $PY -m scripts.chat_eval -i sft -a "$CHAT_TASKS" -x $EVAL_PROBLEMS -m $EVAL_TOKENS_GEN
stage skill_sft $PY -m scripts.chat_eval -i sft "${SKILL[@]}"
stage chat_rl $PY -m scripts.chat_rl --config configs/rl_cpu.txt "${RL_ARGS[@]}" --run="$WANDB_RUN" $OVERWRITE
stage skill_rl $PY -m scripts.chat_eval -i rl "${SKILL[@]}"
print_timings
$PY -m nanochat.report generate
echo
echo "Sample answer (python -m scripts.chat_cli -i sft -p ...):"
$PY -m scripts.chat_cli -i sft -p "Hi! How are you today?" -m $EVAL_TOKENS_GEN
echo "Sample answer after RL (python -m scripts.chat_cli -i rl -p ...):"
$PY -m scripts.chat_cli -i rl -p "How many 'r' are in 'strawberry'?" -m 32
