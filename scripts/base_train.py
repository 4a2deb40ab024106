"""
Pretrain the base model: a GPT of `depth` layers on <|bos|>-prefixed documents from the parquet shards.
The depth dial sets width (depth * aspect_ratio) and heads (width / head_dim); the horizon is
num_iterations, or target_flops, or target_param_data_ratio (Chinchilla: 20 tokens per parameter).
Muon for the matrices, AdamW for embedding and lm_head (nanochat's learning rates), constant LR then a
linear warm-down, Muon momentum warm-up, val bpb every eval_every, samples every sample_every, CORE every
core_metric_every when <base_dir>/eval_bundle exists, periodic checkpoints and exact resume.

Launch:
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20     # 8 GPUs (speedrun)
    python -m scripts.base_train --depth=20 --device_batch_size=16                  # 1 GPU (grad accumulation)
    python -m scripts.base_train --depth=4 --aspect_ratio=48 --head_dim=64 --max_seq_len=256 \\
        --device_batch_size=16 --total_batch_size=4096 --num_iterations=250 --eval_every=50 \\
        --eval_tokens=32768 --sample_every=-1 --core_metric_every=-1                # CPU profile (~4 min)
    python -m scripts.base_train --depth=20 --arch=nanochat-2026   # nanochat's 2026 model (GPTConfig's parts)

Outputs: <base_dir>/base_checkpoints/<output_tag or d<depth>>/ (model, optimizer state per rank, meta with the
resolved config and run id, per-rank run state: data position, counters, loss series), the "Base model training" report section
with the loss curves, wandb. With save_every = N every N-th step is resumable: resume = 1 continues the run in
the output folder from its last one (bit-exact; same options and world size). A folder holding another run's
checkpoints is refused before anything is loaded (resume = 1, another output_tag, or overwrite = 1).
Tests: tests/test_pipeline.py (end to end); the pieces: tests/test_dataloader.py, tests/test_loss_eval.py.
"""

import os
import time
from dataclasses import asdict

import torch

from nanochat.checkpoint_manager import describe_checkpoint, load_checkpoint
from nanochat.checks import check_finite_parameters
from nanochat.common import (UserError, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, get_dist_info, get_peak_flops, init_wandb,
                             install_error_handler, print0)
from nanochat.config import ConfigError, Option, load_config, run_options
from nanochat.core_eval import evaluate_core, find_eval_bundle
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.gpt import ARCH_PRESETS, GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.perf import check_memory, compile_enabled, compile_model, mfu, peak_memory_mib, training_memory_bytes
from nanochat.report import get_report
from nanochat.runs import (check_resume_config, check_tokenizer, default_output_tag, load_run_state, prepare_run,
                           prune_checkpoints, save_training_checkpoint, tokenizer_sha256)
from nanochat.schedules import lr_multiplier, muon_momentum, num_grad_accum_steps, set_lr_multiplier, set_momentum
from nanochat.train_loop import (clip_gradients, counts_toward_time, every, format_train_step, fresh_loop_state,
                                 smooth_loss)
