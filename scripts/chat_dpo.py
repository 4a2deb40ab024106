"""
Chat DPO: preference tuning of an SFT (or RL) checkpoint with Direct Preference Optimization (Rafailov et al.
2023) on `{"prompt" | "messages", "chosen", "rejected"}` rows (JSONL / Parquet; chosen and rejected a string or a
list of one assistant message, TRL's format):
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_dpo -- --data "['prefs.jsonl']"       # 8 GPUs
    python -m scripts.chat_dpo --data "['prefs.jsonl']"                                           # 1 GPU
    python -m scripts.chat_dpo --config configs/dpo_cpu.txt                                       # tiny, CPU
The reference log-probs are the starting model's, computed once before the first step (no second model in
memory) and cached beside the run (reference_logps.json, reused on resume). Options: --help. Writes
<base_dir>/chatdpo_checkpoints/<output_tag>/ and the "Chat DPO" report section. Load the result with `-i dpo`.
Tests: tests/test_dpo.py, tests/test_chat_dpo.py.
"""

import os
import random
import time

import numpy as np
import torch

from nanochat.checkpoint_manager import SOURCE_DIRS, build_model, describe_checkpoint
from nanochat.checks import check_finite_parameters
from nanochat.common import (UserError, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             get_dist_info, init_wandb, install_error_handler, print0)
from nanochat.config import Option, load_config, run_options
from nanochat.dpo import (METRIC_KEYS, PACKINGS, collate_pairs, dpo_accumulate_step, evaluate_dpo, fits,
                          load_preferences, load_reference, rank_batch_indices, reference_fingerprint, reference_logps,
                          save_reference, step_pair_indices)
from nanochat.report import format_duration, get_report
from nanochat.runs import (check_resume_config, load_resume, prepare_finetune, prune_checkpoints,
                           save_training_checkpoint, tokenizer_sha256)
from nanochat.schedules import lr_multiplier, num_grad_accum_steps, scale_initial_lr, set_lr_multiplier
from nanochat.sft_report import format_skip
from nanochat.tokenizer import get_tokenizer

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    Option("run", str, "dummy", "wandb run name ('dummy' disables wandb; no API key: offline into the run folder)"),
    Option("source", str, "sft", "checkpoint to start from (and the frozen reference)",
           choices=tuple(s for s in ("sft", "rl", "dpo", "mid") if s in SOURCE_DIRS)),
    Option("model_tag", str, None, "model tag of the source checkpoint to load (default: largest d<depth>)"),
    Option("step", int, None, "checkpoint step to load (default: last)", min=0),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA", choices=("bfloat16", "float32")),
    Option("data", list, [], "preference files: JSONL / Parquet rows of prompt|messages, chosen, rejected"),
    Option("val_fraction", float, 0.1, "share of the pairs held out (after a seeded shuffle) for validation",
           min=0.0, max=0.9),
    Option("beta", float, 0.1, "DPO beta: strength of the KL tie to the reference (Rafailov et al. 2023: 0.1-0.5)",
           min=1e-6, max=100.0),
    Option("device_batch_size", int, 4, "pairs per device per micro-step (chosen + rejected: 2 sequences each)",
           min=1),
    Option("target_pairs_per_step", int, 32, "pairs per optimizer step, all ranks", min=1),
    Option("num_epochs", int, 1, "passes over the training pairs", min=1),
    Option("max_iterations", int, -1, "cap on optimizer steps (-1: no cap)", min=1, disabled=-1),
    Option("unembedding_lr", float, 0.004, "AdamW lr of the lm_head", min=0.0),
    Option("embedding_lr", float, 0.2, "AdamW lr of the token embedding", min=0.0),
    Option("matrix_lr", float, 0.02, "Muon lr of the transformer matrices", min=0.0),
    Option("weight_decay", float, 0.0, "AdamW weight decay", min=0.0),
    Option("init_lr_frac", float, 0.02, "every lr is multiplied by this (as chat_sft: from a trained model)", min=0.0),
    Option("packing", str, "pad", "pad (2 rows per pair, padded to the longest) | bestfit (sequences packed into rows)",
           choices=PACKINGS),
    Option("max_seq_len", int, 2048, "longest conversation / packed row, in input positions; longer pairs are "
                                     "dropped", min=1),
    Option("eval_every", int, 50, "held-out metrics every N steps and at the end (-1: never)", min=1, disabled=-1),
    Option("device_type", str, "", "autodetect if empty", choices=("", "cuda", "cpu", "mps")),
    Option("seed", int, 42, "torch/python/numpy seed and the train/validation split", min=0),
    *run_options("chatdpo_checkpoints"),  # output_tag, overwrite, save_every, resume (checkpoint_manager)
]
script_start = time.time()  # the stage's wall-clock time goes into its report section
config = load_config(OPTIONS, description=__doc__)
if not config["data"]:
    raise UserError("data is empty: give preference files, e.g. --data \"['prefs.jsonl']\" (rows of prompt, chosen, "
                    "rejected)")
