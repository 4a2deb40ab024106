"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU (categorical) and GSM8K, HumanEval (generative,
pass@num_samples); print each accuracy and, when all five ran, ChatCORE; log them to the report.

8 GPUs:     torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
one GPU:    python -m scripts.chat_eval -i sft -a 'ARC-Easy|GSM8K'
tiny, CPU:  python -m scripts.chat_eval -i sft -a 'ARC-Easy|GSM8K' -x 16 -m 64
CPU, 2 processes (gloo): torchrun --standalone --nproc_per_node=2 -m scripts.chat_eval -- -i sft -x 16

The evaluation itself lives in nanochat/chat_eval.py. Results are kept
per task in the "Chat evaluation <source>" report section: evaluating a subset of the tasks updates those and
keeps the others; a result on a subset of the problems (-x N) is marked "(-x N)" there and in the summary.
ChatCORE is reported when all five tasks have a result from the same checkpoint.
"""

import os
import time

import torch

from nanochat.chat_eval import TASK_NAMES, chatcore, run_chat_eval
from nanochat.checkpoint_manager import SOURCE_DIRS, load_model, resolve_checkpoint
from nanochat.common import (autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             install_error_handler, print0)
from nanochat.config import ConfigError, Option, load_config
from nanochat.engine import Engine
from nanochat.execution import describe_isolation
from nanochat.report import format_task_results, get_report, task_metrics

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

OPTIONS = [
    Option("source", str, None, "which checkpoint family to load (required)", choices=tuple(SOURCE_DIRS),
           short="i"),
    Option("task_name", str, "|".join(TASK_NAMES), "'|'-separated tasks (default: all five)", short="a"),
    Option("dtype", str, "bfloat16", "autocast dtype (bf16 autocast applies on CUDA only)",
           choices=("float32", "bfloat16"), short="d"),
    Option("temperature", float, 0.0, "sampling temperature (0: greedy)", min=0.0, short="t"),
    Option("max_new_tokens", int, 512, "generation budget per sample", min=1, short="m"),
    Option("num_samples", int, 1, "samples per problem (pass@n)", min=1, short="n"),
    Option("top_k", int, 50, "top-k sampling (0: off)", min=0, short="k"),
    Option("batch_size", int, 8, "batch size for categorical tasks", min=1, short="b"),
    Option("model_tag", str, None, "model tag, e.g. d20 (default: largest)", short="g"),
    Option("step", int, None, "checkpoint step (default: last)", min=0, short="s"),
    Option("max_problems", int, None, "evaluate at most this many problems per task (default: all)", min=1,
           short="x"),
]


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config

    t_start = time.time()
    config = load_config(OPTIONS, argv, description=__doc__)
    if config["source"] is None:
        raise ConfigError("command line: -i/--source is required: base, mid or sft (see --help)")
    task_names = [name.strip() for name in config["task_name"].split("|") if name.strip()]
    unknown = [name for name in task_names if name not in TASK_NAMES]
    if unknown:
        raise ConfigError(f"command line -a/--task_name: unknown task(s) {unknown}; choose from {'|'.join(TASK_NAMES)}")
    if not task_names:
        raise ConfigError(f"command line -a/--task_name names no task; choose from {'|'.join(TASK_NAMES)}")

    # ------------------------------------------------------------------------------------------------------
    # Compute init

    device_type = autodetect_device_type()
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)

    # ------------------------------------------------------------------------------------------------------
    # Model and tokenizer

    checkpoint_dir, step = resolve_checkpoint(config["source"], config["model_tag"], config["step"])
    model_tag = os.path.basename(checkpoint_dir)
    model, tokenizer, meta = load_model(config["source"], device, phase="eval", model_tag=model_tag, step=step)
    engine = Engine(model, tokenizer)
    checkpoint = f"{SOURCE_DIRS[config['source']]}/{model_tag} step {step}"  # names the results in the report

    # ------------------------------------------------------------------------------------------------------
    # Evaluate

    if "HumanEval" in task_names:  # model-written code runs on this machine: say how it is isolated
        print0(f"Code sandbox for HumanEval: {describe_isolation()}")
    results = {}
    for task_name in task_names:
        with autocast_ctx(device_type, config["dtype"]), torch.no_grad():
            accuracy = run_chat_eval(task_name, model, tokenizer, engine, batch_size=config["batch_size"],
                                     num_samples=config["num_samples"], max_new_tokens=config["max_new_tokens"],
                                     temperature=config["temperature"], top_k=config["top_k"],
                                     max_problems=config["max_problems"])
        results[task_name] = accuracy
        print0(f"{task_name} accuracy: {100 * accuracy:.2f}%")

    if all(name in results for name in TASK_NAMES):
        subset = f" (-x {config['max_problems']})" if config['max_problems'] else ""
        print0(f"ChatCORE metric: {chatcore(results):.4f}{subset}")

    # ------------------------------------------------------------------------------------------------------
    # Report: this evaluation's tasks replace their earlier results; the other tasks keep theirs

    section = f"Chat evaluation {config['source']}"
    report = get_report()
    new = {name: {"value": value, "max_problems": config["max_problems"], "checkpoint": checkpoint}
           for name, value in results.items()}
    merged = report.merge_task_results(section, new)
    if merged is not None:  # rank 0
        settings = {"source": config["source"], "checkpoint": checkpoint, "run": meta.get("run_name", "unknown"),
                    "temperature": config["temperature"], "num_samples": config["num_samples"],
                    "max_new_tokens": config["max_new_tokens"], "max_problems": config["max_problems"]}
        data = [settings, format_task_results(merged, checkpoint)]
        metrics = task_metrics(merged)  # the summary table's cells, kept as data beside the markdown
        same_checkpoint = {merged[n]["checkpoint"] for n in TASK_NAMES if n in merged} == {checkpoint}
        if all(name in merged for name in TASK_NAMES) and same_checkpoint:
            subsets = sorted({merged[n]["max_problems"] for n in TASK_NAMES} - {None})
            note = f"-x {', '.join(map(str, subsets))}" if subsets else None
            score = chatcore({n: merged[n]["value"] for n in TASK_NAMES})
            data.append({"ChatCORE metric": f"{score:.4f}" + (f" ({note})" if note else "")})
            metrics["ChatCORE"] = {"value": score, "note": note}
        report.log(section=section, data=data, duration_s=time.time() - t_start, metrics=metrics)

    # ------------------------------------------------------------------------------------------------------
    # Cleanup

    compute_cleanup()


if __name__ == "__main__":
    main()
