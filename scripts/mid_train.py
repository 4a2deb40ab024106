"""
Midtraining: continue pretraining the base model on conversations (chat, multiple choice, math) so it learns
the chat format and special tokens before SFT. Conversations are rendered (<|bos|>, <|user_start|>, ...),
streamed as tokens into full rows of max_seq_len + 1 and trained on every token, like pretraining. The LR is
constant, then decays linearly to 0 over the last warmdown_ratio of the steps (no ramp-up). By default the
run is one epoch of the training mixture (every rank's share is tokenized once up front to size it).

Launch:
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train                 # 8 GPUs (speedrun)
    python -m scripts.mid_train --device_batch_size=16                            # 1 GPU
    python -m scripts.mid_train --device_batch_size=4 --total_batch_size=4096 --num_iterations=20 \\
        --train_mixture='["ChitChat:train", "GSM8K:main:train:0:500"]' --val_mixture='["ChitChat:test"]' \\
        --eval_every=10 --eval_tokens=8192                                        # tiny, CPU

Mixtures are lists of spec strings, as in chat_sft ("Name[:arg...][:start[:stop[:step]]][*repeats][@weight]",
see tasks/mixture.py). Entries in `skip_unavailable` are dropped with a warning when their data cannot be
loaded (the local mirror has no MMLU auxiliary_train and no SmolTalk: the CPU profile uses ChitChat).

Outputs: <base_dir>/mid_checkpoints/<output_tag or d<depth>>/ (model, per-rank optimizer and run state, meta
with the run id), the "Midtraining" report section with the loss curves, wandb. model_tag / step choose the
base checkpoint to load. With save_every = N every N-th step is resumable: resume = 1 continues the run in the
output folder (bit-exact; same options and world size). A folder holding another run's checkpoints is
refused before anything is loaded (resume = 1, another output_tag, or overwrite = 1). Tests: tests/test_pipeline.py (end to end); the loader: tests/test_dataloader.py.
"""

import time

import torch

from nanochat.checkpoint_manager import build_model, describe_checkpoint
from nanochat.checks import check_finite_parameters
from nanochat.common import (all_reduce_values, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             get_dist_info, get_peak_flops, init_wandb, install_error_handler, print0)
from nanochat.config import Option, load_config, run_options
from nanochat.dataloader import conversation_data_loader, count_conversation_tokens
from nanochat.loss_eval import evaluate_bpb
from nanochat.perf import compile_enabled, compile_model, mfu
from nanochat.report import get_report
from nanochat.runs import (check_resume_config, load_resume, prepare_finetune, prune_checkpoints,
                           save_training_checkpoint, tokenizer_sha256)
from nanochat.schedules import (lr_multiplier, muon_momentum, num_grad_accum_steps, scale_initial_lr,
                                set_lr_multiplier, set_momentum)
from nanochat.train_loop import (clip_gradients, counts_toward_time, every, format_train_step, fresh_loop_state,
                                 smooth_loss)