for path in config["data"]:  # before any model is loaded
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist: check the path in `data`")
num_grad_accum_steps(config["target_pairs_per_step"], config["device_batch_size"] * get_dist_info()[3],
                     "target_pairs_per_step", "device_batch_size * world_size")

# -----------------------------------------------------------------------------
# Compute init

device_type = config["device_type"] or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
master_process = ddp_rank == 0
torch.manual_seed(config["seed"])
random.seed(config["seed"])
np.random.seed(config["seed"])
autocast = lambda: autocast_ctx(device_type, config["dtype"])  # noqa: E731  (a fresh context per use)
synchronize = torch.cuda.synchronize if device_type == "cuda" else lambda: None

# -----------------------------------------------------------------------------
# Output folder and resume, decided before any model or data is loaded

source_dir, source_step, source_meta, plan = prepare_finetune(
    config["source"], config["model_tag"], config["step"], "chatdpo_checkpoints", config["output_tag"],
    config["resume"], config["overwrite"], ddp_rank, ddp_world_size)
check_resume_config(plan, config)  # same pairs, order and batch as the resumed run
print0(f"Output folder: {plan.output_dir} | run id {plan.run_id}")

# -----------------------------------------------------------------------------
# Tokenizer and preference pairs: a seeded shuffle, the held-out share, pairs too long for a row dropped

tokenizer = get_tokenizer()
pad_id = tokenizer.encode_special("<|assistant_end|>")  # padding the SFT guide uses; its targets are -1 anyway
row_capacity = config["max_seq_len"] + 1  # tokens per row: max_seq_len input positions + the last target
all_pairs = load_preferences(config["data"], tokenizer)
random.Random(config["seed"]).shuffle(all_pairs)
kept = [pair for pair in all_pairs if fits(pair, row_capacity)]
num_dropped = len(all_pairs) - len(kept)
num_val = int(round(len(kept) * config["val_fraction"]))
splits = {"train": kept[num_val:], "val": kept[:num_val]}
device_batch_size = config["device_batch_size"]
grad_accum_steps = num_grad_accum_steps(config["target_pairs_per_step"], device_batch_size * ddp_world_size,
                                        "target_pairs_per_step", "device_batch_size * world_size")
num_iterations = len(splits["train"]) * config["num_epochs"] // config["target_pairs_per_step"]
if config["max_iterations"] > 0:
    num_iterations = min(num_iterations, config["max_iterations"])
if num_iterations <= 0:
    raise UserError(f"no optimizer steps: {len(splits['train'])} training pairs ({num_dropped} longer than "
                    f"max_seq_len dropped) for target_pairs_per_step={config['target_pairs_per_step']}; add data, "
                    f"raise num_epochs or lower target_pairs_per_step")
print0(f"Preference pairs: {len(splits['train']):,} train | {len(splits['val']):,} held out | {num_dropped} dropped "
       f"(longer than max_seq_len = {config['max_seq_len']})")
print0(f"Pairs per step: {config['target_pairs_per_step']} = device_batch_size {device_batch_size} x world_size "
       f"{ddp_world_size} x grad_accum_steps {grad_accum_steps} | number of iterations: {num_iterations} | "
       f"beta {config['beta']}")


def collate(pairs, ref=None):
    return collate_pairs(pairs, config["packing"], row_capacity, pad_id, ref)


# -----------------------------------------------------------------------------
# Model (from the source checkpoint, or from the checkpoint being resumed)

