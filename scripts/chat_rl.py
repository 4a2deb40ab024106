"""
Chat RL: reinforcement learning with verifiable rewards on a chat model, as nanochat's chat_rl.py (keys,
defaults, GSM8K from the SFT checkpoint). The algorithm is REINFORCE with a group baseline: each question gets
num_samples completions sampled by the Engine (KV cache, calculator tool), each completion a reward from its
task, advantage = reward - the group's mean reward (advantage = "zscore": divided by the group's std, as GRPO),
and the loss is the token-level policy gradient sum advantage * (-log p) over the sampled tokens, normalised
per token over the whole step (all micro-batches and ranks, as SFT's loss_normalization = "token"; nanochat
divides per micro-batch: "micro_batch_mean"). On-policy: no KL penalty, no PPO ratio, no clipping.
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl              # 8 GPUs: GSM8K from sft
    python -m scripts.chat_rl                                                 # one GPU
    python -m scripts.chat_rl --config configs/rl_cpu.txt                     # tiny, CPU: SpellingBee
Any Task with a reward() trains (train_task: mixture specs, tasks/mixture.py); pass@k on eval_task every
eval_every steps. Writes <base_dir>/chatrl_checkpoints/<output_tag>/ and the "Chat RL" report section.
Building blocks: nanochat/rl.py. Tests: tests/test_rl.py, tests/test_chat_rl.py.
"""

import random
import time

import numpy as np
import torch

from nanochat.checkpoint_manager import build_model, describe_checkpoint
from nanochat.checks import check_finite_parameters
from nanochat.common import (UserError, all_reduce_values, autocast_ctx, autodetect_device_type, compute_cleanup,
                             compute_init, get_dist_info, init_wandb, install_error_handler, print0)
from nanochat.config import Option, load_config, run_options
from nanochat.engine import Engine
from nanochat.report import format_duration, get_report
from nanochat.runs import (check_resume_config, load_resume, prepare_finetune, prune_checkpoints,
                           save_training_checkpoint, tokenizer_sha256)
from nanochat.rl import (ADVANTAGES, Sampling, completion_text, evaluate_pass_at_k, group_advantages,
                         pg_accumulate_step, rank_example_indices, report_section, rollout_batch_sizes,
                         rollout_micro_batches, rollout_seed, sample_completions, score_completions)
from nanochat.schedules import lr_multiplier, num_grad_accum_steps, scale_initial_lr, set_lr_multiplier
from nanochat.sft import LOSS_NORMALIZATIONS
from nanochat.sft_report import format_skip
from nanochat.tokenizer import get_tokenizer
from tasks.mixture import build_mixtures, check_mixture_specs

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    # nanochat's keys and defaults
    Option("run", str, "dummy", "wandb run name ('dummy' disables wandb; no API key: offline into the run folder)"),
    Option("source", str, "sft", "checkpoint to start from", choices=("base", "mid", "sft")),
    Option("model_tag", str, None, "model tag of the source checkpoint to load (default: largest d<depth>)"),
    Option("step", int, None, "checkpoint step to load (default: last)", min=0),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA", choices=("bfloat16", "float32")),
    Option("device_batch_size", int, 8, "completions generated / trained per device at a time", min=1),
    Option("examples_per_step", int, 16, "questions per optimizer step, all ranks", min=1),
    Option("num_samples", int, 16, "completions per question: the group whose mean reward is the baseline", min=1),
    Option("max_new_tokens", int, 256, "generation budget of a completion", min=1),
    Option("temperature", float, 1.0, "sampling temperature of the rollouts", min=0.0),
    Option("top_k", int, 50, "top-k sampling of the rollouts (0: all tokens)", min=0),
    Option("unembedding_lr", float, 0.004, "AdamW lr of the lm_head", min=0.0),
    Option("embedding_lr", float, 0.2, "AdamW lr of the token embedding", min=0.0),
    Option("matrix_lr", float, 0.02, "Muon lr of the transformer matrices", min=0.0),
    Option("weight_decay", float, 0.0, "AdamW weight decay", min=0.0),
    Option("init_lr_frac", float, 0.05, "every lr is multiplied by this", min=0.0),
    Option("num_epochs", int, 1, "passes over the training task", min=1),
    Option("eval_every", int, 60, "pass@k on eval_task every N steps and at the end (-1: never)", min=1, disabled=-1),
    Option("eval_examples", int, 400, "problems of eval_task per evaluation", min=1),
    # beyond nanochat
    Option("device_type", str, "", "autodetect if empty", choices=("", "cuda", "cpu", "mps")),
    Option("seed", int, 42, "torch/python/numpy seed and the root of every rollout's sampling seed", min=0),
    Option("max_iterations", int, -1, "cap on optimizer steps (-1: no cap)", min=1, disabled=-1),
    Option("train_task", list, ["GSM8K:main:train"], "training mixture specs; every task needs a reward()"),
    Option("eval_task", list, ["GSM8K:main:test"], "pass@k mixture specs (each problem judged by its task)"),
    Option("advantage", str, "mean", "mean: r - group mean (nanochat) | zscore: / group std (GRPO)",
           choices=ADVANTAGES),
    Option("loss_normalization", str, "token", "token: per sampled token of the step | micro_batch_mean: nanochat's",
           choices=LOSS_NORMALIZATIONS),
    Option("eval_samples", int, 8, "completions per eval problem: pass@1..pass@eval_samples", min=1),
    *run_options("chatrl_checkpoints"),  # output_tag, overwrite, save_every, resume (checkpoint_manager)
]
script_start = time.time()  # the stage's wall-clock time goes into its report section
config = load_config(OPTIONS, description=__doc__)
# cross-option checks, before anything is loaded (the world size comes from the torchrun environment)
check_mixture_specs({key: config[key] for key in ("train_task", "eval_task")})
examples_per_rank = num_grad_accum_steps(config["examples_per_step"], get_dist_info()[3], "examples_per_step",
                                         "the number of processes")

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

