"""
What chat_sft prints and reports about its data and steps: the data preview of `--dry_run 1` (data_summary,
padding_fractions, data_preview), the step line (format_step), the report's mixture table and section
(report_section), the sample conversations of the final model and the closing line (format_run_summary).
Pure functions of their arguments. Tests: tests/test_sft.py.
"""

import numpy as np

from nanochat.perf import mfu
from nanochat.sft import best_fit_batches, fit_conversation, padding_fraction


def padding_fractions(lengths, batch_size, row_capacity, lookahead=2.0):
    """Fraction of input positions that are padding when conversations of these lengths (fitted, in reading
    order) are batched: (under "pad", under "bestfit"), as sft_batches builds the batches."""
    if not lengths:
        return 0.0, 0.0
    positions = real = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        positions += len(chunk) * (max(chunk) - 1)
        real += sum(n - 1 for n in chunk)
    pad = padding_fraction(positions - real, positions)
    T, items = row_capacity - 1, iter(lengths)
    bf_positions = bf_real = 0
    for rows, _ in best_fit_batches(lambda: next(items), lambda n: n, [], batch_size, row_capacity, lookahead):
        bf_positions += batch_size * T
        bf_real += sum(min(sum(row), T) for row in rows)
    return pad, padding_fraction(bf_positions - bf_real, bf_positions)


def data_summary(conversations, render_fn, row_capacity, drop_long, batch_size):
    """Figures of one task or mixture (any sequence of conversations): conversations, token length mean / p50 /
    p95 / max (as rendered, before fitting), supervised ratio (supervised targets / target positions, after
    fitting), truncated and dropped counts (fit_conversation) and the padding fraction under pad and bestfit."""
    lengths, fitted, counts = [], [], {"kept": 0, "truncated": 0, "dropped": 0}
    supervised = targets = 0
    for conversation in conversations:
        ids, mask = render_fn(conversation)
        lengths.append(len(ids))
        ids, mask, outcome = fit_conversation(ids, mask, row_capacity, drop_long)
        counts[outcome] += 1
        if ids is not None:
            fitted.append(len(ids))
            supervised += sum(mask[1:])
            targets += len(ids) - 1
    pad, bestfit = padding_fractions(fitted, batch_size, row_capacity)
    q = np.percentile(lengths, [50, 95]) if lengths else [0, 0]
    return {"conversations": len(lengths), "tokens_mean": float(np.mean(lengths)) if lengths else 0.0,
            "tokens_p50": float(q[0]), "tokens_p95": float(q[1]), "tokens_max": max(lengths, default=0),
            "supervised_ratio": supervised / max(targets, 1), "truncated": counts["truncated"],
            "dropped": counts["dropped"], "padding_pad": pad, "padding_bestfit": bestfit}


def format_data_summary(name, row, width=0):
    return (f"{name:<{width}} | {row['conversations']:>7,} conv | tokens mean {row['tokens_mean']:6.1f} p50 "
            f"{row['tokens_p50']:5.0f} p95 {row['tokens_p95']:5.0f} max {row['tokens_max']:6,} | supervised "
            f"{row['supervised_ratio']:5.1%} | truncated {row['truncated']:,} dropped {row['dropped']:,} | padding "
            f"pad {row['padding_pad']:5.1%} bestfit {row['padding_bestfit']:5.1%}")


def data_preview(train_rows, train_ds, val_ds, summarize, steps, tokenizer, render_fn, row_capacity, color):
    """The lines of chat_sft's --dry_run: one per training spec (train_rows: [(spec, entries in the
    mixture, data_summary)]), the training mixture and the validation mixture as a whole (summarize: a
    sequence -> data_summary), the optimizer steps ({packing: steps}) and the first training conversation
    (render_fn -> ids, mask; its first row_capacity tokens) shown by the tokenizer's visualize_tokenization
    (colour, or [supervised] tokens in brackets)."""
    rows = [(f"{spec} x{entries:,}", row) for spec, entries, row in train_rows]
    rows += [("training mixture", summarize(train_ds)), ("validation mixture", summarize(val_ds))]
    width = max(len(name) for name, _ in rows)
    lines = [format_data_summary(name, row, width) for name, row in rows]
    lines.append("Optimizer steps: " + ", ".join(f"{n} with packing={p}" for p, n in steps.items()))
    ids, mask = render_fn(train_ds[0])
    lines.append(f"One training conversation ({'supervised in green' if color else '[supervised] tokens'}):")
    lines.append(tokenizer.visualize_tokenization(ids[:row_capacity], mask[:row_capacity], color=color))
    return lines


