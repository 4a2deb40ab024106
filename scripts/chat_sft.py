"""
Chat SFT: supervised fine-tuning of a base or midtrained checkpoint on a mixture of conversations, so that
the model learns to answer in the chat format. Faithful to nanochat's chat_sft.py (same keys, defaults,
data mixture, collation, schedule and log lines), plus: per-token loss normalisation across micro-batches
and ranks, best-fit packing, resumable checkpoints, and NaN / out-of-memory steps that skip cleanly.

Launch:
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --config sft_config.txt   # 8 GPUs
    python -m scripts.chat_sft --config sft_config.txt                                        # 1 GPU
    python -m scripts.chat_sft --source=base --device_batch_size=2 --target_examples_per_step=4 \\
        --max_iterations=20 --max_seq_len=512 --eval_every=10 --eval_steps=4 --eval_metrics_every=-1 \\
        --train_mixture='["ChitChat:train:0:400"]' --val_mixture='["ChitChat:test"]'           # tiny, CPU

Config file: `key = value` lines with any of the options below (python -m scripts.chat_sft --help).
Mixtures are lists of spec strings "Name[:arg...][:start[:stop[:step]]][*repeats][@weight]", e.g.
    train_mixture = ["ARC:ARC-Easy:train", "GSM8K:main:train*2", "CustomJSON:data/mine.jsonl@0.5"]
(syntax: nanochat/sft.py). Loss normalisation: loss_normalization = "token" (default) divides the summed
token loss of a step by its supervised-token count over all micro-batches and ranks, so gradient
accumulation and DDP give the gradient of one big batch; "micro_batch_mean" is the guide's formula, under
which a short conversation's tokens weigh more and the gradient changes with device_batch_size.

Differences from the guide, on purpose:
- loss_normalization = "token" (above); with "micro_batch_mean" the validation loss is also the guide's
  mean of batch means, with "token" it is the mean over all supervised tokens of the eval batches and ranks.
- The loop trains exactly num_iterations steps (lrm = 1 - step / num_iterations for step 0 .. n-1) and
  evaluates once more after the last one; the guide's loop spends its last iteration on evaluation only.
- A NaN / out-of-memory step is decided jointly by all ranks (one all-reduce) and skipped with its
  gradients dropped; a micro-batch without supervised tokens contributes zero instead of NaN.
- packing = "bestfit": a step is target_examples_per_step ROWS of max_seq_len + 1 tokens, each holding as
  many whole conversations as fit; num_iterations then counts the steps that cover num_epochs epochs.

Outputs: <base_dir>/chatsft_checkpoints/<model_tag or d<depth>>/ (model, per-rank optimizer state, meta with
the resolved config and final metrics, per-rank resume state), the "Chat SFT" report section, wandb.
Tests: tests/test_chat_sft.py (end to end, subprocesses) and tests/test_sft.py (the pure functions).
"""

import io
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from nanochat.chat_eval import CATEGORICAL_TASKS, TASK_NAMES, run_chat_eval
from nanochat.checkpoint_manager import (build_model, load_checkpoint, load_model, load_optimizer_warm_start,
                                         save_checkpoint)
