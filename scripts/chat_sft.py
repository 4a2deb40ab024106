"""
Chat SFT: fine-tune a base or midtrained checkpoint on a mixture of conversations, in the chat format. Faithful
to nanochat's chat_sft.py (keys, defaults, mixture, collation, schedule, log lines), plus per-token loss
normalisation, best-fit packing, resume, NaN / out-of-memory steps that skip cleanly and a data preview:
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --config configs/sft_guide.txt  # 8 GPUs
    python -m scripts.chat_sft --config configs/sft_cpu.txt [--dry_run 1]        # tiny, CPU [data preview only]
    python -m scripts.chat_sft --data data/chats.parquet --source sft             # your data (any format, shape)
Options: --help. Mixture specs and custom tasks: tasks/mixture.py. Loss normalisation: README. Writes
<base_dir>/chatsft_checkpoints/<output_tag>/ and the "Chat SFT" report section. Tests: tests/test_chat_sft.py.
"""

import os
import random
import sys
import time

import numpy as np
import torch

from nanochat.chat_eval import run_task_metrics, sample_conversations
from nanochat.checkpoint_manager import build_model, describe_checkpoint
from nanochat.checks import check_finite_parameters
from nanochat.common import (UserError, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, get_dist_info, get_peak_flops, init_wandb, install_error_handler, print0)
from nanochat.config import Option, load_config, run_options
from nanochat.data_check import DECONTAMINATE, DEFAULT_EVAL_TASKS, cache_dir_default, check_training_data
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_sft_loss
from nanochat.perf import compile_enabled, compile_model, compiled_graphs, mfu, peak_memory_mib, reset_peak_memory
from nanochat.report import format_duration, get_report
from nanochat.runs import (check_resume_config, load_optimizer_warm_start, load_resume, prepare_finetune,
                           prune_checkpoints, save_training_checkpoint, tokenizer_sha256)
from nanochat.schedules import lr_multiplier, num_grad_accum_steps, scale_initial_lr, set_lr_multiplier
from nanochat.sft import (LOSS_NORMALIZATIONS, PACKINGS, TOTAL_KEYS, BatchSettings, accumulate_step, gather_share,
                          num_sft_steps, plan_epoch, render_share, sft_batches)
