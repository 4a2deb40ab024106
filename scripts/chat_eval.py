"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU (categorical) and GSM8K, HumanEval, SpellingBee
(generative, pass@num_samples); print each accuracy and, when nanochat's five ChatCORE tasks ran (all but
SpellingBee), ChatCORE; log them to the report.

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

from nanochat.chat_eval import CHATCORE_TASKS, TASK_NAMES, chatcore, run_chat_eval
from nanochat.checkpoint_manager import SOURCE_DIRS, load_model, resolve_checkpoint
from nanochat.common import (autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             install_error_handler, print0)
from nanochat.config import ArgumentParser, bounded
from nanochat.engine import Engine
from nanochat.execution import describe_isolation
from nanochat.report import format_task_results, get_report

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config

    t_start = time.time()
    parser = ArgumentParser(description="Evaluate a chat model (ChatCORE tasks)")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["base", "mid", "sft", "rl"],
                        help="which checkpoint family to load")
    parser.add_argument("-a", "--task-name", type=str, default="|".join(TASK_NAMES),
                        help="'|'-separated tasks (default: all)")
    parser.add_argument("-d", "--dtype", type=str, default="bfloat16", choices=["float32", "bfloat16"],
                        help="autocast dtype (bf16 autocast applies on CUDA only)")
    parser.add_argument("-t", "--temperature", type=bounded(float, min=0.0), default=0.0,
                        help="sampling temperature (0 = greedy)")
    parser.add_argument("-m", "--max-new-tokens", type=bounded(int, min=1), default=512,
                        help="generation budget per sample")
    parser.add_argument("-n", "--num-samples", type=bounded(int, min=1), default=1, help="samples per problem (pass@n)")
    parser.add_argument("-k", "--top-k", type=bounded(int, min=0), default=50, help="top-k sampling")
    parser.add_argument("-b", "--batch-size", type=bounded(int, min=1), default=8,
                        help="batch size for categorical tasks")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: largest)")
    parser.add_argument("-s", "--step", type=bounded(int, min=0), default=None, help="checkpoint step (default: last)")
    parser.add_argument("-x", "--max-problems", type=bounded(int, min=1), default=None,
                        help="evaluate at most this many problems")
    args = parser.parse_args(argv)
    task_names = [name.strip() for name in args.task_name.split("|") if name.strip()]
    unknown = [name for name in task_names if name not in TASK_NAMES]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {'|'.join(TASK_NAMES)}")
    if not task_names:
        parser.error(f"-a/--task-name names no task; choose from {'|'.join(TASK_NAMES)}")

    # ------------------------------------------------------------------------------------------------------
    # Compute init

    device_type = autodetect_device_type()
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)

    # ------------------------------------------------------------------------------------------------------
    # Model and tokenizer

    checkpoint_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model_tag = os.path.basename(checkpoint_dir)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=model_tag, step=step)
    engine = Engine(model, tokenizer)
    checkpoint = f"{SOURCE_DIRS[args.source]}/{model_tag} step {step}"  # names the results in the report

    # ------------------------------------------------------------------------------------------------------
    # Evaluate

    if "HumanEval" in task_names:  # model-written code runs on this machine: say how it is isolated
        print0(f"Code sandbox for HumanEval: {describe_isolation()}")
    results = {}
    for task_name in task_names:
        with autocast_ctx(device_type, args.dtype), torch.no_grad():
            accuracy = run_chat_eval(task_name, model, tokenizer, engine, batch_size=args.batch_size,
                                     num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k, max_problems=args.max_problems)
        results[task_name] = accuracy
        print0(f"{task_name} accuracy: {100 * accuracy:.2f}%")

    if all(name in results for name in CHATCORE_TASKS):
        subset = f" (-x {args.max_problems})" if args.max_problems else ""
        print0(f"ChatCORE metric: {chatcore(results):.4f}{subset}")

    # ------------------------------------------------------------------------------------------------------
    # Report: this evaluation's tasks replace their earlier results; the other tasks keep theirs

    section = f"Chat evaluation {args.source}"
    report = get_report()
    new = {name: {"value": value, "max_problems": args.max_problems, "checkpoint": checkpoint}
           for name, value in results.items()}
    merged = report.merge_task_results(section, new)
    if merged is not None:  # rank 0
        settings = {"source": args.source, "checkpoint": checkpoint, "run": meta.get("run_name", "unknown"),
                    "temperature": args.temperature, "num_samples": args.num_samples,
                    "max_new_tokens": args.max_new_tokens, "max_problems": args.max_problems}
        data = [settings, format_task_results(merged, checkpoint)]
        same_checkpoint = {merged[n]["checkpoint"] for n in CHATCORE_TASKS if n in merged} == {checkpoint}
        if all(name in merged for name in CHATCORE_TASKS) and same_checkpoint:
            subsets = sorted({merged[n]["max_problems"] for n in CHATCORE_TASKS} - {None})
            note = f" (-x {', '.join(map(str, subsets))})" if subsets else ""
            data.append({"ChatCORE metric": f"{chatcore({n: merged[n]['value'] for n in CHATCORE_TASKS}):.4f}{note}"})
        report.log(section=section, data=data, duration_s=time.time() - t_start)

    # ------------------------------------------------------------------------------------------------------
    # Cleanup

    compute_cleanup()


if __name__ == "__main__":
    main()
