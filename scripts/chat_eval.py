"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU (categorical) and GSM8K, HumanEval, SpellingBee
(generative, pass@num_samples); print each accuracy and, when nanochat's five ChatCORE tasks ran (all but
SpellingBee), ChatCORE; log them to the report.

8 GPUs:     torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
one GPU:    python -m scripts.chat_eval -i sft -a 'ARC-Easy|GSM8K'
tiny, CPU:  python -m scripts.chat_eval -i sft -a 'ARC-Easy|GSM8K' -x 16 -m 64
your data:  python -m scripts.chat_eval -i sft -a 'data/chats.parquet|ChitChat:test'   # loss and bpb per source
CPU, 2 processes (gloo): torchrun --standalone --nproc_per_node=2 -m scripts.chat_eval -- -i sft -x 16

The evaluation itself lives in nanochat/chat_eval.py. Results are kept
per task in the "Chat evaluation <source>" report section: evaluating a subset of the tasks updates those and
keeps the others; a result on a subset of the problems (-x N) is marked "(-x N)" there and in the summary.
ChatCORE is reported when all five tasks have a result from the same checkpoint.
An -a entry that is not one of the five is a mixture spec or a data path (tasks/mixture.py): its conversations
are scored by the assistant-token loss and bits per byte (nanochat.loss_eval.conversation_loss), kept in the
report as "<spec> loss" / "<spec> bpb"; for one of the checkpoint's own training specs, only its held-out share
(tasks.common.split_held_out: about 5%, by content hash, what chat_sft validates on when it has no validation set).
"""

import os
import time

import torch

from nanochat.chat_eval import CHATCORE_TASKS, TASK_NAMES, chatcore, run_chat_eval
from nanochat.checkpoint_manager import SOURCE_DIRS, load_model, resolve_checkpoint
from nanochat.common import (autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             install_error_handler, print0)
from nanochat.config import ConfigError, Option, load_config
from nanochat.engine import Engine
from nanochat.execution import describe_isolation
from nanochat.loss_eval import conversation_loss
from nanochat.report import format_task_results, get_report, task_metrics
from nanochat.tokenizer import get_token_bytes
from tasks.common import split_held_out
from tasks.mixture import MixtureSpecError, build_task, parse_task_spec

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

OPTIONS = [
    Option("source", str, None, "which checkpoint family to load (required)", choices=tuple(SOURCE_DIRS),
           short="i"),
    Option("task_name", str, "|".join(TASK_NAMES), "'|'-separated tasks (default: all five) or mixture specs / data "
                                                   "paths (scored by loss and bits per byte)", short="a"),
    Option("dtype", str, "bfloat16", "autocast dtype (bf16 autocast applies on CUDA only)",
           choices=("float32", "bfloat16"), short="d"),
    Option("temperature", float, 0.0, "sampling temperature (0: greedy)", min=0.0, short="t"),
    Option("max_new_tokens", int, 512, "generation budget per sample", min=1, short="m"),
    Option("num_samples", int, 1, "samples per problem (pass@n)", min=1, short="n"),
    Option("top_k", int, 50, "top-k sampling (0: off)", min=0, short="k"),
    Option("batch_size", int, 8, "batch size for categorical tasks", min=1, short="b"),
    Option("model_tag", str, None, "model tag, e.g. d20 (default: the most recently written; 'largest': the largest "
                                   "d<depth>)", short="g"),
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
        raise ConfigError(f"command line: -i/--source is required: {', '.join(SOURCE_DIRS)} (see --help)")
    entries = [name.strip() for name in config["task_name"].split("|") if name.strip()]
    if not entries:
        raise ConfigError(f"command line -a/--task_name names no task; choose from {'|'.join(TASK_NAMES)} or give a "
                          "mixture spec")
    task_names = [name for name in entries if name in TASK_NAMES]
    data_specs = []  # conversation data scored by loss and bpb
    for name in entries:
        if name not in TASK_NAMES:
            try:
                data_specs.append(parse_task_spec(name))
            except MixtureSpecError as e:
                raise ConfigError(f"command line -a entry {name!r} is neither one of {'|'.join(TASK_NAMES)} nor a "
                                  f"mixture spec ({e})") from None

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
    training_specs = set(meta.get("user_config", {}).get("train_mixture") or [])
    token_bytes = get_token_bytes(device) if data_specs else None
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    render = lambda c: tokenizer.render_conversation(c, max_tokens=model.config.sequence_len + 1)  # noqa: E731
    for spec in data_specs:
        task = build_task(spec)
        held = spec.text in training_specs
        if held:  # the model trained on the rest of it
            task = split_held_out([task])[1][0]
        conversations = [task[i] for i in range(len(task))][:config["max_problems"]]
        with autocast_ctx(device_type, config["dtype"]):
            scores = conversation_loss(model, conversations, render, pad_id, token_bytes, config["batch_size"],
                                       ddp_rank, ddp_world_size)
        results[f"{spec.text} loss"], results[f"{spec.text} bpb"] = scores["loss"], scores["bpb"]
        print0(f"{spec.text}: loss {scores['loss']:.4f} | bpb {scores['bpb']:.4f} | {scores['conversations']:,} "
               f"conversations, {scores['tokens']:,} supervised tokens{' (its held-out share)' if held else ''}")

    if all(name in results for name in CHATCORE_TASKS):
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
        metrics = task_metrics(merged, checkpoint)  # the summary table's cells, kept as data beside the markdown
        same_checkpoint = {merged[n]["checkpoint"] for n in CHATCORE_TASKS if n in merged} == {checkpoint}
        if all(name in merged for name in CHATCORE_TASKS) and same_checkpoint:
            subsets = sorted({merged[n]["max_problems"] for n in CHATCORE_TASKS} - {None})
            note = f"-x {', '.join(map(str, subsets))}" if subsets else None
            score = chatcore({n: merged[n]["value"] for n in CHATCORE_TASKS})
            data.append({"ChatCORE metric": f"{score:.4f}" + (f" ({note})" if note else "")})
            metrics["ChatCORE"] = {"value": score, "note": note}
        report.log(section=section, data=data, duration_s=time.time() - t_start, metrics=metrics)

    # ------------------------------------------------------------------------------------------------------
    # Cleanup

    compute_cleanup()


if __name__ == "__main__":
    main()
