"""
The DCLM CORE metric of the base model, from the eval bundle at <base_dir>/eval_bundle (nanochat's
eval_bundle.zip: core.yaml, eval_meta_data.csv, eval_data/). Without the bundle it says what is missing,
logs that to the report, and exits 0 (the CPU profile has no bundle: the mirror does not carry it).

Launch:
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval               # 8 GPUs (speedrun)
    python -m scripts.base_eval --max_per_task=100                              # 1 GPU, quicker
    python -m scripts.base_eval --max_per_task=20                               # CPU

Writes the "Base model evaluation" report section. Scoring: nanochat/core_eval.py (tests/test_core_eval.py).
"""

import os
import sys

from nanochat.common import (autocast_ctx, autodetect_device_type, compute_cleanup, compute_init, get_base_dir,
                             install_error_handler, print0)
from nanochat.config import Option, load_config
from nanochat.core_eval import evaluate_core, find_eval_bundle
from nanochat.report import get_report

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    Option("device_type", str, "", "cuda|cpu|mps (empty: autodetect)", choices=("", "cuda", "cpu", "mps")),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA: bfloat16|float32", choices=("bfloat16", "float32")),
    Option("max_per_task", int, -1, "examples per task (-1: all)", min=1, disabled=-1),
    Option("model_tag", str, None, "base checkpoint tag (default: most recent; 'largest': largest d<depth>)"),
    Option("step", int, None, "checkpoint step (default: last)", min=0),
]
config = load_config(OPTIONS, description=__doc__)

# -----------------------------------------------------------------------------
# The eval bundle: without it there is nothing to do

base_dir = get_base_dir()
bundle_dir = find_eval_bundle(base_dir)
if bundle_dir is None:
    expected = os.path.join(base_dir, "eval_bundle")
    message = (f"CORE metric skipped: no eval bundle at {expected} (it needs core.yaml, eval_meta_data.csv and "
               f"eval_data/). Get it with: curl -L -o eval_bundle.zip {EVAL_BUNDLE_URL} && "
               f"unzip -q eval_bundle.zip -d {base_dir}")
    print0(message)
    get_report().log(section="Base model evaluation", data=[message])  # a no-op on ranks other than 0
    sys.exit(0)

# -----------------------------------------------------------------------------
# Compute init, model

from nanochat.checkpoint_manager import load_model, resolve_checkpoint  # noqa: E402  (only with a bundle)

device_type = config["device_type"] or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
checkpoint_dir, step = resolve_checkpoint("base", config["model_tag"], config["step"])
model_tag = os.path.basename(checkpoint_dir)  # the report names the model its scores are of
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag, step=step)
print0(f"Loaded base model (step {meta.get('step')}); evaluating CORE from {bundle_dir}")

# -----------------------------------------------------------------------------
# Evaluate

with autocast_ctx(device_type, config["dtype"]):
    out = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=config["max_per_task"])
for label, accuracy in out["results"].items():
    print0(f"{label:<40} accuracy {accuracy:.4f} | centered {out['centered_results'][label]:.4f}")
print0(f"CORE metric: {out['core_metric']:.4f}")

# -----------------------------------------------------------------------------
# Report and cleanup

get_report().log(section="Base model evaluation", data=[
    {"checkpoint": f"base_checkpoints/{model_tag} step {step}", "model_tag": model_tag, "step": step,
     "max_per_task": config["max_per_task"]},
    {f"{label} centered": out["centered_results"][label] for label in out["results"]},
    {"CORE metric": out["core_metric"]},
])
compute_cleanup()