from nanochat.common import (atomic_write_bytes, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, get_git_commit, get_peak_flops, init_wandb, install_error_handler, print0)
from nanochat.config import Option, load_config
from nanochat.engine import Engine
from nanochat.perf import bucketed_length, compile_model, compiled_graphs, mfu, pad_to_bucket, peak_memory_mib
from nanochat.report import get_report
from nanochat.schedules import lr_multiplier
from nanochat.sft import (LOSS_NORMALIZATIONS, build_mixture, count_steps_bestfit,
                          find_resumable_step, get_rng_state, grad_accum_steps_for, initial_data_state, metric_key,
                          micro_batch_loss_scale, num_sft_iterations, padding_fraction, parse_eval_spec,
                          resume_state_path, set_rng_state, sft_batches, skip_reason)

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    # the guide's keys and defaults
    Option("run", str, "dummy", "wandb run name ('dummy' disables wandb)"),
    Option("source", str, "mid", "checkpoint to start from: base|mid"),
    Option("model_tag", str, None, "model tag to load and save under (default: largest d<depth>)"),
    Option("step", int, None, "checkpoint step to load (default: last)"),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA: bfloat16|float32"),
    Option("device_batch_size", int, 4, "conversations (pad) or rows (bestfit) per device per micro-step"),
    Option("num_epochs", int, 1, "passes over the training mixture"),
    Option("max_iterations", int, -1, "cap on optimizer steps (-1: no cap)"),
    Option("target_examples_per_step", int, 32, "examples (pad) or rows (bestfit) per optimizer step, all ranks"),
    Option("unembedding_lr", float, 0.004, "AdamW lr of the lm_head"),
    Option("embedding_lr", float, 0.2, "AdamW lr of the token embedding"),
    Option("matrix_lr", float, 0.02, "Muon lr of the transformer matrices"),
    Option("weight_decay", float, 0.0, "AdamW weight decay"),
    Option("init_lr_frac", float, 0.02, "every lr is multiplied by this (SFT starts from a trained model)"),
    Option("eval_every", int, 100, "validation loss every this many steps and at the end (-1 disables)"),
    Option("eval_steps", int, 100, "validation batches per rank per evaluation"),
    Option("eval_metrics_every", int, 200, "task metrics every this many steps and at the end (-1 disables)"),
    # beyond the guide
    Option("device_type", str, "", "cuda|cpu|mps (empty: autodetect)"),
    Option("seed", int, 42, "torch/python/numpy seed"),
    Option("train_mixture", list, ["ARC:ARC-Easy:train", "ARC:ARC-Challenge:train", "GSM8K:main:train",
                                   "SmolTalk:train:0:10000"], "training mixture specs (see nanochat/sft.py)"),
    Option("val_mixture", list, ["SmolTalk:test"], "validation mixture specs"),
    Option("loss_normalization", str, "token",
           "token (per supervised token of the whole step) | micro_batch_mean (the guide)"),
    Option("packing", str, "pad", "pad (the guide: pad to the longest) | bestfit (pack whole conversations into rows)"),
    Option("max_seq_len", int, 2048, "longest conversation / packed row, in input positions"),
    Option("drop_long", bool, False, "drop conversations longer than max_seq_len + 1 tokens instead of truncating"),
    Option("eval_metrics_tasks", list, ["MMLU:1024", "ARC-Easy:1024", "GSM8K:64", "HumanEval:64"],
           "run_chat_eval tasks as Name[:max_problems]"),
    Option("eval_max_new_tokens", int, 512, "generation budget of the generative task metrics"),
    Option("save_every", int, -1, "resumable checkpoint every this many steps (-1 disables; the final one is always)"),
    Option("resume", str, "0", "'0': fresh run; '1': continue from the last resumable checkpoint in the output dir "
                               "(fresh if none); or a checkpoint directory"),
    Option("compile", bool, None, "torch.compile the model (default: on for CUDA, off elsewhere)"),
    Option("pad_bucket", int, 128, "compiled pad mode: round batch lengths up to a multiple of this, so the "
                                   "compiled model sees a handful of shapes (1: no rounding)", min=1),
    Option("load_optimizer", int, 0, "1: warm-start the optimizers from the source checkpoint's optimizer state",
           choices=(0, 1)),
    Option("debug_nan_step", int, -1, "testing: make this step's loss NaN (-1 disables)"),
    Option("debug_oom_step", int, -1, "testing: raise a CUDA out-of-memory error in this step (-1 disables)"),
    Option("debug_dump_grads", str, "", "testing: write the first step's rank-averaged gradients to this .pt file"),
]
config = load_config(OPTIONS, description=__doc__)
assert config["source"] in ("base", "mid"), f"source must be base or mid, got {config['source']!r}"
assert config["loss_normalization"] in LOSS_NORMALIZATIONS, f"loss_normalization must be one of {LOSS_NORMALIZATIONS}"
assert config["packing"] in ("pad", "bestfit"), f"packing must be pad or bestfit, got {config['packing']!r}"
eval_specs = [parse_eval_spec(s) for s in config["eval_metrics_tasks"]]
for task_name, _ in eval_specs:
    assert task_name in TASK_NAMES, f"eval_metrics_tasks: unknown task {task_name!r}, expected one of {TASK_NAMES}"

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
wandb_run = init_wandb(config["run"], "nanochat-sft", config, ddp_rank)


