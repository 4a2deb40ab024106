"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU (categorical) and GSM8K, HumanEval (generative,
pass@num_samples); print each accuracy and, when all five ran, ChatCORE; log them to the report.

8 GPUs:     torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
one GPU:    python -m scripts.chat_eval -i sft -a 'ARC-Easy|GSM8K'
tiny, CPU:  python -m scripts.chat_eval -i sft -a 'ARC-Easy|GSM8K' -x 16 -m 64
CPU, 2 processes (gloo): torchrun --standalone --nproc_per_node=2 -m scripts.chat_eval -- -i sft -x 16

The evaluation itself lives in nanochat/chat_eval.py.
"""

import argparse

import torch

from nanochat.chat_eval import TASK_NAMES, chatcore, run_chat_eval
from nanochat.checkpoint_manager import load_model
from nanochat.common import (autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             install_error_handler, print0)
from nanochat.engine import Engine
from nanochat.report import get_report

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config

    parser = argparse.ArgumentParser(description="Evaluate a chat model (ChatCORE tasks)")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["base", "mid", "sft"],
                        help="which checkpoint family to load")
    parser.add_argument("-a", "--task-name", type=str, default="|".join(TASK_NAMES),
                        help="'|'-separated tasks (default: all five)")
    parser.add_argument("-d", "--dtype", type=str, default="bfloat16", choices=["float32", "bfloat16"],
                        help="autocast dtype (bf16 autocast applies on CUDA only)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="generation budget per sample")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (pass@n)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="batch size for categorical tasks")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most this many problems")
    args = parser.parse_args(argv)
    task_names = [name.strip() for name in args.task_name.split("|") if name.strip()]
    unknown = [name for name in task_names if name not in TASK_NAMES]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {'|'.join(TASK_NAMES)}")

    # ------------------------------------------------------------------------------------------------------
    # Compute init

    device_type = autodetect_device_type()
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)

    # ------------------------------------------------------------------------------------------------------
    # Model and tokenizer

    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    print0(f"Loaded {args.source} model (step {meta.get('step')}) on {device}")

    # ------------------------------------------------------------------------------------------------------
    # Evaluate

    results = {}
    for task_name in task_names:
        with autocast_ctx(device_type, args.dtype), torch.no_grad():
            accuracy = run_chat_eval(task_name, model, tokenizer, engine, batch_size=args.batch_size,
                                     num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k, max_problems=args.max_problems)
        results[task_name] = accuracy
        print0(f"{task_name} accuracy: {100 * accuracy:.2f}%")

    chatcore_metric = None
    if all(name in results for name in TASK_NAMES):
        chatcore_metric = chatcore(results)
        print0(f"ChatCORE metric: {chatcore_metric:.4f}")

    # ------------------------------------------------------------------------------------------------------
    # Report

    settings = {"source": args.source, "model_tag": args.model_tag, "step": meta.get("step"),
                "temperature": args.temperature, "num_samples": args.num_samples,
                "max_new_tokens": args.max_new_tokens, "max_problems": args.max_problems}
    data = [settings, dict(results)]
    if chatcore_metric is not None:
        data.append({"ChatCORE metric": chatcore_metric})
    get_report().log(section=f"Chat evaluation {args.source}", data=data)

    # ------------------------------------------------------------------------------------------------------
    # Cleanup

    compute_cleanup()


if __name__ == "__main__":
    main()