from nanochat.tokenizer import get_token_bytes
from tasks.mixture import build_mixtures, check_mixture_specs

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    Option("run", str, "dummy", "wandb run name ('dummy' disables wandb)"),
    Option("device_type", str, "", "cuda|cpu|mps (empty: autodetect)", choices=("", "cuda", "cpu", "mps")),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA: bfloat16|float32 (CPU runs in fp32)",
           choices=("bfloat16", "float32")),
    Option("compile", bool, None, "torch.compile the model (default: on for CUDA, off elsewhere)"),
    Option("model_tag", str, None, "base checkpoint tag to start from (default: the most recently written)"),
    Option("step", int, None, "base checkpoint step (default: last)", min=0),
    Option("max_seq_len", int, None, "row length (default: the model's sequence_len)", min=1),
    Option("device_batch_size", int, 32, "rows per device per micro-step", min=1),
    Option("total_batch_size", int, 524288, "tokens per optimizer step over all ranks (-> gradient accumulation)",
           min=1),
    Option("num_iterations", int, -1, "optimizer steps (-1: one epoch of the training mixture)", min=1,
           disabled=-1),
    Option("embedding_lr", float, 0.2, "AdamW lr of the token embedding", min=0.0),
    Option("unembedding_lr", float, 0.004, "AdamW lr of the lm_head", min=0.0),
    Option("matrix_lr", float, 0.02, "Muon lr of the transformer matrices", min=0.0),
    Option("weight_decay", float, 0.0, "AdamW weight decay", min=0.0),
    Option("init_lr_frac", float, 1.0, "every lr is multiplied by this", min=0.0),
    Option("warmdown_ratio", float, 0.2, "fraction of steps over which the LR decays linearly to 0", min=0.0,
           max=1.0),
    Option("grad_clip", float, 1.0, "clip each rank's gradient norm to this (0: off)", min=0.0),
    Option("eval_every", int, 150, "val bpb every this many steps and at the end (-1 disables)", min=1,
           disabled=-1),
    Option("eval_tokens", int, 20 * 524288, "validation tokens per evaluation (all ranks)", min=1),
    Option("train_mixture", list, ["SmolTalk:train", "MMLU:auxiliary_train:train", "GSM8K:main:train"],
           "training conversations (mixture specs)"),
    Option("val_mixture", list, ["SmolTalk:test", "MMLU:all:test:0:5200", "GSM8K:main:test:0:420"],
           "validation conversations (mixture specs)"),
    Option("skip_unavailable", list, ["MMLU:auxiliary_train:train"],
           "mixture entries that are dropped (with a warning) when their data cannot be loaded"),
    Option("max_conversation_tokens", int, 2048, "longer rendered conversations are truncated", min=2),
    *run_options("mid_checkpoints"),  # output_tag, overwrite, save_every, resume (nanochat.config)
]
script_start = time.time()  # the stage's wall-clock time goes into its report section
config = load_config(OPTIONS, description=__doc__)
# cross-option checks, before anything is loaded (the world size comes from the torchrun environment)
if config["max_seq_len"] is not None:  # else it is the model's sequence_len, checked once the model is loaded
    num_grad_accum_steps(config["total_batch_size"], config["device_batch_size"] * config["max_seq_len"] *
                         get_dist_info()[3], "total_batch_size", "device_batch_size * max_seq_len * world_size")
check_mixture_specs({key: config[key] for key in ("train_mixture", "val_mixture")})  # data is loaded later

# -----------------------------------------------------------------------------
# Compute init

device_type = config["device_type"] or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
master_process = ddp_rank == 0
autocast = lambda: autocast_ctx(device_type, config["dtype"])  # noqa: E731  (a fresh context per use)
synchronize = torch.cuda.synchronize if device_type == "cuda" else lambda: None
wandb_run = init_wandb(config["run"], "nanochat-mid", config, ddp_rank)

# -----------------------------------------------------------------------------
# Output folder and resume, decided before any model or data is loaded (the base meta gives the depth)

source_dir, source_step, _, plan = prepare_finetune("base", config["model_tag"], config["step"], "mid_checkpoints",
                                                    config["output_tag"], config["resume"], config["overwrite"],
                                                    ddp_rank, ddp_world_size)
check_resume_config(plan, config)  # same data order and batch as the resumed run
checkpoint_dir = plan.output_dir
tokenizer_sha = tokenizer_sha256()
print0(f"Output folder: {checkpoint_dir} | run id {plan.run_id}")

# -----------------------------------------------------------------------------
# Model and tokenizer (from the base checkpoint, or from the checkpoint being resumed)

load_dir, load_step = (plan.resume_dir, plan.resume_step) if plan.resume_dir else (source_dir, source_step)
model, tokenizer, load_meta = build_model(load_dir, load_step, device, phase="train")
print0(f"{'Resuming from' if plan.resume_dir else 'Loaded checkpoint:'} "
       f"{describe_checkpoint(load_dir, load_step, load_meta)}")
orig_model = model  # the uncompiled model, for saving
if compile_enabled(config["compile"], device_type):  # the option, else on for CUDA only
    model = compile_model(orig_model)
depth = orig_model.config.n_layer
max_seq_len = config["max_seq_len"] or orig_model.config.sequence_len
token_bytes = get_token_bytes(device=device)
print0(f"Base model: {source_dir} step {source_step} | max_seq_len {max_seq_len}")