from nanochat.sft_report import data_summary, format_skip, format_sources, format_step, summary_lines
from nanochat.tokenizer import get_tokenizer
from tasks.mixture import build_mixtures, check_mixture_specs, parse_eval_spec, spec_locator

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    # the guide's keys and defaults
    Option("run", str, "dummy", "wandb run name ('dummy' disables wandb; no API key: offline into the run folder)"),
    Option("source", str, "mid", "checkpoint to start from (sft: continue fine-tuning a chat model)",
           choices=("base", "mid", "sft")),
    Option("model_tag", str, None, "model tag of the source checkpoint (default: the most recently written; "
                                   "'largest': the largest d<depth>)"),
    Option("step", int, None, "checkpoint step to load (default: last)", min=0),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA", choices=("bfloat16", "float32")),
    Option("device_batch_size", int, 4, "conversations (pad) or rows (bestfit) per device per micro-step", min=1),
    Option("num_epochs", int, 1, "passes over the training mixture", min=1),
    Option("max_iterations", int, -1, "cap on optimizer steps (-1: no cap)", min=1, disabled=-1),
    Option("target_examples_per_step", int, 32, "examples (pad) or rows (bestfit) per step, all ranks", min=1),
    Option("unembedding_lr", float, 0.004, "AdamW lr of the lm_head", min=0.0),
    Option("embedding_lr", float, 0.2, "AdamW lr of the token embedding", min=0.0),
    Option("matrix_lr", float, 0.02, "Muon lr of the transformer matrices", min=0.0),
    Option("weight_decay", float, 0.0, "AdamW weight decay", min=0.0),
    Option("init_lr_frac", float, 0.02, "every lr is multiplied by this (SFT starts from a trained model)", min=0.0),
    Option("eval_every", int, 100, "validation loss every N steps and at the end (-1: never)", min=1, disabled=-1),
    Option("eval_steps", int, 100, "validation batches per rank per evaluation", min=1),
    Option("eval_metrics_every", int, 200, "task metrics every N steps and at the end (-1: never)", min=1, disabled=-1),
    # beyond the guide
    Option("device_type", str, "", "autodetect if empty", choices=("", "cuda", "cpu", "mps")),
    Option("seed", int, 42, "torch/python/numpy seed, and the order of bestfit rows", min=0),
    Option("train_mixture", list, ["ARC:ARC-Easy:train", "ARC:ARC-Challenge:train", "GSM8K:main:train",
                                   "SmolTalk:train:0:10000"], "training mixture specs (see tasks/mixture.py)"),
    Option("val_mixture", list, ["SmolTalk:test"], "validation mixture specs (default unavailable, or []: 5% of the "
                                                   "training conversations are held out instead)"),
    Option("data", str, None, "shortcut: train on this file, folder or hub dataset (train_mixture = [data])"),
    Option("decontaminate", str, "report", "training conversations sharing a 13-word n-gram with eval test sets: "
                                           "print the table, drop them, fail, or off", choices=DECONTAMINATE),
    Option("decontaminate_tasks", list, list(DEFAULT_EVAL_TASKS), "eval sets checked (chat_eval names or specs)"),
    Option("loss_normalization", str, "token", "README: Loss normalisation", choices=LOSS_NORMALIZATIONS),
    Option("packing", str, "pad", "pad (the guide's: to the longest) | bestfit (whole conversations)", choices=PACKINGS),
    Option("max_seq_len", int, 2048, "longest conversation / packed row, in input positions", min=1),
    Option("drop_long", bool, False, "drop conversations longer than max_seq_len + 1 tokens instead of truncating"),
    Option("eval_metrics_tasks", list, ["MMLU:1024", "ARC-Easy:1024", "GSM8K:64", "HumanEval:64"], "Task[:max_problems]"),
    Option("eval_max_new_tokens", int, 512, "generation budget of the generative task metrics", min=1),
    Option("compile", bool, None, "torch.compile the model (default: on for CUDA, off elsewhere)"),
    Option("pad_bucket", int, 128, "compiled pad mode: batch lengths rounded up to a multiple of this", min=1),
    Option("load_optimizer", bool, False, "warm-start the optimizers from the source's optimizer state"),
    Option("dry_run", bool, False, "load the mixtures and tokenizer only, print the data preview, exit"),
    *run_options("chatsft_checkpoints"),  # output_tag, overwrite, save_every, resume (nanochat.config)
]
script_start = time.time()  # the stage's wall-clock time goes into its report section
config = load_config(OPTIONS, description=__doc__)
if config["data"]:
    config["train_mixture"] = [config["data"]]  # any file read_rows reads, a save_to_disk folder, owner/name
val_default = config["val_mixture"] == next(o.default for o in OPTIONS if o.name == "val_mixture")
# cross-option checks, before anything is loaded (the world size comes from the torchrun environment)
eval_specs = [parse_eval_spec(s) for s in config["eval_metrics_tasks"]]
check_mixture_specs({"train_mixture": config["train_mixture"],  # data is loaded later; [] asks for a held-out share
                     **({"val_mixture": config["val_mixture"]} if config["val_mixture"] else {})})
grad_accum_steps = num_grad_accum_steps(config["target_examples_per_step"], config["device_batch_size"] *
                                        get_dist_info()[3], "target_examples_per_step", "device_batch_size * ranks")

# -----------------------------------------------------------------------------
# Compute init

device_type = config["device_type"] or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
master_process = ddp_rank == 0
for seed_fn in (torch.manual_seed, random.seed, np.random.seed):
    seed_fn(config["seed"])