source_dir, source_step, _, plan = prepare_finetune(
    config["source"], config["model_tag"], config["step"], "chatrl_checkpoints", config["output_tag"],
    config["resume"], config["overwrite"], ddp_rank, ddp_world_size)
check_resume_config(plan, config)  # same questions, order and batch as the resumed run
print0(f"Output folder: {plan.output_dir} | run id {plan.run_id}")

# -----------------------------------------------------------------------------
# Tokenizer and tasks, before the model: a missing dataset or a task without a reward fails in seconds

tokenizer = get_tokenizer()
mixtures, parts, _ = build_mixtures({"train_task": config["train_task"], "eval_task": config["eval_task"]})
train_ds, eval_ds = mixtures["train_task"], mixtures["eval_task"]
for spec, task, _ in parts["train_task"]:
    if not callable(getattr(task, "reward", None)):
        raise UserError(f"train_task entry {spec!r}: {type(task).__name__} has no reward(conversation, completion) "
                        f"method, so it cannot be trained on with RL; use a task that has one (GSM8K, HumanEval, "
                        f"SpellingBee) or add it")
pad_id = tokenizer.encode_special("<|assistant_end|>")  # padding; its targets are -1 anyway
end_ids = {pad_id, tokenizer.get_bos_token_id()}  # the tokens that end a completion
sampling = Sampling(config["num_samples"], config["device_batch_size"], config["max_new_tokens"],
                    config["temperature"], config["top_k"])