device_batch_size, total_batch_size = config["device_batch_size"], config["total_batch_size"]
world_tokens_per_fwdbwd = device_batch_size * max_seq_len * ddp_world_size
grad_accum_steps = num_grad_accum_steps(total_batch_size, world_tokens_per_fwdbwd, "total_batch_size",
                                        "device_batch_size * max_seq_len * world_size")
print0(f"Tokens per micro-step (all ranks): {world_tokens_per_fwdbwd:,} | gradient accumulation steps: {grad_accum_steps}")

# -----------------------------------------------------------------------------
# Optimizer

optimizers = orig_model.setup_optimizers(unembedding_lr=config["unembedding_lr"], embedding_lr=config["embedding_lr"],
                                         matrix_lr=config["matrix_lr"], weight_decay=config["weight_decay"])
adamw_optimizer, muon_optimizer = optimizers
scale_initial_lr(optimizers, config["init_lr_frac"])

# -----------------------------------------------------------------------------
# Data


mixtures, parts, notes = build_mixtures({"train_mixture": config["train_mixture"], "val_mixture": config["val_mixture"]},
                                        optional=config["skip_unavailable"])
for note in notes:
    print0(note)
train_dataset, val_dataset = mixtures["train_mixture"], mixtures["val_mixture"]
train_specs = [spec for spec, _, _ in parts["train_mixture"]]
print0(f"Training conversations: {len(train_dataset):,} ({', '.join(train_specs)}) | "
       f"validation conversations: {len(val_dataset):,}")
max_tokens = config["max_conversation_tokens"]
build_val_loader = lambda: conversation_data_loader(  # noqa: E731  (a fresh pass over val each time)
    val_dataset, tokenizer, device_batch_size, max_seq_len, device=device, max_tokens=max_tokens)