autocast = lambda: autocast_ctx(device_type, config["dtype"])  # noqa: E731  (a fresh context per use)
synchronize = torch.cuda.synchronize if device_type == "cuda" else lambda: None
use_compile = compile_enabled(config["compile"], device_type)  # the option, else on for CUDA only
pad_bucket = config["pad_bucket"] if use_compile and config["packing"] == "pad" else 1  # eager: no rounding

# -----------------------------------------------------------------------------
# Output folder and resume, decided before any model or data is loaded; a dry run writes nothing

if not config["dry_run"]:
    source_dir, source_step, _, plan = prepare_finetune(
        config["source"], config["model_tag"], config["step"], "chatsft_checkpoints", config["output_tag"],
        config["resume"], config["overwrite"], ddp_rank, ddp_world_size, check_optimizer=config["load_optimizer"])
    check_resume_config(plan, config)  # same data order and batch as the resumed run
    print0(f"Output folder: {plan.output_dir} | run id {plan.run_id}")

# -----------------------------------------------------------------------------
# Tokenizer and data, before the model: a missing dataset fails in seconds, and --dry_run stops here

tokenizer = get_tokenizer()
mixtures, parts, notes = build_mixtures({key: config[key] for key in ("train_mixture", "val_mixture")},
                                        optional=config["val_mixture"] if val_default else (),
                                        held_out=("train_mixture", "val_mixture", 0.05))  # no validation data: 5%
train_ds, val_ds = mixtures["train_mixture"], mixtures["val_mixture"]
for note in notes:  # a skipped default validation set, and the held-out share that replaces it
    print0(note)
train_ds, parts["train_mixture"], dropped = check_training_data(  # shapes, duplicates, eval-set n-gram overlap
    config["decontaminate"], config["decontaminate_tasks"], train_ds, parts["train_mixture"],
    cache_dir_default(get_base_dir()), master_process, print0)
pad_id = tokenizer.encode_special("<|assistant_end|>")  # padding the guide uses; its targets are -1 anyway
device_batch_size, seed = config["device_batch_size"], config["seed"]
settings = BatchSettings(config["packing"], device_batch_size, config["max_seq_len"] + 1, pad_id, config["drop_long"],
                         pad_bucket)  # rows of max_seq_len input positions + the last target
render = lambda conversation: tokenizer.render_conversation(conversation, max_tokens=None)  # noqa: E731
# plan the epoch: this rank's share rendered once (lengths, supervised targets, the spec of each), packed once
train_specs, val_specs = ([spec for spec, *_ in parts[key]] for key in ("train_mixture", "val_mixture"))
train_share = render_share(train_ds, render, settings, ddp_rank, ddp_world_size,
                           spec_locator(train_ds, parts["train_mixture"]))
train_plan = plan_epoch(train_share.lengths, settings, seed)
count_steps = lambda epoch_plan: num_sft_steps(len(epoch_plan), grad_accum_steps, config["num_epochs"],  # noqa
                                              config["max_iterations"], device, ddp_world_size)
num_iterations = count_steps(train_plan)
if num_iterations <= 0:
    raise UserError(f"no optimizer steps: {len(train_ds)} training conversations make {len(train_plan)} micro-batches "
                    f"on rank {ddp_rank}, fewer than grad_accum_steps = {grad_accum_steps}; add data or lower "
                    f"target_examples_per_step")
if config["eval_every"] > 0 or config["dry_run"]:  # the validation batches: planned once, the same at every eval
    val_share = render_share(val_ds, render, settings, ddp_rank, ddp_world_size,
                             spec_locator(val_ds, parts["val_mixture"]))
    val_plan = plan_epoch(val_share.lengths, settings, seed)
print0(f"Training conversations: {len(train_ds):,} | validation: {len(val_ds):,} | packing: {config['packing']}")
print0(f"Number of iterations: {num_iterations} | loss: {config['loss_normalization']} | examples a step: "
       f"device_batch_size {device_batch_size} x world_size {ddp_world_size} x grad_accum_steps {grad_accum_steps}")