from nanochat.tokenizer import get_token_bytes, get_tokenizer

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    Option("run", str, "dummy", "wandb run name ('dummy' disables wandb)"),
    Option("device_type", str, "", "cuda|cpu|mps (empty: autodetect)", choices=("", "cuda", "cpu", "mps")),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA: bfloat16|float32 (CPU runs in fp32)",
           choices=("bfloat16", "float32")),
    Option("compile", bool, None, "torch.compile the model (default: on for CUDA, off elsewhere)"),
    # model
    Option("depth", int, 20, "number of transformer layers; sets width and heads", min=1),
    Option("arch", str, "nanochat-2025", "architecture preset: nanochat-2025 (October 2025) or nanochat-2026 "
           "(sliding windows, value embeddings, lambdas, smear, backout)", choices=tuple(ARCH_PRESETS)),
    Option("aspect_ratio", int, 64, "model width = depth * aspect_ratio", min=1),
    Option("head_dim", int, 128, "attention head size (heads = width / head_dim); small for tiny CPU models",
           min=2),
    Option("max_seq_len", int, 2048, "context length", min=1),
    # horizon: the first of these that is > 0 wins
    Option("num_iterations", int, -1, "optimizer steps (-1: derive from target_flops or the data:param ratio)",
           min=1, disabled=-1),
    Option("target_flops", float, -1.0, "training FLOPs budget (-1: unused)", min=1.0, disabled=-1.0),
    Option("target_param_data_ratio", float, 20.0, "training tokens per parameter (Chinchilla: 20)", min=0.0,
           disabled=-1.0),
    # batch
    Option("device_batch_size", int, 32, "rows per device per micro-step", min=1),
    Option("total_batch_size", int, 524288, "tokens per optimizer step over all ranks (-> gradient accumulation)",
           min=1),
    # optimization (nanochat's values)
    Option("embedding_lr", float, 0.2, "AdamW lr of the token embedding", min=0.0),
    Option("unembedding_lr", float, 0.004, "AdamW lr of the lm_head", min=0.0),
    Option("matrix_lr", float, 0.02, "Muon lr of the transformer matrices", min=0.0),
    Option("scalar_lr", float, 0.5, "AdamW lr of the per-layer lambdas (nanochat-2026 arch)", min=0.0),
    Option("weight_decay", float, 0.0, "AdamW weight decay", min=0.0),
    Option("grad_clip", float, 1.0, "clip each rank's gradient norm to this (0: off)", min=0.0),
    Option("warmup_ratio", float, 0.0, "fraction of steps of linear LR warm-up", min=0.0, max=1.0),
    Option("warmdown_ratio", float, 0.2, "fraction of steps of linear LR warm-down at the end", min=0.0,
           max=1.0),
    Option("final_lr_frac", float, 0.0, "LR multiplier reached at the last step", min=0.0, max=1.0),
    # evaluation and saving
    Option("eval_every", int, 250, "val bpb every this many steps and at the end (-1 disables)", min=1,
           disabled=-1),
    Option("eval_tokens", int, 20 * 524288, "validation tokens per evaluation (all ranks)", min=1),
    Option("core_metric_every", int, 2000,
           "CORE metric every this many steps and at the end, if the eval bundle exists (-1 disables)",
           min=1, disabled=-1),
    Option("core_metric_max_per_task", int, 500, "examples per CORE task (-1: all)", min=1, disabled=-1),
    Option("sample_every", int, 2000, "greedy samples every this many steps and at the end (-1 disables)", min=1,
           disabled=-1),
    Option("model_tag", str, None, "nanochat's name for output_tag in base_train (an alias; set one of the two)"),
    *run_options("base_checkpoints"),  # output_tag, overwrite, save_every, resume (nanochat.config)
]
script_start = time.time()  # the stage's wall-clock time goes into its report section
config = load_config(OPTIONS, description=__doc__)
# cross-option checks, before anything is loaded (the world size comes from the torchrun environment)
num_grad_accum_steps(config["total_batch_size"], config["device_batch_size"] * config["max_seq_len"] *
                     get_dist_info()[3], "total_batch_size", "device_batch_size * max_seq_len * world_size")
config_from_depth(config["depth"], 1, config["max_seq_len"], head_dim=config["head_dim"],
                  aspect_ratio=config["aspect_ratio"], arch=config["arch"])  # the width must split into heads of an even size
if config["warmup_ratio"] + config["warmdown_ratio"] > 1.0:
    raise ConfigError(f"warmup_ratio + warmdown_ratio = {config['warmup_ratio']} + {config['warmdown_ratio']} "
                      f"must be <= 1")
if config["num_iterations"] <= 0 and config["target_flops"] <= 0 and config["target_param_data_ratio"] <= 0:
    raise ConfigError("no training horizon: set num_iterations, target_flops or target_param_data_ratio > 0")

