"""
What chat_sft prints and reports about its data and steps: the data preview of `--dry_run 1` (data_summary,
data_preview), the step line (format_step), the report's mixture table and section (report_section), the sample
conversations of the final model and the closing line (format_run_summary). Pure functions of their arguments; the
data figures come from the numbers render_share recorded (nothing is rendered again). Tests: tests/test_sft.py.
"""

import numpy as np

from nanochat.perf import mfu
from nanochat.sft import PACKINGS, Share, padding_fraction, plan_epoch, plan_positions


def share_part(share, source):
    """The conversations of a Share that came from mixture part `source`, as a Share."""
    keep = [j for j, s in enumerate(share.sources) if s == source]
    return Share(*([column[j] for j in keep] for column in share))


def data_summary(share, settings, seed=0):
    """Figures of a Share (a mixture, or a part of one: share_part) from its recorded numbers: conversations, length
    mean / p50 / p95 / max (as rendered), supervised ratio (supervised targets / target positions, after fitting),
    truncated and dropped counts, the padding of the epoch under pad and bestfit (plan_positions, as batched)."""
    padding = {}
    for packing in PACKINGS:
        packed = settings._replace(packing=packing)
        positions, pad_positions = plan_positions(plan_epoch(share.lengths, packed, seed), share.lengths, packed)
        padding[packing] = padding_fraction(pad_positions, positions)
    q = np.percentile(share.tokens, [50, 95]) if share.tokens else [0, 0]
    return {"conversations": len(share.tokens), "tokens_mean": float(np.mean(share.tokens)) if share.tokens else 0.0,
            "tokens_p50": float(q[0]), "tokens_p95": float(q[1]), "tokens_max": max(share.tokens, default=0),
            "supervised_ratio": sum(share.supervised) / max(sum(n - 1 for n in share.lengths if n), 1),
            "truncated": share.outcomes.count("truncated"), "dropped": share.outcomes.count("dropped"),
            "padding_pad": padding["pad"], "padding_bestfit": padding["bestfit"]}


def summary_lines(rows):
    """One line per (name, data_summary) of `rows`: the mixture table of the data preview and of the report."""
    width = max((len(name) for name, _ in rows), default=0)
    return [f"{name:<{width}} | {r['conversations']:>7,} conv | tokens mean {r['tokens_mean']:6.1f} p50 "
            f"{r['tokens_p50']:5.0f} p95 {r['tokens_p95']:5.0f} max {r['tokens_max']:6,} | supervised "
            f"{r['supervised_ratio']:5.1%} | truncated {r['truncated']:,} dropped {r['dropped']:,} | padding pad "
            f"{r['padding_pad']:5.1%} bestfit {r['padding_bestfit']:5.1%}" for name, r in rows]


def data_preview(rows, steps, tokenizer, first, row_capacity, color):
    """The lines of chat_sft's --dry_run: summary_lines(rows), the optimizer steps ({packing: steps}) and the first
    training conversation (first: ids, mask; its first row_capacity tokens) shown by the tokenizer's
    visualize_tokenization (colour, or [supervised] tokens in brackets)."""
    lines = summary_lines(rows)
    lines.append("Optimizer steps: " + ", ".join(f"{n} with packing={p}" for p, n in steps.items()))
    lines.append(f"One training conversation ({'supervised in green' if color else '[supervised] tokens'}):")
    lines.append(tokenizer.visualize_tokenization(first[0][:row_capacity], first[1][:row_capacity], color=color))
    return lines


def sample_conversations(engine, tokenizer, conversations, context, max_tokens=64, num=2):
    """The report's samples: the first `num` conversations whose prompt (without the last assistant turn) leaves
    room for max_tokens new tokens in the model's context (sequence_len; longer ones are skipped, not cut), as
    prompt + greedy answer. Returns report items: a heading that says so, then the samples."""
    samples = []
    for conversation in conversations:
        if len(samples) == num:
            break
        prompt = tokenizer.render_for_completion(conversation)
        if len(prompt) + max_tokens > context:
            continue
        results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        samples.append(f"```\n{tokenizer.decode(prompt)}{tokenizer.decode(results[0][len(prompt):])}\n```")
    return [f"Sample conversations (final model, greedy; validation prompts of at most {context - max_tokens} "
            f"tokens, so that {max_tokens} new ones fit the model's {context} positions):", *samples]


