"""
What chat_sft prints and reports: the data figures of the preview and report (from the numbers render_share recorded:
nothing is rendered again), the step lines. Pure functions. Tests: tests/test_sft.py.
"""

import numpy as np

from nanochat.perf import mfu
from nanochat.sft import PACKINGS, Share, plan_epoch, plan_positions


def data_summary(share, settings, seed=0, source=None):
    """Figures of a Share (of its mixture part `source` only, if given): conversations, rendered length mean / p50 /
    p95 / max, supervised ratio (of target positions, after fitting), truncated, dropped, each packing's padding."""
    if source is not None:
        share = Share(*([column[j] for j, s in enumerate(share.sources) if s == source] for column in share))
    figures, tokens = {}, share.tokens or [0]
    for packing in PACKINGS:
        packed = settings._replace(packing=packing)
        positions, pad_positions = plan_positions(plan_epoch(share.lengths, packed, seed), share.lengths, packed)
        figures[f"padding_{packing}"] = pad_positions / max(positions, 1)
    p50, p95 = np.percentile(tokens, [50, 95])
    return {"conversations": len(share.tokens), "tokens_mean": float(np.mean(tokens)), "tokens_p50": float(p50),
            "tokens_p95": float(p95), "tokens_max": max(tokens), "dropped": share.lengths.count(0),
            "supervised_ratio": sum(share.supervised) / max(sum(n - 1 for n in share.lengths if n), 1),
            "truncated": sum(0 < n < t for n, t in zip(share.lengths, share.tokens)), **figures}


def summary_lines(rows):
    """One line per (name, data_summary) of `rows`: the mixture table of the data preview and of the report."""
    width = max((len(name) for name, _ in rows), default=0)
    return [f"{name:<{width}} | {r['conversations']:>7,} conv | tokens mean {r['tokens_mean']:6.1f} p50 "
            f"{r['tokens_p50']:5.0f} p95 {r['tokens_p95']:5.0f} max {r['tokens_max']:6,} | supervised "
            f"{r['supervised_ratio']:5.1%} | truncated {r['truncated']:,} dropped {r['dropped']:,} | padding pad "
            f"{r['padding_pad']:5.1%} bestfit {r['padding_bestfit']:5.1%}" for name, r in rows]


def format_step(step, loss, lrm, step_totals, dt, peak_flops=None, world_size=1, peak_memory=None, graphs=None):
    """chat_sft's step line (the guide's fields, then throughput) and wandb dict from the StepResult totals (all
    ranks) and dt (s); with peak_flops (per device), the MFU of the useful (non-padding) and of all FLOPs."""
    tokens, positions = step_totals["supervised"], max(step_totals["positions"], 1)
    log = {"step": step, "train_loss": loss, "lrm": lrm, "num_tokens": tokens, "supervised_ratio": tokens / positions,
           "padding_fraction": step_totals["pad_positions"] / positions, "tok_per_sec": step_totals["positions"] / dt,
           "examples": step_totals["examples"], "dt": dt}
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
        log["peak_memory_mib"], line = peak_memory, line + f" | peak mem: {peak_memory:,.0f} MiB"
    if graphs is not None:  # its growth: recompilations
        log["compiled_graphs"], line = graphs, line + f" | compiled graphs: {graphs}"
    return line, log


def format_sources(step, names, result, kind="train"):
    """chat_sft's per-source line and wandb dict (kind: "train" or "val"): each source's mean token loss and
    supervised tokens in the step or evaluation (result: StepResult or loss_eval.SFTLoss)."""
    found = [(n, loss / k, k) for n, loss, k in zip(names, result.source_loss, result.source_tokens) if k > 0]
    tokens = "num_tokens" if kind == "train" else f"{kind}_num_tokens"
    log = {**{f"{kind}_loss/{n}": mean for n, mean, _ in found}, **{f"{tokens}/{n}": int(k) for n, _, k in found}}
    line = f"Step {step:05d} | {'by source' if kind == 'train' else 'Validation by source'}: " + " | ".join(
        f"{n} {mean:.4f} ({int(k):,} tok)" for n, mean, k in found)
    return line, log


def format_skip(step, reason, totals):
    """The line and wandb dict of an optimizer step skipped for `reason`; totals: the run's counts so far."""
    line = (f"Step {step:05d} | skipped: {reason} | optimizer step not taken (skipped so far: "
            f"{totals['skipped_nonfinite']} non-finite, {totals['skipped_oom']} out of memory)")
    return line, {"step": step, "skipped_nonfinite": totals["skipped_nonfinite"], "skipped_oom": totals["skipped_oom"]}