# -----------------------------------------------------------------------------
# Compute init

device_type = config["device_type"] or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
master_process = ddp_rank == 0
autocast = lambda: autocast_ctx(device_type, config["dtype"])  # noqa: E731  (a fresh context per use)
synchronize = torch.cuda.synchronize if device_type == "cuda" else lambda: None
wandb_run = init_wandb(config["run"], "nanochat", config, ddp_rank)

# -----------------------------------------------------------------------------
# Output folder and resume, decided before the tokenizer, model or data are loaded

if config["model_tag"] and config["output_tag"] and config["model_tag"] != config["output_tag"]:
    raise UserError(f"base_train: model_tag ({config['model_tag']!r}) is an alias of output_tag "
                    f"({config['output_tag']!r}); set only one of them")
output_tag = default_output_tag(config["model_tag"] if config["output_tag"] is None else config["output_tag"],
                                {"n_layer": config["depth"]})
checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", output_tag)
plan = prepare_run(checkpoint_dir, config["resume"], config["overwrite"], ddp_rank, ddp_world_size)
check_resume_config(plan, config)  # same model, data order and batch as the resumed run
if plan.resume_dir is not None:
    check_tokenizer(plan.resume_dir, plan.resume_step, plan.resume_meta)
    print0(f"Resuming from {describe_checkpoint(plan.resume_dir, plan.resume_step, plan.resume_meta)}")
tokenizer_sha = tokenizer_sha256()
print0(f"Output folder: {checkpoint_dir} | run id {plan.run_id}")

# -----------------------------------------------------------------------------
# Tokenizer

tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()
print0(f"Vocab size: {vocab_size:,}")

# -----------------------------------------------------------------------------
# Model

depth, max_seq_len = config["depth"], config["max_seq_len"]
model_config = config_from_depth(depth, vocab_size, max_seq_len, head_dim=config["head_dim"],
                                 aspect_ratio=config["aspect_ratio"], arch=config["arch"])
print0(f"Model config: {asdict(model_config)}")
with torch.device("meta"):
    model = GPT(model_config)  # parameters without memory, then allocated on the device and initialised
check_memory(training_memory_bytes(model), device, f"training depth {depth} with max_seq_len {max_seq_len}",
             "pick a smaller depth or max_seq_len")
model.to_empty(device=device)
model.init_weights()
orig_model = model  # the uncompiled model: for saving, sampling and the CORE metric
if compile_enabled(config["compile"], device_type):  # the option, else on for CUDA only
    model = compile_model(orig_model)
num_params = orig_model.num_params()
num_flops_per_token = orig_model.estimate_flops()
print0(f"Number of parameters: {num_params:,} | FLOPs per token: {num_flops_per_token:e}")

# Batch arithmetic: rows of max_seq_len tokens; gradient accumulation makes up total_batch_size.
device_batch_size, total_batch_size = config["device_batch_size"], config["total_batch_size"]
world_tokens_per_fwdbwd = device_batch_size * max_seq_len * ddp_world_size
grad_accum_steps = num_grad_accum_steps(total_batch_size, world_tokens_per_fwdbwd, "total_batch_size",
                                        "device_batch_size * max_seq_len * world_size")
print0(f"Tokens per micro-step (all ranks): {world_tokens_per_fwdbwd:,} | gradient accumulation steps: {grad_accum_steps}")

# Horizon
if config["num_iterations"] > 0:
    num_iterations = config["num_iterations"]
elif config["target_flops"] > 0:
    num_iterations = round(config["target_flops"] / (num_flops_per_token * total_batch_size))
elif config["target_param_data_ratio"] > 0:
    num_iterations = int(config["target_param_data_ratio"] * num_params) // total_batch_size
else:
    raise ConfigError("set one of num_iterations, target_flops or target_param_data_ratio")
num_iterations = max(num_iterations, 1)
total_tokens = total_batch_size * num_iterations
print0(f"Iterations: {num_iterations:,} | training tokens: {total_tokens:,} | "
       f"tokens:params = {total_tokens / num_params:.2f} | total FLOPs: {num_flops_per_token * total_tokens:e}")