tokenizer_sha = tokenizer_sha256()
load_dir, load_step = (plan.resume_dir, plan.resume_step) if plan.resume_dir else (source_dir, source_step)
model, _, load_meta = build_model(load_dir, load_step, device, phase="train")
print0(f"{'Resuming from' if plan.resume_dir else 'Loaded checkpoint:'} "
       f"{describe_checkpoint(load_dir, load_step, load_meta)}")
print0(f"Model: depth {model.config.n_layer}, {model.num_params():,} parameters")

# -----------------------------------------------------------------------------
# Reference log-probs: the starting model's, once, before any step (cached beside the run, reused on resume)

reference_path = os.path.join(plan.output_dir, "reference_logps.json")
fingerprint = reference_fingerprint(kept, f"run {source_meta.get('run_id')} step {source_step} | dtype "
                                          f"{config['dtype']} on {device_type} | packing {config['packing']} | "
                                          f"val {num_val}")
if plan.resume_dir is not None:  # the resumed run's cache (resume = <folder> may continue into another folder)
    resumed_path = os.path.join(plan.resume_dir, "reference_logps.json")
    reference = load_reference(resumed_path, fingerprint)
    if master_process and os.path.realpath(resumed_path) != os.path.realpath(reference_path):
        save_reference(reference_path, fingerprint, reference)
    print0(f"Reference log-probs: reused from {resumed_path}")
else:
    t0 = time.time()
    model.eval()
    reference = {split: reference_logps(model, pairs, 2 * device_batch_size, collate, device, ddp_rank,
                                        ddp_world_size, autocast) for split, pairs in splits.items()}
    model.train()
    if master_process:
        save_reference(reference_path, fingerprint, reference)
    print0(f"Reference log-probs: {len(kept):,} pairs in {time.time() - t0:.1f}s -> {reference_path}")


def pair_batch(split, indices):
    return collate([splits[split][i] for i in indices], reference[split][indices])


val_batches = [pair_batch("val", indices)  # this rank's share of the held-out pairs
               for indices in rank_batch_indices(num_val, device_batch_size, ddp_rank, ddp_world_size)]
wandb_run = init_wandb(config["run"], "nanochat-dpo", config, ddp_rank, run_dir=plan.output_dir)

# -----------------------------------------------------------------------------
# Optimizers: chat_sft's three learning rates, all scaled by init_lr_frac

optimizers = model.setup_optimizers(unembedding_lr=config["unembedding_lr"], embedding_lr=config["embedding_lr"],
                                    matrix_lr=config["matrix_lr"], weight_decay=config["weight_decay"])
scale_initial_lr(optimizers, config["init_lr_frac"])

# -----------------------------------------------------------------------------
# Resume state (optimizer, step, RNG, series) or a fresh start; the data position is the step

start_step = 0
totals = {"skipped_nonfinite": 0, "skipped_oom": 0}
series = {f"{split}_{key}": [] for split in ("train", "val") for key in METRIC_KEYS}  # [step, value] points
val_metrics, train_metrics = {}, {}
if plan.resume_dir is not None:
    run_state = load_resume(plan.resume_dir, plan.resume_step, optimizers, ddp_rank, ddp_world_size, num_iterations,
                            device)
    start_step, series = run_state["step"], run_state["loss_series"]
    totals, val_metrics = run_state["counters"]["totals"], run_state["counters"]["val_metrics"]
    train_metrics = run_state["counters"]["train_metrics"]


def save(step):
    """A resumable checkpoint: this rank's run state, the model, the optimizer states and, last, the meta."""
    run_state = dict(num_iterations=num_iterations, data_state={"step": step}, loss_series=series,
                     counters={"totals": totals, "val_metrics": val_metrics, "train_metrics": train_metrics})
    meta = {"user_config": config, "run_id": plan.run_id, "run_name": config["run"], "tokenizer_sha256": tokenizer_sha,
            "source": config["source"], "source_dir": source_dir, "source_step": source_step,
            "metrics": {f"val_{k}": v for k, v in val_metrics.items()}, "totals": totals}
    save_training_checkpoint(plan.output_dir, step, model, optimizers, run_state, meta, ddp_rank, ddp_world_size,
                             device)
    prune_checkpoints(plan.output_dir, config["keep_last"], ddp_rank)