def sample_conversations(engine, tokenizer, conversations, max_tokens=64):
    """Each conversation's prompt (without its last assistant turn) and the model's greedy answer, as text."""
    samples = []
    for conversation in conversations:
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        samples.append(tokenizer.decode(prompt) + tokenizer.decode(results[0][len(prompt):]))
    return samples


def format_step(step, loss, lrm, step_totals, dt, peak_flops=None, world_size=1, peak_memory=None, graphs=None):
    """chat_sft's step line (the guide's first fields, then throughput) and its wandb dict, from the step's
    StepResult totals (summed over ranks) and its duration dt in seconds. With peak_flops (per device): the MFU
    of the useful (non-padding) positions' FLOPs and of all the FLOPs computed; then the peak memory in MiB and
    the torch.compile graph count (growing after the first step = recompilations), where given."""
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


def format_skip(step, reason, totals):
    """chat_sft's line and wandb dict for an optimizer step skipped for `reason` (StepResult.skip); totals: the
    run's counts so far, this step included."""
    line = (f"Step {step:05d} | skipped: {reason} | optimizer step not taken (skipped so far: "
            f"{totals['skipped_nonfinite']} non-finite, {totals['skipped_oom']} out of memory)")
    return line, {"step": step, "skipped_nonfinite": totals["skipped_nonfinite"], "skipped_oom": totals["skipped_oom"]}


def report_mixture_table(train_rows):
    """The report's training-mixture table (a fenced text block, so the report's summary-table parser never
    reads it): per spec, its entries in the mixture (after weights and repeats), supervised ratio and padding
    fraction under pad / bestfit."""
    width = max([len("training mixture")] + [len(spec) for spec, _, _ in train_rows])
    lines = [f"{'training mixture':<{width}}  entries  supervised  padding(pad)  padding(bestfit)"]
    lines += [f"{spec:<{width}}  {entries:>7,}  {row['supervised_ratio']:>10.1%}  {row['padding_pad']:>12.1%}  "
              f"{row['padding_bestfit']:>16.1%}" for spec, entries, row in train_rows]
    return "```\n" + "\n".join(lines) + "\n```"


def report_section(config, train_rows, num_conversations, num_iterations, totals, train_time, final_metrics, samples,
                   peak_flops=None, world_size=1):
    """The data of chat_sft's "Chat SFT" report section: the key options, the training-mixture table
    (report_mixture_table), the run's counts (totals: summed over the run and the ranks) and figures (supervised
    ratio, padding fraction, tokens/s, and with peak_flops the MFU of the useful, non-padding, FLOPs), the
    final metrics (None values left out) and the sample conversations of the final model."""
    figures = {"Supervised ratio": totals["supervised"] / max(totals["positions"], 1),
               "Padding fraction": padding_fraction(totals["pad_positions"], totals["positions"]),
               "Tokens per second": round(totals["positions"] / max(train_time, 1e-9))}
    if peak_flops:
        figures["MFU"] = mfu(totals["useful_flops"], train_time, peak_flops, world_size)
    return [
        {k: config[k] for k in ("source", "device_batch_size", "target_examples_per_step", "num_epochs",
                                "init_lr_frac", "loss_normalization", "packing", "max_seq_len")},
        report_mixture_table(train_rows),
        {"Training conversations": num_conversations, "Number of iterations": num_iterations,
         "Examples seen": totals["examples"], "Skipped steps (non-finite)": totals["skipped_nonfinite"],
         "Skipped steps (out of memory)": totals["skipped_oom"], "Truncated conversations": totals["truncated"],
         "Dropped conversations": totals["dropped"], "Training time (s)": round(train_time, 1), **figures},
        {k: v for k, v in final_metrics.items() if v is not None},
        f"Train and validation loss are both in the unit of loss_normalization = {config['loss_normalization']}.",
        "Sample conversations (final model, greedy):", *[f"```\n{sample}\n```" for sample in samples],
    ]


def format_run_summary(train_time, totals, peak_memory=None, compiled=None, graphs_after_first_step=0):
    """chat_sft's closing line: training time, skipped steps, truncated / dropped conversations, the peak memory
    (if measured) and, for a compiled model (compiled: its graph count now), the recompilations."""
    return (f"Training time: {train_time:.1f}s | skipped steps: {totals['skipped_nonfinite']} non-finite, "
            f"{totals['skipped_oom']} out of memory | truncated: {totals['truncated']} | dropped: {totals['dropped']}"
            + (f" | peak memory: {peak_memory:.0f} MiB" if peak_memory else "")
            + (f" | torch.compile: {compiled} graphs, {compiled - graphs_after_first_step} recompilations after "
               f"the first step" if compiled is not None else ""))
