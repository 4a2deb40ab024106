"""
Speed and accounting helpers for the training step (base_train, mid_train, chat_sft and the benches):

- pad_to_bucket: round a padded batch's length up to a multiple of a bucket size, so a compiled model sees a
  handful of shapes instead of one per batch (the extra positions are padding with target -1: no loss change)
- compile_enabled / compile_model / compiled_graphs: the one `compile` rule of the training scripts,
  torch.compile for fixed shapes, and how many graphs (recompilations) it built
- batch_flops / mfu: a batch's FLOPs at its own length (useful = non-padding positions, or total = all
  positions) and the model FLOPs utilisation they give: the one MFU formula of the project, a fraction
  (printed as a percentage)
- reset_peak_memory / peak_memory_mib: the CUDA allocator's peak (None elsewhere)
- training_memory_bytes / check_memory: a model too large for the device is one line before it is allocated

Tests: tests/test_gpu_path.py.
"""

import torch
import torch.nn.functional as F

from nanochat.common import UserError


def round_up(n, multiple):
    """The smallest multiple of `multiple` that is >= n (n itself when multiple <= 1)."""
    if multiple <= 1:
        return n
    return (n + multiple - 1) // multiple * multiple


def bucketed_length(T, bucket, max_len=None):
    """round_up(T, bucket), capped at max_len when given (but never below T)."""
    new_T = round_up(T, bucket)
    return new_T if max_len is None else max(T, min(new_T, max_len))


def pad_to_bucket(inputs, targets, bucket, pad_id, max_len=None, ignore_index=-1):
    """Pad (B, T) inputs/targets on the right to T' = round_up(T, bucket), capped at max_len (when given;
    max_len is then one more shape). Added inputs are pad_id, added targets ignore_index, so with causal
    attention the loss is unchanged: real positions never attend to later ones and padding has no target.
    bucket <= 1 returns the tensors unchanged."""
    T = inputs.size(1)
    new_T = bucketed_length(T, bucket, max_len)
    if new_T == T:
        return inputs, targets
    extra = new_T - T
    return F.pad(inputs, (0, extra), value=pad_id), F.pad(targets, (0, extra), value=ignore_index)


def compiled_graphs():
    """How many graphs torch.compile has built in this process so far (torch._dynamo's unique_graphs
    counter; 0 when nothing was compiled). A growing count after the first step means recompilations."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def batch_flops(model, inputs, pad_positions):
    """Training FLOPs (fwd+bwd) of one batch, as (total, useful): the model's FLOPs per token at the batch's own
    length T (estimate_flops: its attention term grows with T, so a short padded batch is not counted at the
    checkpoint's sequence_len) times all its positions, and times its non-padding positions."""
    per_token = model.estimate_flops(inputs.size(1))
    return per_token * inputs.numel(), per_token * (inputs.numel() - pad_positions)


def mfu(flops, dt, peak_flops, world_size=1):
    """Fraction of peak FLOPS: `flops` (over all ranks) done in dt seconds on world_size devices of peak_flops
    each; None when the peak is unknown (CPU)."""
    if not peak_flops or dt <= 0:
        return None
    return flops / dt / (peak_flops * world_size)


def reset_peak_memory(device):
    """Start a new peak for peak_memory_mib (CUDA; nothing elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device):
    """Peak CUDA memory allocated on `device` since the last reset, in MiB; None on CPU/MPS."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1024**2


def compile_enabled(option, device_type):
    """The one `compile` rule of the training scripts (base_train, mid_train, chat_sft): the `compile` option
    when it is set (true / false), else (None, the default) on for CUDA and off elsewhere: on CPU and MPS the
    compilation takes longer than it saves on the small models run there."""
    return device_type == "cuda" if option is None else bool(option)


def compile_model(model, num_shapes=1):
    """torch.compile(model, dynamic=False): one specialised graph per input shape (and per grad mode: the
    validation loss under no_grad is one more). Dynamo falls back to eager for a function after
    recompile_limit (8) recompilations, so the limit is raised to cover num_shapes train + eval shapes."""
    import torch._dynamo.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * num_shapes + 2)
    return torch.compile(model, dynamic=False)


def training_memory_bytes(model):
    """A lower bound of the memory training `model` takes (it may live on the meta device): every parameter, its
    gradient and two optimizer buffers (AdamW's moments; Muon keeps one), plus the buffers (the rotary tables)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return 4 * params + buffers


def available_memory_bytes(device):
    """Memory free for allocation on `device`: the GPU's free memory on CUDA, MemAvailable + SwapFree of
    /proc/meminfo on a Linux CPU; None when unknown (MPS, other systems)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
    except (OSError, ValueError):
        return None
    return info.get("MemAvailable", 0) + info.get("SwapFree", 0) if "MemAvailable" in info else None


def check_memory(num_bytes, device, what, fix):
    """UserError (one line, before anything is allocated) when num_bytes cannot fit in the device's available
    memory: a size that would otherwise end in an allocator traceback or the OOM killer."""
    free = available_memory_bytes(device)
    if free is not None and num_bytes > free:
        raise UserError(f"{what} needs at least {num_bytes / 2**30:,.1f} GiB, but {torch.device(device).type} has "
                        f"{free / 2**30:,.1f} GiB available; {fix}")