whole_train = gather_share(train_share, ddp_world_size)  # every rank's numbers: the figures of the whole mixture
train_rows = [(f"{spec} x{entries:,}", data_summary(whole_train, settings, seed, source=k))  # per spec
              for k, (spec, _, entries) in enumerate(parts["train_mixture"])] if master_process else []
if config["dry_run"]:  # the data preview: the mixture table, the step count per packing, one rendered conversation
    steps = [count_steps(plan_epoch(train_share.lengths, settings._replace(packing=p), seed)) for p in PACKINGS]
    whole_val, color, (ids, mask) = gather_share(val_share, ddp_world_size), sys.stdout.isatty(), render(train_ds[0])
    rows = train_rows + [("training mixture", data_summary(whole_train, settings, seed)),
                         ("validation mixture", data_summary(whole_val, settings, seed))] if master_process else []
    print0("\n".join(summary_lines(rows)))
    print0("Optimizer steps: " + ", ".join(f"{n} with packing={p}" for p, n in zip(PACKINGS, steps)))
    print0(f"One training conversation ({'supervised in green' if color else '[supervised] tokens'}):")
    print0(tokenizer.visualize_tokenization(ids[:settings.row_capacity], mask[:settings.row_capacity], color=color))
    compute_cleanup()
    sys.exit(0)

# -----------------------------------------------------------------------------
# Model (from the source checkpoint, or from the checkpoint being resumed)

tokenizer_sha = tokenizer_sha256()
load_dir, load_step = (plan.resume_dir, plan.resume_step) if plan.resume_dir else (source_dir, source_step)
model, _, load_meta = build_model(load_dir, load_step, device, phase="train")
print0(f"{'Resuming from' if plan.resume_dir else 'Loaded checkpoint:'} "
       f"{describe_checkpoint(load_dir, load_step, load_meta)}")