def metrics_text(metrics):
    return " | ".join(f"{k}: {metrics[k]:.6f}" for k in METRIC_KEYS)


# -----------------------------------------------------------------------------
# Training loop: step s trains with lrm = 1 - s / num_iterations; held-out metrics before step s and after
# the last step (at s == num_iterations)

train_time, loop_t0 = 0.0, time.time()
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    resumed_here = plan.resume_dir is not None and step == start_step  # evaluated and saved before the interruption

    # once in a while: the held-out metrics (every held-out pair)
    if config["eval_every"] > 0 and num_val and (last_step or step % config["eval_every"] == 0) and not resumed_here:
        model.eval()
        val_metrics = evaluate_dpo(model, val_batches, config["beta"], device, ddp_world_size, autocast)
        print0(f"Step {step:05d} | Validation | {metrics_text(val_metrics)}")
        wandb_run.log({"step": step, **{f"val_{k}": v for k, v in val_metrics.items()}})
        for key in METRIC_KEYS:
            series[f"val_{key}"].append([step, val_metrics[key]])
        model.train()

    # once in a while: a resumable checkpoint (the final one is written after the loop)
    if config["save_every"] > 0 and 0 < step < num_iterations and step % config["save_every"] == 0 \
            and not resumed_here:
        save(step)

    if last_step:
        break

    # one optimizer step: its micro-batches (the plan is the step), forward/backward, skipped on NaN / OOM
    synchronize()
    t0 = time.time()
    micro_batches = [pair_batch("train", step_pair_indices(step, m, ddp_rank, ddp_world_size, device_batch_size,
                                                           grad_accum_steps, len(splits["train"])))
                     for m in range(grad_accum_steps)]
    result = dpo_accumulate_step(model, micro_batches, config["beta"], device, ddp_world_size, ddp_rank, autocast)
    lrm = lr_multiplier(step, num_iterations)
    progress = f"step {step + 1}/{num_iterations} | elapsed {format_duration(time.time() - loop_t0)}"
    if result.skip is not None:
        totals["skipped_oom" if result.skip == "out of memory" else "skipped_nonfinite"] += 1
        line, log = format_skip(step, result.skip, totals)
        print0(f"{line} | {progress}")
        wandb_run.log(log)
        continue
    set_lr_multiplier(optimizers, lrm)
    for opt in optimizers:
        opt.step()  # averages gradients across ranks inside
    check_finite_parameters(model, step)  # stop before NaN/inf weights are trained on or saved
    model.zero_grad(set_to_none=True)
    synchronize()
    dt = time.time() - t0
    train_time += dt
    train_metrics = {k: result.metrics[k] for k in METRIC_KEYS}
    print0(f"Step {step:05d} | Training | {metrics_text(train_metrics)} | lrm: {lrm:.6f} | dt: {dt * 1000:.0f}ms | "
           f"{progress}")
    wandb_run.log({"step": step, "lrm": lrm, **{f"train_{k}": v for k, v in train_metrics.items()}})
    for key in METRIC_KEYS:
        series[f"train_{key}"].append([step, train_metrics[key]])

# -----------------------------------------------------------------------------
# The final checkpoint, the report section, cleanup

save(num_iterations)
print0(f"Training time: {format_duration(train_time)} | skipped steps: {totals['skipped_nonfinite']} non-finite, "
       f"{totals['skipped_oom']} out of memory")
report = get_report()
summary = {"Training pairs": len(splits["train"]), "Held-out pairs": num_val, "Dropped pairs (too long)": num_dropped,
           "Number of iterations": num_iterations, "Skipped steps (non-finite)": totals["skipped_nonfinite"],
           "Skipped steps (out of memory)": totals["skipped_oom"], "Training time": format_duration(train_time),
           **{f"Final train {k}": v for k, v in train_metrics.items()},
           **{f"Final val {k}": v for k, v in val_metrics.items()}}
report.log(section="Chat DPO", data=[config, summary], duration_s=time.time() - script_start)
for name, points in series.items():  # the log-probs (tens of nats) get their own plot, apart from loss and accuracy
    if points:
        plot = "Chat DPO log-probs" if name.endswith("_logp") else "Chat DPO"
        report.log_series(plot, name, [p[0] for p in points], [p[1] for p in points])
wandb_run.finish()
compute_cleanup()