eval_sampling = sampling._replace(num_samples=config["eval_samples"])  # nanochat: temperature 1, top_k 50
num_generation_batches = len(rollout_batch_sizes(config["num_samples"], config["device_batch_size"]))
num_iterations = (len(train_ds) // config["examples_per_step"]) * config["num_epochs"]  # nanochat's count
if config["max_iterations"] >= 0:
    num_iterations = min(num_iterations, config["max_iterations"])
if num_iterations <= 0:
    raise UserError(f"no optimizer steps: {len(train_ds)} training questions for examples_per_step="
                    f"{config['examples_per_step']}; add data or lower examples_per_step")
print0(f"Training questions: {len(train_ds):,} | evaluation problems: {min(config['eval_examples'], len(eval_ds)):,}")
print0(f"Per step: {config['examples_per_step']} questions x {config['num_samples']} completions = "
       f"{config['examples_per_step'] * config['num_samples']} rollouts ({examples_per_rank} questions per rank, "
       f"{num_generation_batches} generation batches each) | advantage: {config['advantage']}")
print0(f"Number of iterations: {num_iterations} | loss normalisation: {config['loss_normalization']}")

# -----------------------------------------------------------------------------
# Model (from the source checkpoint, or from the checkpoint being resumed)

tokenizer_sha = tokenizer_sha256()
load_dir, load_step = (plan.resume_dir, plan.resume_step) if plan.resume_dir else (source_dir, source_step)
model, _, load_meta = build_model(load_dir, load_step, device, phase="train")
print0(f"{'Resuming from' if plan.resume_dir else 'Loaded checkpoint:'} "
       f"{describe_checkpoint(load_dir, load_step, load_meta)}")
print0(f"Model: depth {model.config.n_layer}, {model.num_params():,} parameters")
engine = Engine(model, tokenizer)  # rollouts and evaluation: the policy being trained, with a KV cache
wandb_run = init_wandb(config["run"], "nanochat-rl", config, ddp_rank, run_dir=plan.output_dir)

# -----------------------------------------------------------------------------
# Optimizers: nanochat's three learning rates, all scaled by init_lr_frac

optimizers = model.setup_optimizers(unembedding_lr=config["unembedding_lr"], embedding_lr=config["embedding_lr"],
                                    matrix_lr=config["matrix_lr"], weight_decay=config["weight_decay"])
scale_initial_lr(optimizers, config["init_lr_frac"])

# -----------------------------------------------------------------------------
# Resume state (optimizer, step, RNG, counters) or a fresh start; the step is the data position and the
# rollouts' seeds derive from (seed, step, question, batch), so a resumed run samples the same rollouts

start_step, metrics = 0, {}
totals = {"skipped_nonfinite": 0, "skipped_oom": 0, "completions": 0, "generated_tokens": 0, "sampled": 0,
          "train_time": 0.0, "rollout_time": 0.0}  # counts summed over ranks; seconds of the optimizer steps
series = {"train_reward": [], "pass@1": [], f"pass@{config['eval_samples']}": []}  # [step, value] points
if plan.resume_dir is not None:
    run_state = load_resume(plan.resume_dir, plan.resume_step, optimizers, ddp_rank, ddp_world_size, num_iterations,
                            device)
    start_step, series = run_state["step"], run_state["loss_series"]
    totals, metrics = {**totals, **run_state["counters"]["totals"]}, run_state["counters"]["metrics"]


def save(step):
    """A resumable checkpoint: this rank's run state, the model, the optimizer states and, last, the meta."""
    run_state = dict(num_iterations=num_iterations, data_state={}, loss_series=series,
                     counters={"totals": totals, "metrics": metrics})
    meta = {"user_config": config, "run_id": plan.run_id, "run_name": config["run"], "tokenizer_sha256": tokenizer_sha,
            "source": config["source"], "source_dir": source_dir, "source_step": source_step, "metrics": metrics,
            "totals": totals}
    save_training_checkpoint(plan.output_dir, step, model, optimizers, run_state, meta, ddp_rank, ddp_world_size,
                             device)
    prune_checkpoints(plan.output_dir, config["keep_last"], ddp_rank)


# -----------------------------------------------------------------------------
# Training loop: step s trains with lrm = 1 - s / num_iterations; pass@k happens before step s and once more
# after the last step (at s == num_iterations)

last_rollouts = []  # (completion, reward) of rank 0's first question at the latest step, for the report
loop_t0 = time.time()
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    resumed_here = plan.resume_dir is not None and step == start_step  # evaluated and saved before the interruption

    # once in a while: pass@k on the evaluation task (sampled as the rollouts are, same seeds every time)
    if config["eval_every"] > 0 and (last_step or step % config["eval_every"] == 0) and not resumed_here:
        model.eval()
        with autocast():
            passk = evaluate_pass_at_k(eval_ds, engine, eval_sampling, config["eval_examples"],
                                       config["seed"], device, ddp_rank, ddp_world_size)
        metrics = {k: passk[k] for k in ("pass@1", f"pass@{config['eval_samples']}")}
        print0(f"Step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in passk.items()))
        wandb_run.log({"step": step, **passk})
        for key, value in metrics.items():
            series[key].append([step, value])
        model.train()

    # once in a while: a resumable checkpoint (the final one is written after the loop)
    if config["save_every"] > 0 and 0 < step < num_iterations and step % config["save_every"] == 0 \
            and not resumed_here:
        save(step)

    if last_step:
        break

    # rollouts: num_samples completions of each of this rank's questions, device_batch_size at a time
    synchronize()
    t0 = time.time()
    model.eval()
    sequences, masks, advantages, rewards, generated = [], [], [], [], 0
    for j, index in enumerate(rank_example_indices(step, examples_per_rank, len(train_ds), ddp_rank, ddp_world_size)):
        conversation, task = train_ds[index], train_ds.task_of(index)
        prompt = tokenizer.render_for_completion(conversation)
        seeds = [rollout_seed(config["seed"], step, index, b) for b in range(num_generation_batches)]
        with autocast():
            group, group_masks = sample_completions(engine, prompt, sampling, seeds)
        texts = [completion_text(tokenizer, s, len(prompt), end_ids) for s in group]
        group_rewards = score_completions(task, conversation, texts)
        sequences += group
        masks += group_masks
        rewards += group_rewards
        advantages += group_advantages(group_rewards, config["advantage"])
        generated += sum(len(s) - len(prompt) for s in group)
        if j == 0 and master_process:
            last_rollouts = [(tokenizer.decode(prompt), text, r) for text, r in zip(texts[:2], group_rewards)]
    synchronize()
    t_rollout = time.time() - t0

    # one optimizer step on the rollouts: skipped on every rank if any rank hit NaN or out of memory
    model.train()
    micro_batches = rollout_micro_batches(sequences, masks, advantages, config["device_batch_size"], pad_id)
    result = pg_accumulate_step(model, micro_batches, config["loss_normalization"], device, ddp_world_size, ddp_rank,
                                autocast)
    reward_sum, completions, generated = all_reduce_values([sum(rewards), len(rewards), generated], "sum", device,
                                                           ddp_world_size)
    t_rollout = all_reduce_values([t_rollout], "max", device, ddp_world_size)[0]  # the slowest rank's
    mean_reward = reward_sum / completions
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
    check_finite_parameters(model, step)  # stop before NaN/inf weights are sampled from or saved
    model.zero_grad(set_to_none=True)
    synchronize()
    dt = time.time() - t0
    totals["rollout_time"] += t_rollout
    totals["train_time"] += dt
    totals["completions"] += int(completions)
    totals["generated_tokens"] += int(generated)
    totals["sampled"] += int(result.totals["sampled"])

    # logging: the reward, and the rollout throughput (completions and generated tokens per second of rollout)
    log = {"step": step, "reward": mean_reward, "loss": result.loss, "lrm": lrm,
           "sampled_tokens": result.totals["sampled"],
           "completions_per_sec": completions / t_rollout, "gen_tok_per_sec": generated / t_rollout,
           "mean_completion_tokens": generated / completions, "dt": dt}
    eta = (time.time() - loop_t0) / (step + 1 - start_step) * (num_iterations - step - 1)
    print0(f"Step {step:05d} | reward: {mean_reward:.4f} | loss: {result.loss:.6f} | lrm: {lrm:.6f} | "
           f"sampled tokens: {int(result.totals['sampled']):,} | completion length: "
           f"{log['mean_completion_tokens']:.1f} | completions/s: {log['completions_per_sec']:.1f} | "
           f"gen tok/s: {log['gen_tok_per_sec']:,.0f} | rollout {t_rollout:.2f}s of {dt:.2f}s | {progress} | "
           f"eta {format_duration(eta)}")
    wandb_run.log(log)
    series["train_reward"].append([step, mean_reward])

# -----------------------------------------------------------------------------
# The final checkpoint, the report section, cleanup

save(num_iterations)
print0(f"Training time: {totals['train_time']:.1f}s (rollouts {totals['rollout_time']:.1f}s) | skipped steps: "
       f"{totals['skipped_nonfinite']} non-finite, {totals['skipped_oom']} out of memory")
report = get_report()
report.log(section="Chat RL", data=report_section(config, len(train_ds), num_iterations, totals, series, metrics,
                                                  last_rollouts),
           duration_s=time.time() - script_start)
for name, points in series.items():
    report.log_series("Chat RL", name, [p[0] for p in points], [p[1] for p in points])
wandb_run.finish()
compute_cleanup()