def format_step(step, loss, lrm, step_totals, dt, peak_flops=None, world_size=1, peak_memory=None, graphs=None):
    """chat_sft's step line (the guide's fields, then throughput) and wandb dict, from the step's StepResult totals
    (all ranks) and duration dt (s). With peak_flops (per device): the MFU of the useful (non-padding) and of all
    FLOPs; then, where given, the peak memory (MiB) and the torch.compile graph count (growth = recompilations)."""
    tokens, positions = step_totals["supervised"], step_totals["positions"]
    log = {"step": step, "train_loss": loss, "lrm": lrm, "num_tokens": tokens,
           "supervised_ratio": tokens / max(positions, 1),
           "padding_fraction": padding_fraction(step_totals["pad_positions"], positions),
           "tok_per_sec": positions / dt, "examples": step_totals["examples"], "dt": dt}
    line = (f"Step {step:05d} | Training loss: {loss:.6f} | lrm: {lrm:.6f} | num_tokens: {int(tokens):,} | "
            f"supervised: {log['supervised_ratio']:.1%} | padding: {log['padding_fraction']:.1%} | "
            f"tok/s: {log['tok_per_sec']:,.0f} | sup_tok/s: {tokens / dt:,.0f}")
    if peak_flops:
        log["mfu"] = mfu(step_totals["useful_flops"], dt, peak_flops, world_size)
        log["mfu_total"] = mfu(step_totals["flops"], dt, peak_flops, world_size)
        line += f" | mfu: {100 * log['mfu']:.2f}% useful, {100 * log['mfu_total']:.2f}% total"
    if step_totals["truncated"] or step_totals["dropped"]:
        line += f" | truncated: {int(step_totals['truncated'])} | dropped: {int(step_totals['dropped'])}"
    if peak_memory is not None:
        log["peak_memory_mib"] = peak_memory
        line += f" | peak mem: {peak_memory:,.0f} MiB"
    if graphs is not None:
        log["compiled_graphs"] = graphs
        line += f" | compiled graphs: {graphs}"
    return line, log


def format_sources(step, names, result):
    """chat_sft's per-source line and wandb dict: each source's (training spec's) mean token loss in the step and
    its supervised tokens, from a StepResult (sources without tokens left out). Weighted by the tokens, the losses
    average to the step's loss under loss_normalization = "token"."""
    found = [(n, loss / k, k) for n, loss, k in zip(names, result.source_loss, result.source_tokens) if k > 0]
    log = {**{f"train_loss/{n}": mean for n, mean, _ in found}, **{f"num_tokens/{n}": int(k) for n, _, k in found}}
    line = f"Step {step:05d} | by source: " + " | ".join(f"{n} {mean:.4f} ({int(k):,} tok)" for n, mean, k in found)
    return line, log


def format_skip(step, reason, totals):
    """chat_sft's line and wandb dict for an optimizer step skipped for `reason` (StepResult.skip); totals: the
    run's counts so far, this step included."""
    line = (f"Step {step:05d} | skipped: {reason} | optimizer step not taken (skipped so far: "
            f"{totals['skipped_nonfinite']} non-finite, {totals['skipped_oom']} out of memory)")
    return line, {"step": step, "skipped_nonfinite": totals["skipped_nonfinite"], "skipped_oom": totals["skipped_oom"]}


def report_section(config, train_rows, num_conversations, num_iterations, totals, train_time, final_metrics, samples,
                   peak_flops=None, world_size=1):
    """chat_sft's "Chat SFT" report section: key options, summary_lines(train_rows) (fenced: the report's table
    parser never reads them), the run's counts (totals: all steps and ranks) and figures (supervised ratio, padding,
    tokens/s, with peak_flops the MFU of the useful FLOPs), the final metrics (None left out) and the samples."""
    figures = {"Supervised ratio": totals["supervised"] / max(totals["positions"], 1),
               "Padding fraction": padding_fraction(totals["pad_positions"], totals["positions"]),
               "Tokens per second": round(totals["positions"] / max(train_time, 1e-9))}
    if peak_flops:
        figures["MFU"] = mfu(totals["useful_flops"], train_time, peak_flops, world_size)
    return [
        {k: config[k] for k in ("source", "device_batch_size", "target_examples_per_step", "num_epochs",
                                "init_lr_frac", "loss_normalization", "packing", "max_seq_len")},
        "```\n" + "\n".join(summary_lines(train_rows)) + "\n```",
        {"Training conversations": num_conversations, "Number of iterations": num_iterations,
         "Examples seen": totals["examples"], "Skipped steps (non-finite)": totals["skipped_nonfinite"],
         "Skipped steps (out of memory)": totals["skipped_oom"], "Truncated conversations": totals["truncated"],
         "Dropped conversations": totals["dropped"], "Training time (s)": round(train_time, 1), **figures},
        {k: v for k, v in final_metrics.items() if v is not None},
        f"Train and validation loss are both in the unit of loss_normalization = {config['loss_normalization']}.",
        *samples,
    ]


def format_run_summary(train_time, totals, peak_memory=None, compiled=None, graphs_after_first_step=0):
    """chat_sft's closing line: training time, skipped steps, truncated / dropped conversations, the peak memory
    (if measured) and, compiled (compiled: the graph count now), the recompilations."""
    return (f"Training time: {train_time:.1f}s | skipped steps: {totals['skipped_nonfinite']} non-finite, "
            f"{totals['skipped_oom']} out of memory | truncated: {totals['truncated']} | dropped: {totals['dropped']}"
            + (f" | peak memory: {peak_memory:.0f} MiB" if peak_memory else "")
            + (f" | torch.compile: {compiled} graphs, {compiled - graphs_after_first_step} recompilations after "
               f"the first step" if compiled is not None else ""))