orig_model = model  # the uncompiled model: for saving and generation (task metrics)
if use_compile:  # bestfit: one shape; pad: one per bucket up to max_seq_len
    model = compile_model(orig_model, num_shapes=-(-config["max_seq_len"] // pad_bucket))
print0(f"Model: depth {orig_model.config.n_layer}, {orig_model.num_params():,} parameters")
wandb_run = init_wandb(config["run"], "nanochat-sft", config, ddp_rank, run_dir=plan.output_dir)

# -----------------------------------------------------------------------------
# Optimizers: the guide's three learning rates, all scaled by init_lr_frac

optimizers = model.setup_optimizers(unembedding_lr=config["unembedding_lr"], embedding_lr=config["embedding_lr"],
                                    matrix_lr=config["matrix_lr"], weight_decay=config["weight_decay"])
scale_initial_lr(optimizers, config["init_lr_frac"])
if config["load_optimizer"] and plan.resume_dir is None:  # warm start: the source's moments, this run's lrs
    path = load_optimizer_warm_start(optimizers, source_dir, source_step, device, ddp_rank, ddp_world_size)
    print0(f"Optimizer state warm-started from {path}")

# -----------------------------------------------------------------------------
# Resume state (optimizer, data position, step, RNG) or a fresh start

start_step = 0  # the resume state: micro-batch k of the run is train_plan[k % len(train_plan)]
val_loss, metrics = None, {}  # the latest evaluation, saved in checkpoint meta
totals = dict.fromkeys(("skipped_nonfinite", "skipped_oom", *TOTAL_KEYS), 0)  # summed over steps and ranks
loss_series = {"train": [], "val": []}  # [step, loss] points, both in the unit of loss_normalization
if plan.resume_dir is not None:
    run_state = load_resume(plan.resume_dir, plan.resume_step, optimizers, ddp_rank, ddp_world_size, num_iterations,
                            device)
    if run_state["data_state"] is not None:  # {epoch, cursor, pending}: the streaming loader before the plan
        raise UserError(f"cannot resume {plan.resume_dir} step {plan.resume_step}: it was saved by an older chat_sft "
                        f"whose data order this version cannot reproduce; start a new run (resume = 0)")
    start_step = run_state["step"]
    totals, loss_series = {**totals, **run_state["counters"]["totals"]}, run_state["loss_series"]
    val_loss, metrics = run_state["counters"]["val_loss"], run_state["counters"]["metrics"]
train_iter = sft_batches(train_ds, render, train_share, train_plan, settings, start=start_step * grad_accum_steps)


def save(step):
    """A resumable checkpoint: this rank's run state, the model, the optimizer states and, last, the meta."""
    run_state = dict(num_iterations=num_iterations, data_state=None, loss_series=loss_series,
                     counters={"totals": totals, "val_loss": val_loss, "metrics": metrics})
    meta = {"user_config": config, "run_id": plan.run_id, "run_name": config["run"], "tokenizer_sha256": tokenizer_sha,
            "source": config["source"], "source_dir": source_dir, "source_step": source_step,
            "metrics": {"val_loss": val_loss, **metrics}, "totals": totals}
    save_training_checkpoint(plan.output_dir, step, orig_model, optimizers, run_state, meta, ddp_rank, ddp_world_size,
                             device)
    prune_checkpoints(plan.output_dir, config["keep_last"], ddp_rank)


def log_loss(step, kind, specs, result, log):
    """A train or val loss: its report curve; by source, when the mixture has several specs, a line, wandb keys and
    a report curve each ("token" normalisation: the loss is their token-weighted mean); then `log` to wandb."""
    loss_series[kind].append([step, result.loss])
    if len(specs) > 1:
        line, source_log = format_sources(step, specs, result, kind)
        print0(line)
        log.update(source_log)
        for name in (k for k in source_log if k.startswith(f"{kind}_loss/")):
            loss_series.setdefault(name, []).append([step, source_log[name]])
    wandb_run.log(log)


# -----------------------------------------------------------------------------
# Training loop: step s trains with lrm = 1 - s / num_iterations; evaluation before step s and after the last one

engine = Engine(orig_model, tokenizer)  # generation runs uncompiled (its shapes change every token)
peak_flops = get_peak_flops(device)
reset_peak_memory(device)  # the peak memory logged is the training loop's (evaluation included), not the load's
train_time, loop_t0 = 0.0, time.time()
graphs_after_first_step = 0  # torch.compile graphs after the first training step (the rest are recompilations)
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    resumed_here = plan.resume_dir is not None and step == start_step  # evaluated and saved before the interruption

    # once in a while: validation loss, over eval_steps batches per rank (the same batches every time)
    if config["eval_every"] > 0 and (last_step or step % config["eval_every"] == 0) and not resumed_here:
        model.eval()
        val = evaluate_sft_loss(model, sft_batches(val_ds, render, val_share, val_plan, settings),
                                config["eval_steps"], config["loss_normalization"], device, ddp_world_size, ddp_rank,
                                autocast, len(val_specs))
        val_loss = val.loss
        print0(f"Step {step:05d} | Validation loss: {val_loss:.6f}")
        log_loss(step, "val", val_specs, val, {"step": step, "val_loss": val_loss})
        model.train()

    # once in a while: task metrics through run_chat_eval
    if config["eval_metrics_every"] > 0 and eval_specs and not resumed_here and \
            (last_step or (step > 0 and step % config["eval_metrics_every"] == 0)):
        model.eval()
        with autocast():
            metrics = run_task_metrics(eval_specs, orig_model, tokenizer, engine, 2 * device_batch_size,
                                       config["eval_max_new_tokens"])
        print0(f"Step {step:05d} | " + ", ".join(f"{k}: {v:.6f}" for k, v in metrics.items()))
        wandb_run.log({"step": step, **metrics})
        model.train()

    # once in a while: a resumable checkpoint (the final one is written after the loop)
    if config["save_every"] > 0 and 0 < step < num_iterations and step % config["save_every"] == 0 and not resumed_here:
        save(step)

    if last_step:
        break

    # one optimizer step: fetch its micro-batches, forward/backward them, skip it if any rank hit NaN or OOM
    synchronize()
    t0 = time.time()
    micro_batches = [next(train_iter) for _ in range(grad_accum_steps)]
    result = accumulate_step(model, micro_batches, config["loss_normalization"], device, ddp_world_size, ddp_rank,
                             autocast, len(train_specs))
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
    check_finite_parameters(orig_model, step)  # stop before NaN/inf weights are trained on or saved
    model.zero_grad(set_to_none=True)
    synchronize()
    dt = time.time() - t0
    train_time += dt

    # logging (MFU: useful counts the FLOPs of non-padding positions, total all the FLOPs computed)
    totals.update({key: totals[key] + int(result.totals[key]) for key in TOTAL_KEYS})
    line, log = format_step(step, result.loss, lrm, result.totals, dt, peak_flops, ddp_world_size,
                            peak_memory_mib(device), compiled_graphs() if use_compile else None)
    graphs_after_first_step = graphs_after_first_step or log.get("compiled_graphs", 0)
    eta = (time.time() - loop_t0) / (step + 1 - start_step) * (num_iterations - step - 1)
    print0(f"{line} | {progress} | eta {format_duration(eta)}")
    log_loss(step, "train", train_specs, result, log)

# -----------------------------------------------------------------------------
# The final checkpoint, the report section, cleanup

save(num_iterations)
peak_memory, graphs = peak_memory_mib(device), compiled_graphs() if use_compile else 0
print0(f"Training time: {train_time:.1f}s | skipped steps: {totals['skipped_nonfinite']} non-finite, "
       f"{totals['skipped_oom']} out of memory | truncated: {totals['truncated']} | dropped: {totals['dropped']}"
       + (f" | peak memory: {peak_memory:.0f} MiB" if peak_memory else "") + (f" | torch.compile: {graphs} graphs, "
       f"{graphs - graphs_after_first_step} recompilations after the first step" if use_compile else ""))

model.eval()
with autocast():  # two validation prompts that fit the model's context, answered by the final model
    samples = sample_conversations(engine, tokenizer, (val_ds[i] for i in range(min(len(val_ds), 100))),
                                   orig_model.config.sequence_len) if master_process else []
positions = max(totals["positions"], 1)  # the run's figures (totals: all steps and ranks); MFU: of the useful FLOPs
report = get_report()
report.log(section="Chat SFT", data=[
    {"checkpoint": f"chatsft_checkpoints/{os.path.basename(plan.output_dir)} step {num_iterations}",
     "Contaminated conversations dropped": dropped},
    {k: config[k] for k in ("source", "device_batch_size", "target_examples_per_step", "num_epochs", "init_lr_frac",
                            "loss_normalization", "packing", "max_seq_len")},
    "```\n" + "\n".join(summary_lines(train_rows)) + "\n```",  # the mixture table, one row per training spec
    {"Training conversations": len(train_ds), "Number of iterations": num_iterations,
     "Examples seen": totals["examples"], "Skipped steps (non-finite)": totals["skipped_nonfinite"],
     "Skipped steps (out of memory)": totals["skipped_oom"], "Truncated conversations": totals["truncated"],
     "Dropped conversations": totals["dropped"], "Training time (s)": round(train_time, 1),
     "Supervised ratio": totals["supervised"] / positions, "Padding fraction": totals["pad_positions"] / positions,
     "Tokens per second": round(totals["positions"] / max(train_time, 1e-9)),
     **({"MFU": mfu(totals["useful_flops"], train_time, peak_flops, ddp_world_size)} if peak_flops else {})},
    {k: v for k, v in {"val_loss": val_loss, **metrics}.items() if v is not None},
    f"Train and validation loss are both in the unit of loss_normalization = {config['loss_normalization']}.",
    *samples,
], duration_s=time.time() - script_start)
for name, points in loss_series.items():
    name = name if "/" in name else f"{name}_loss"  # train_loss/<spec>, val_loss/<spec>: one curve per spec
    report.log_series("Chat SFT", name, [p[0] for p in points], [p[1] for p in points])
wandb_run.finish()
compute_cleanup()