eval_steps = max(config["eval_tokens"] // world_tokens_per_fwdbwd, 1)

# Horizon: one epoch = the steps the rank with the fewest tokens can fill
if config["num_iterations"] > 0:
    num_iterations = config["num_iterations"]
else:
    rank_tokens = count_conversation_tokens(train_dataset, tokenizer, ddp_rank, ddp_world_size, max_tokens)
    rank_steps = rank_tokens // (device_batch_size * (max_seq_len + 1) * grad_accum_steps)
    num_iterations = max(int(all_reduce_values([rank_steps], "min", device, ddp_world_size)[0]), 1)
    print0(f"One epoch: {rank_tokens:,} tokens on rank 0 -> {num_iterations} steps")

# Resume: optimizer states, counters, loss series and this rank's data position (the weights came above)
start_step = 0  # a checkpoint of step s holds the model before update s
loop_state, loss_series = fresh_loop_state()  # counters and loss series, restored on resume
loader_state = None  # where the batch in hand starts: what a checkpoint must store
if plan.resume_dir is not None:
    run_state = load_resume(plan.resume_dir, plan.resume_step, optimizers, ddp_rank, ddp_world_size, num_iterations,
                            device)
    start_step, loader_state = run_state["step"], run_state["data_state"]
    loop_state, loss_series = run_state["counters"], run_state["loss_series"]
train_loader = conversation_data_loader(train_dataset, tokenizer, device_batch_size, max_seq_len, device=device,
                                        max_tokens=max_tokens, resume_state=loader_state)
x, y, data_state = next(train_loader)  # prefetch the first batch

# -----------------------------------------------------------------------------
# Schedules


def get_lr_multiplier(step):
    return lr_multiplier(step, num_iterations, warmdown_frac=config["warmdown_ratio"])  # constant, then to 0


def save(step):
    """This rank's run state (data position of the batch in hand, counters, loss series, RNG), then the model,
    optimizer states and, last, the meta."""
    run_state = dict(num_iterations=num_iterations, data_state=loader_state, counters=loop_state,
                     loss_series=loss_series)
    meta = {"user_config": config, "run_id": plan.run_id, "run_name": config["run"], "tokenizer_sha256": tokenizer_sha,
            "val_bpb": val_bpb, "source_dir": source_dir, "base_step": source_step}
    save_training_checkpoint(checkpoint_dir, step, orig_model, optimizers, run_state, meta, ddp_rank, ddp_world_size,
                             device)
    prune_checkpoints(checkpoint_dir, config["keep_last"], ddp_rank)


# -----------------------------------------------------------------------------
# Training loop

peak_flops = get_peak_flops(device)
num_flops_per_token = orig_model.estimate_flops()
val_bpb = loss_series["val_bpb"][-1] if loss_series["val_bpb"] else None  # the latest evaluation
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations

    # once in a while: validation bits per byte on the validation conversations
    resumed_here = plan.resume_dir is not None and step == start_step  # evaluated before that save already
    if every(step, config["eval_every"], last_step) and not resumed_here:
        model.eval()
        with autocast():
            val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
        loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
        print0(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
        loss_series["val_steps"].append(step)
        loss_series["val_bpb"].append(val_bpb)
        wandb_run.log({"step": step, "val/bpb": val_bpb})
        model.train()

    # checkpoints: periodic resumable ones (the final one is written after the loop)
    if config["save_every"] > 0 and start_step < step < num_iterations and step % config["save_every"] == 0:
        save(step)

    if last_step:
        break

    # one optimizer step
    synchronize()
    t0 = time.time()
    for micro_step in range(grad_accum_steps):
        with autocast():
            loss = model(x, y)
        train_loss = loss.detach()
        (loss / grad_accum_steps).backward()  # the optimizers average gradients over ranks in step()
        loader_state = data_state
        x, y, data_state = next(train_loader)
    grad_norm = clip_gradients(orig_model.parameters(), config["grad_clip"])  # per rank, before the average
    lrm = get_lr_multiplier(step)
    set_lr_multiplier(optimizers, lrm)
    set_momentum(muon_optimizer, muon_momentum(step))
    for opt in optimizers:
        opt.step()
    check_finite_parameters(orig_model, step)  # stop before NaN/inf weights are trained on or saved
    model.zero_grad(set_to_none=True)
    synchronize()
    dt = time.time() - t0

    # logging: EMA of the training loss (debiased), throughput, MFU
    train_loss_f = train_loss.item()
    loop_state["smooth_train_loss"], debiased = smooth_loss(loop_state["smooth_train_loss"], train_loss_f, step)
    if counts_toward_time(step, start_step, num_iterations):  # the first steps include compilation
        loop_state["total_training_time"] += dt
    step_mfu = mfu(num_flops_per_token * total_batch_size, dt, peak_flops, ddp_world_size)  # a fraction
    line, log = format_train_step(step, num_iterations, debiased, lrm, dt, total_batch_size, step_mfu,
                                  loop_state["total_training_time"])
    print0(line)
    loss_series["train_steps"].append(step)
    loss_series["train_loss"].append(train_loss_f)
    if grad_norm is not None:
        log["train/grad_norm"] = grad_norm.item()
    if step % 10 == 0:
        wandb_run.log(log)

# -----------------------------------------------------------------------------
# Save and report

save(num_iterations)
print0(f"Total training time: {loop_state['total_training_time'] / 60:.2f}m | "
       f"minimum validation bpb: {loop_state['min_val_bpb']:.4f}")

report = get_report()
report.log(section="Midtraining", data=[
    config,
    {"Training mixture": ", ".join(train_specs), "Training conversations": len(train_dataset),
     "Number of iterations": num_iterations, "DDP world size": ddp_world_size},
    {"Minimum validation bpb": loop_state["min_val_bpb"] if val_bpb is not None else "-",
     "Final validation bpb": val_bpb if val_bpb is not None else "-",
     "Total training time (min)": loop_state["total_training_time"] / 60},
], duration_s=time.time() - script_start)
report.log_series("Midtraining", "train_loss", loss_series["train_steps"], loss_series["train_loss"])
if loss_series["val_steps"]:
    report.log_series("Midtraining", "val_bpb", loss_series["val_steps"], loss_series["val_bpb"])

# -----------------------------------------------------------------------------
# Cleanup

wandb_run.finish()
compute_cleanup()