# -----------------------------------------------------------------------------
# Optimizer

optimizers = orig_model.setup_optimizers(unembedding_lr=config["unembedding_lr"], embedding_lr=config["embedding_lr"],
                                         matrix_lr=config["matrix_lr"], weight_decay=config["weight_decay"],
                                         scalar_lr=config["scalar_lr"])
adamw_optimizer, muon_optimizer = optimizers

# Resume: model, optimizer states, counters, loss series and this rank's data position
start_step = 0  # a checkpoint of step s holds the model before update s
loop_state, loss_series = fresh_loop_state()  # counters and loss series, restored on resume
loader_resume_state = None
if plan.resume_dir is not None:
    run_state = load_run_state(plan.resume_dir, plan.resume_step, ddp_rank, ddp_world_size, num_iterations, device)
    model_data, optimizer_data, _ = load_checkpoint(plan.resume_dir, plan.resume_step, device, load_optimizer=True,
                                                    rank=ddp_rank)
    orig_model.load_state_dict(model_data)
    for opt, opt_data in zip(optimizers, optimizer_data):
        opt.load_state_dict(opt_data)
    start_step, loader_resume_state = run_state["step"], run_state["data_state"]
    loop_state, loss_series = run_state["counters"], run_state["loss_series"]
    del model_data, optimizer_data

# -----------------------------------------------------------------------------
# Data

train_loader = tokenizing_distributed_data_loader(tokenizer, device_batch_size, max_seq_len, "train", device=device,
                                                  resume_state=loader_resume_state)
build_val_loader = lambda: tokenizing_distributed_data_loader(  # noqa: E731  (a fresh pass over val each time)
    tokenizer, device_batch_size, max_seq_len, "val", device=device)
eval_steps = max(config["eval_tokens"] // world_tokens_per_fwdbwd, 1)
x, y, data_state = next(train_loader)  # prefetch the first batch
loader_state = loader_resume_state  # where the batch in hand (x, y) starts: what a checkpoint must store

# -----------------------------------------------------------------------------
# Schedules


def get_lr_multiplier(step):
    return lr_multiplier(step, num_iterations, warmup_frac=config["warmup_ratio"],
                         warmdown_frac=config["warmdown_ratio"], final_frac=config["final_lr_frac"])


# -----------------------------------------------------------------------------
# Helpers for the loop


def save(step, val_bpb):
    """This rank's run state (data position of the batch in hand, counters, loss series, RNG), then the model,
    optimizer states and, last, the meta."""
    run_state = dict(num_iterations=num_iterations, data_state=loader_state, counters=loop_state,
                     loss_series=loss_series)
    meta = {"user_config": config, "run_id": plan.run_id, "run_name": config["run"], "tokenizer_sha256": tokenizer_sha,
            "val_bpb": val_bpb, "device_batch_size": device_batch_size, "max_seq_len": max_seq_len}
    save_training_checkpoint(checkpoint_dir, step, orig_model, optimizers, run_state, meta, ddp_rank, ddp_world_size,
                             device)
    prune_checkpoints(checkpoint_dir, config["keep_last"], ddp_rank)
    print0(f"Saved checkpoint: {checkpoint_dir} step {step}")


SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]

# -----------------------------------------------------------------------------
# Training loop