def all_reduce_sum(values):
    """Sum a list of floats over ranks (one collective), as float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if ddp_world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# -----------------------------------------------------------------------------
# Model and tokenizer (from the source checkpoint, or from the checkpoint being resumed)

base_dir = get_base_dir()
model, tokenizer, source_meta = load_model(config["source"], device, phase="train", model_tag=config["model_tag"],
                                           step=config["step"])
orig_model = model  # the uncompiled model: for saving and generation (task metrics)
depth = model.config.n_layer
output_tag = config["model_tag"] if config["model_tag"] else f"d{depth}"
checkpoint_dir = os.path.join(base_dir, "chatsft_checkpoints", output_tag)

resume_dir, resume_step = None, None
if config["resume"] not in ("0", ""):
    resume_dir = checkpoint_dir if config["resume"] == "1" else config["resume"]
    resume_step = find_resumable_step(resume_dir, ddp_rank)
    # every rank resumes from the same step: the newest one whose state every rank has (a save may have
    # been cut short on some ranks); rank 0 writes its state after the model, so the model is there too
    step_t = torch.tensor([-1 if resume_step is None else resume_step], dtype=torch.int64, device=device)
    if ddp_world_size > 1:
        dist.all_reduce(step_t, op=dist.ReduceOp.MIN)
    resume_step = None if step_t.item() < 0 else int(step_t.item())
    if resume_step is None and config["resume"] == "1":
        print0(f"resume=1: no resumable checkpoint in {resume_dir}, starting fresh")
        resume_dir = None
    elif resume_step is None:
        raise FileNotFoundError(f"resume={config['resume']!r}: no resumable SFT checkpoint there "
                                f"(sft_state_<step>_rank<r>.pt files written with save_every)")
if resume_dir is not None:
    del model
    model, tokenizer, _ = build_model(resume_dir, resume_step, device, phase="train")
    orig_model = model
    print0(f"Resuming from {resume_dir} at step {resume_step}")
num_flops_per_token = model.estimate_flops()
print0(f"Model: depth {depth}, {model.num_params():,} parameters, from {config['source']} ({source_meta.get('step')})")
use_compile = device_type == "cuda" if config["compile"] is None else config["compile"]
pad_bucket = config["pad_bucket"] if use_compile and config["packing"] == "pad" else 1  # eager: no rounding
if use_compile:  # bestfit: one shape; pad: one per bucket up to max_seq_len
    model = compile_model(orig_model, num_shapes=-(-config["max_seq_len"] // pad_bucket))

# -----------------------------------------------------------------------------
# Optimizers: the guide's three learning rates, all scaled by init_lr_frac

optimizers = model.setup_optimizers(unembedding_lr=config["unembedding_lr"], embedding_lr=config["embedding_lr"],
                                    matrix_lr=config["matrix_lr"], weight_decay=config["weight_decay"])
for opt in optimizers:
    for group in opt.param_groups:
        group["lr"] = group["lr"] * config["init_lr_frac"]
        group["initial_lr"] = group["lr"]
if config["load_optimizer"] and resume_dir is None:  # warm start: the source's moments, this run's lrs
    path = load_optimizer_warm_start(optimizers, config["source"], device, ddp_rank, ddp_world_size,
                                     model_tag=config["model_tag"], step=config["step"])
    print0(f"Optimizer state warm-started from {path}")

# -----------------------------------------------------------------------------
# Data: mixtures -> per-rank streams of CPU batches (nanochat/sft.py), moved to the device here

train_ds = build_mixture(config["train_mixture"])
val_ds = build_mixture(config["val_mixture"])
pad_id = tokenizer.encode_special("<|assistant_end|>")  # padding the guide uses; its targets are -1 anyway
row_capacity = config["max_seq_len"] + 1  # tokens per row: max_seq_len input positions + the last target
device_batch_size = config["device_batch_size"]
grad_accum_steps = grad_accum_steps_for(config["target_examples_per_step"], device_batch_size, ddp_world_size)


def render(conversation):
    # one token beyond the row tells sft_batches that the conversation was too long (truncate or drop)
    return tokenizer.render_conversation(conversation, max_tokens=row_capacity + 1)


def batches(dataset, state=None):
    return sft_batches(dataset, render, device_batch_size, pad_id, config["packing"], row_capacity,
                       config["drop_long"], ddp_rank, ddp_world_size, state=state)


def to_device(inputs, targets, segment_ids):
    inputs, targets = pad_to_bucket(inputs, targets, pad_bucket, pad_id, max_len=config["max_seq_len"])
    move = lambda t: None if t is None else t.to(device, non_blocking=device_type == "cuda")  # noqa: E731
    return move(inputs), move(targets), move(segment_ids)


if config["packing"] == "pad":
    num_iterations = num_sft_iterations(len(train_ds), config["target_examples_per_step"], config["num_epochs"],
                                        config["max_iterations"])
else:
    # a bestfit step holds as many conversations as fit: count the steps of num_epochs by replaying the
    # packing on this rank's conversation lengths, and let every rank run the smallest count
    lengths = []
    for i in range(ddp_rank, len(train_ds), ddp_world_size):
        n = len(render(train_ds[i])[0])
        if n >= 2 and not (config["drop_long"] and n > row_capacity):
            lengths.append(min(n, row_capacity))
    steps = count_steps_bestfit(lengths, device_batch_size, row_capacity, grad_accum_steps, config["num_epochs"])
    steps_t = torch.tensor([steps], dtype=torch.int64, device=device)
    if ddp_world_size > 1:
        dist.all_reduce(steps_t, op=dist.ReduceOp.MIN)
    num_iterations = int(steps_t.item())
    if config["max_iterations"] >= 0:
        num_iterations = min(num_iterations, config["max_iterations"])
assert num_iterations > 0, f"no optimizer steps: {len(train_ds)} training conversations, " \
                           f"target_examples_per_step={config['target_examples_per_step']}"
print0(f"Training conversations: {len(train_ds):,} | validation: {len(val_ds):,} | packing: {config['packing']}")
print0(f"Target examples per step: {config['target_examples_per_step']} = device_batch_size {device_batch_size} "
       f"x world_size {ddp_world_size} x grad_accum_steps {grad_accum_steps}")
print0(f"Number of iterations: {num_iterations} | loss normalisation: {config['loss_normalization']}")

# -----------------------------------------------------------------------------
# Resume state (optimizer, data position, step, RNG) or a fresh start

start_step, train_state = 0, initial_data_state()
val_loss, metrics = None, {}  # the latest evaluation, saved in checkpoint meta
totals = {"skipped_nonfinite": 0, "skipped_oom": 0, "truncated": 0, "dropped": 0, "examples": 0}
loss_series = {"train_steps": [], "train_loss": [], "val_steps": [], "val_loss": []}
if resume_dir is not None:
    _, optimizer_data, _ = load_checkpoint(resume_dir, resume_step, device, load_optimizer=True, rank=ddp_rank)
    for opt, opt_state in zip(optimizers, optimizer_data):
        opt.load_state_dict(opt_state)
    sft_state = torch.load(resume_state_path(resume_dir, resume_step, ddp_rank), map_location="cpu",
                           weights_only=True)  # plain data (tensors, numbers, strings): loading runs no code
    assert sft_state["world_size"] == ddp_world_size, \
        f"resuming needs the same world size ({sft_state['world_size']}), got {ddp_world_size}"
    assert sft_state["num_iterations"] == num_iterations, \
        f"resuming needs the same schedule: {sft_state['num_iterations']} iterations then, {num_iterations} now"
    start_step, train_state = sft_state["step"], sft_state["data_state"]
    totals, loss_series = sft_state["totals"], sft_state["loss_series"]
    val_loss, metrics = sft_state["metrics"].pop("val_loss"), sft_state["metrics"]
    set_rng_state(sft_state["rng"], device)
    del optimizer_data
train_iter = batches(train_ds, train_state)


def save(step, metrics):
    """Model (rank 0), optimizer state (every rank) and meta via checkpoint_manager; plus this rank's resume
    state (data position, step, RNG, counters) next to them."""
    meta = {"step": step, "model_config": asdict(orig_model.config), "user_config": config,
            "git_commit": get_git_commit(), "source": config["source"], "source_step": source_meta.get("step"),
            "num_iterations": num_iterations, "world_size": ddp_world_size, "metrics": metrics, "totals": totals}
    save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), [opt.state_dict() for opt in optimizers],
                    meta, rank=ddp_rank)
    sft_state = {"step": step, "data_state": train_state, "rng": get_rng_state(device), "world_size": ddp_world_size,
                 "num_iterations": num_iterations, "totals": totals, "loss_series": loss_series,
                 "metrics": dict(metrics)}
    buffer = io.BytesIO()
    torch.save(sft_state, buffer)
    atomic_write_bytes(resume_state_path(checkpoint_dir, step, ddp_rank), buffer.getvalue())


# -----------------------------------------------------------------------------
# Training loop: step s trains with lrm = 1 - s / num_iterations; evaluation happens before step s and once
# more after the last step (at s == num_iterations)

engine = Engine(orig_model, tokenizer)  # generation runs uncompiled (its shapes change every token)
peak_flops = get_peak_flops(device)
train_time = 0.0
graphs_after_first_step = 0  # torch.compile graphs after the first training step (the rest are recompilations)
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    resumed_here = resume_dir is not None and step == start_step  # evaluated and saved before the interruption

    # once in a while: validation loss, over eval_steps batches per rank, averaged over ranks
    if config["eval_every"] > 0 and (last_step or step % config["eval_every"] == 0) and not resumed_here:
        model.eval()
        val_iter = batches(val_ds)  # the same batches every time
        loss_sum = tokens = mean_sum = 0.0
        with torch.no_grad():
            for _ in range(config["eval_steps"]):
                inputs, targets, segment_ids = to_device(*next(val_iter)[:3])
                with autocast():
                    batch_loss = model(inputs, targets, loss_reduction="sum", segment_ids=segment_ids).item()
                batch_tokens = int((targets != -1).sum())
                loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
                mean_sum += batch_loss / max(batch_tokens, 1)
        loss_sum, tokens, mean_sum = all_reduce_sum([loss_sum, tokens, mean_sum])
        if config["loss_normalization"] == "token":
            val_loss = loss_sum / max(tokens, 1)  # per supervised token, all batches and ranks
        else:
            val_loss = mean_sum / (config["eval_steps"] * ddp_world_size)  # the guide: mean of batch means
        print0(f"Step {step:05d} | Validation loss: {val_loss:.6f}")
        wandb_run.log({"step": step, "val_loss": val_loss})
        loss_series["val_steps"].append(step)
        loss_series["val_loss"].append(val_loss)
        model.train()

    # once in a while: task metrics through run_chat_eval
    if config["eval_metrics_every"] > 0 and eval_specs and not resumed_here and \
            (last_step or (step > 0 and step % config["eval_metrics_every"] == 0)):
        model.eval()
        metrics = {}
        with autocast():
            for task_name, max_problems in eval_specs:
                kwargs = {"max_problems": max_problems}
                if task_name in CATEGORICAL_TASKS:
                    kwargs["batch_size"] = 2 * device_batch_size
                else:
                    kwargs["max_new_tokens"] = config["eval_max_new_tokens"]
                metrics[metric_key(task_name)] = run_chat_eval(task_name, orig_model, tokenizer, engine, **kwargs)
        print0(f"Step {step:05d} | " + ", ".join(f"{k}: {v:.6f}" for k, v in metrics.items()))
        wandb_run.log({"step": step, **metrics})
        model.train()

    # once in a while: a resumable checkpoint (the final one is written after the loop)
    if config["save_every"] > 0 and 0 < step < num_iterations and step % config["save_every"] == 0 \
            and not resumed_here:
        save(step, {"val_loss": val_loss, **metrics})

    if last_step:
        break

    # ---- one optimizer step ----
    synchronize()
    t0 = time.time()
    # fetch the whole step first: the per-token normalisation needs its supervised-token count up front
    micro_batches = [next(train_iter) for _ in range(grad_accum_steps)]
    train_state = micro_batches[-1][4]  # the data position after this step, for resuming
    local = [sum(b[3][k] for b in micro_batches) for k in ("supervised", "positions", "pad_positions", "examples",
                                                            "truncated", "dropped")]
    local.append(sum(b[0].size(0) * bucketed_length(b[0].size(1), pad_bucket, config["max_seq_len"])
                     for b in micro_batches))  # positions the model computes (pad_bucket rounding included)
    step_tokens, positions, pad_positions, examples, truncated, dropped, computed = all_reduce_sum(local)
    objective, oom = 0.0, 0.0
    try:
        for inputs, targets, segment_ids, stats, _ in micro_batches:
            inputs, targets, segment_ids = to_device(inputs, targets, segment_ids)
            if step == config["debug_oom_step"]:
                raise torch.cuda.OutOfMemoryError("debug_oom_step: simulated CUDA out of memory")
            with autocast():
                loss_sum = model(inputs, targets, loss_reduction="sum", segment_ids=segment_ids)
            if step == config["debug_nan_step"]:
                loss_sum = loss_sum * float("nan")
            scale = micro_batch_loss_scale(config["loss_normalization"], stats["supervised"], step_tokens,
                                           ddp_world_size, grad_accum_steps)
            loss = loss_sum * scale
            loss.backward()
            objective += loss.item()
    except torch.cuda.OutOfMemoryError as e:
        print(f"[rank {ddp_rank}] Step {step:05d} | out of memory: {str(e).splitlines()[0]}")
        oom = 1.0
        inputs = targets = segment_ids = loss_sum = loss = None
        model.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.empty_cache()
    # every rank takes the same decision: one collective for the loss and the out-of-memory count
    objective, oom = all_reduce_sum([0.0 if oom else objective, oom])
    train_loss = objective / ddp_world_size  # the step's loss (optimizers average over ranks)
    lrm = lr_multiplier(step, num_iterations)

    if config["debug_dump_grads"] and step == start_step and not oom:
        grads = {}
        for name, p in orig_model.named_parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            if ddp_world_size > 1:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= ddp_world_size
            grads[name] = g.float().cpu()
        if master_process:
            torch.save(grads, config["debug_dump_grads"])

    reason = skip_reason(train_loss, oom)
    if reason is not None:
        # skip: no optimizer step, and no gradient of this step survives into the next
        model.zero_grad(set_to_none=True)
        totals["skipped_oom" if oom > 0 else "skipped_nonfinite"] += 1
        print0(f"Step {step:05d} | skipped: {reason} | optimizer step not taken "
               f"(skipped so far: {totals['skipped_nonfinite']} non-finite, {totals['skipped_oom']} out of memory)")
        wandb_run.log({"step": step, "skipped_nonfinite": totals["skipped_nonfinite"],
                       "skipped_oom": totals["skipped_oom"]})
        continue
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for opt in optimizers:
        opt.step()  # averages gradients across ranks inside
    model.zero_grad(set_to_none=True)
    synchronize()
    dt = time.time() - t0
    train_time += dt

    # logging
    totals["examples"] += int(examples)
    totals["truncated"] += int(truncated)
    totals["dropped"] += int(dropped)
    supervised_ratio = step_tokens / max(positions, 1)
    pad_frac = padding_fraction(pad_positions, positions)
    tok_per_sec = positions / dt
    line = (f"Step {step:05d} | Training loss: {train_loss:.6f} | lrm: {lrm:.6f} | num_tokens: {int(step_tokens):,}"
            f" | supervised: {supervised_ratio:.1%} | padding: {pad_frac:.1%} | tok/s: {tok_per_sec:,.0f}"
            f" | sup_tok/s: {step_tokens / dt:,.0f}")
    log = {"step": step, "train_loss": train_loss, "lrm": lrm, "num_tokens": step_tokens,
           "supervised_ratio": supervised_ratio, "padding_fraction": pad_frac, "tok_per_sec": tok_per_sec,
           "examples": examples, "dt": dt}
    if peak_flops:  # useful: non-padding positions only; total: every position computed
        mfu_useful = mfu(num_flops_per_token, positions - pad_positions, dt, peak_flops, ddp_world_size)
        mfu_total = mfu(num_flops_per_token, computed, dt, peak_flops, ddp_world_size)
        line += f" | mfu: {100 * mfu_useful:.2f}% useful, {100 * mfu_total:.2f}% total"
        log["mfu"], log["mfu_total"] = mfu_useful, mfu_total
    if device_type == "cuda":
        log["peak_memory_mib"] = peak_memory_mib(device)
        line += f" | peak mem: {log['peak_memory_mib']:,.0f} MiB"
    if use_compile:
        log["compiled_graphs"] = compiled_graphs()  # growing after the first step = recompilations
        graphs_after_first_step = graphs_after_first_step or log["compiled_graphs"]
        line += f" | compiled graphs: {log['compiled_graphs']}"
    if truncated or dropped:
        line += f" | truncated: {int(truncated)} | dropped: {int(dropped)}"
    print0(line)
    wandb_run.log(log)
    loss_series["train_steps"].append(step)
    loss_series["train_loss"].append(train_loss)

# -----------------------------------------------------------------------------
# Save the final checkpoint and the report section

final_metrics = {"val_loss": val_loss, **metrics}
save(num_iterations, final_metrics)
peak_memory = peak_memory_mib(device)
print0(f"Training time: {train_time:.1f}s | skipped steps: {totals['skipped_nonfinite']} non-finite, "
       f"{totals['skipped_oom']} out of memory | truncated: {totals['truncated']} | dropped: {totals['dropped']}"
       + (f" | peak memory: {peak_memory:.0f} MiB" if peak_memory else "")
       + (f" | torch.compile: {compiled_graphs()} graphs, {compiled_graphs() - graphs_after_first_step} "
          f"recompilations after the first step" if use_compile else ""))

report = get_report()
report.log(section="Chat SFT", data=[
    {k: config[k] for k in ("source", "device_batch_size", "target_examples_per_step", "num_epochs",
                            "init_lr_frac", "loss_normalization", "packing", "max_seq_len")},
    {"Training conversations": len(train_ds), "Number of iterations": num_iterations,
     "Examples seen": totals["examples"], "Skipped steps (non-finite)": totals["skipped_nonfinite"],
     "Skipped steps (out of memory)": totals["skipped_oom"], "Truncated conversations": totals["truncated"],
     "Dropped conversations": totals["dropped"], "Training time (s)": round(train_time, 1)},
    {k: v for k, v in final_metrics.items() if v is not None},
])
report.log_series("Chat SFT", "train_loss", loss_series["train_steps"], loss_series["train_loss"])
report.log_series("Chat SFT", "val_loss", loss_series["val_steps"], loss_series["val_loss"])

# -----------------------------------------------------------------------------
# Cleanup

wandb_run.finish()
compute_cleanup()