peak_flops = get_peak_flops(device)
val_bpb = loss_series["val_bpb"][-1] if loss_series["val_bpb"] else None  # the latest evaluation
core_results = None
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    flops_so_far = num_flops_per_token * total_batch_size * step

    # once in a while: validation bits per byte
    resumed_here = plan.resume_dir is not None and step == start_step  # evaluated before that save already
    if every(step, config["eval_every"], last_step) and not resumed_here:
        model.eval()
        with autocast():
            val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
        print0(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
        loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
        loss_series["val_steps"].append(step)
        loss_series["val_bpb"].append(val_bpb)
        wandb_run.log({"step": step, "total_training_flops": flops_so_far, "val/bpb": val_bpb})
        model.train()

    # once in a while: the CORE metric (only with the DCLM eval bundle)
    if every(step, config["core_metric_every"], last_step):
        bundle = find_eval_bundle(get_base_dir())
        if bundle is None:
            if step == start_step:
                print0(f"CORE metric skipped: no eval bundle at {os.path.join(get_base_dir(), 'eval_bundle')}")
        else:
            model.eval()
            with autocast():
                core_results = evaluate_core(orig_model, tokenizer, device, bundle,
                                             max_per_task=config["core_metric_max_per_task"])
            print0(f"Step {step:05d} | CORE metric: {core_results['core_metric']:.4f}")
            wandb_run.log({"step": step, "core_metric": core_results["core_metric"]})
            model.train()

    # once in a while: greedy samples (rank 0)
    if master_process and every(step, config["sample_every"], last_step):
        orig_model.eval()
        for prompt in SAMPLE_PROMPTS:
            tokens = tokenizer(prompt, prepend=tokenizer.get_bos_token_id())
            with autocast():
                sample = list(orig_model.generate(tokens, max_tokens=16, temperature=0.0))
            print0(f"  {prompt!r} -> {tokenizer.decode(sample)!r}")
        orig_model.train()

    # checkpoints: periodic ones, and always the final one
    if last_step or (config["save_every"] > 0 and step > start_step and step % config["save_every"] == 0):
        save(step, val_bpb)

    if last_step:
        break

    # one optimizer step: gradient accumulation over grad_accum_steps micro-batches
    synchronize()
    t0 = time.time()
    for micro_step in range(grad_accum_steps):
        with autocast():
            loss = model(x, y)
        train_loss = loss.detach()
        (loss / grad_accum_steps).backward()  # the optimizers average gradients over ranks in step()
        loader_state = data_state
        x, y, data_state = next(train_loader)  # prefetch the next batch while the GPU works
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
    if step % 100 == 0:
        wandb_run.log({**log, "total_training_flops": flops_so_far})

# -----------------------------------------------------------------------------
# Report

peak_memory = peak_memory_mib(device)  # CUDA's allocator peak; None on CPU / MPS
print0(f"Peak memory usage: {peak_memory:.2f} MiB" if peak_memory is not None else "Peak memory usage: n/a (not CUDA)")
print0(f"Total training time: {loop_state['total_training_time'] / 60:.2f}m")
print0(f"Minimum validation bpb: {loop_state['min_val_bpb']:.4f}")
report = get_report()
report.log(section="Base model training", data=[
    config,
    {
        "Number of parameters": num_params,
        "Number of FLOPs per token": f"{num_flops_per_token:e}",
        "Calculated number of iterations": num_iterations,
        "Number of training tokens": total_tokens,
        "Tokens : Params ratio": total_tokens / num_params,
        "DDP world size": ddp_world_size,
        "Gradient accumulation steps": grad_accum_steps,
    },
    {
        "Minimum validation bpb": loop_state["min_val_bpb"] if val_bpb is not None else "-",
        "Final validation bpb": val_bpb if val_bpb is not None else "-",
        "CORE metric estimate": core_results["core_metric"] if core_results else "-",
        "Total training flops": f"{num_flops_per_token * total_tokens:e}",
        "Total training time (min)": loop_state["total_training_time"] / 60,
        "Peak memory usage (MiB)": peak_memory if peak_memory is not None else "-",
    },
], duration_s=time.time() - script_start)
report.log_series("Base model training", "train_loss", loss_series["train_steps"], loss_series["train_loss"])
if loss_series["val_steps"]:
    report.log_series("Base model training", "val_bpb", loss_series["val_steps"], loss_series["val_bpb"])

# -----------------------------------------------------------------------------
# Cleanup

wandb_run.finish()
compute_cleanup()
