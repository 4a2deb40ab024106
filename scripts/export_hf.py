"""
Export a checkpoint to a Hugging Face transformers folder (NanoChatForCausalLM, transformers >= 5.0): config.json,
model.safetensors, generation_config.json, tokenizer.json + tokenizer_config.json (fast tokenizer with the chat
template, supervised parts marked with {% generation %}) and a README.md model card. A model with nanochat's 2026
parts gets its own modeling file (modeling_nanochat_gpt.py; load with trust_remote_code=True). Needs the `hf`
extra: pip install -e ".[hf]".

    python -m scripts.export_hf -i sft --out hf/nanochat-d20                    # last SFT checkpoint, bf16
    python -m scripts.export_hf -i base -g d4 -s 1000 --out hf/d4 --dtype float32
    python -m scripts.export_hf -i sft --out hf/nanochat-d20 --overwrite        # replace an earlier export

Then: AutoModelForCausalLM.from_pretrained("hf/nanochat-d20"), vLLM (--model-impl transformers),
lm-evaluation-harness (--model hf), huggingface-cli upload (README "Export to Hugging Face").
The export is written to a temporary folder next to --out, checked (transformers loads it; its fp32 logits
are compared with this project's model on the same weights; the fast tokenizer is compared with the
project's on sample text), and only then moved into place. Runs on CPU. Tests: tests/test_export_hf.py.
"""

import argparse
import os
import shutil
import tempfile
import time

import torch

from nanochat.checkpoint_manager import SOURCE_DIRS, build_model, find_largest_model, find_last_step
from nanochat.common import UserError, get_base_dir, install_error_handler, print0
from nanochat.hf_export import needs_remote_code, write_hf_folder

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

parser = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face transformers folder")
parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"],
                    help="which checkpoints: base|mid|sft|rl")
parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
parser.add_argument("--out", type=str, required=True, help="output folder (must not exist or be empty)")
parser.add_argument("--dtype", type=str, default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype of the exported weights")
parser.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --out folder")
parser.add_argument("--verify", type=int, default=1, choices=[0, 1],
                    help="1: load the export with transformers and compare logits and tokenization before finishing")
args = parser.parse_args()
if args.step is not None and args.step < 0:
    parser.error(f"--step must be >= 0, got {args.step}")

out_dir = os.path.abspath(args.out)
if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"--out {out_dir} is a file, not a folder")
if os.path.isdir(out_dir) and os.listdir(out_dir) and not args.overwrite:
    raise UserError(f"--out {out_dir} is not empty: choose a new folder or pass --overwrite to replace it")

try:
    import tokenizers  # noqa: F401
    import transformers
except ImportError as e:
    raise UserError(f"export_hf needs the optional `hf` extra ({e.name} is not installed): "
                    "pip install -e \".[hf]\"") from None

# -----------------------------------------------------------------------------
# Model and tokenizer

t0 = time.time()
checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[args.source])
try:
    model_tag = args.model_tag or find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    step = args.step if args.step is not None else find_last_step(checkpoint_dir)
except FileNotFoundError as e:
    raise UserError(f"{e}: nothing to export for -i {args.source} (train one, or import a nanochat checkpoint with "
                    "python -m scripts.import_nanochat)") from None
print0(f"Exporting {checkpoint_dir} step {step} as {args.dtype}")
model, tokenizer, meta = build_model(checkpoint_dir, step, "cpu", "eval")
dtype = getattr(torch, args.dtype)
remote_code = needs_remote_code(meta["model_config"])  # 2026 parts: the folder carries its modeling file

# -----------------------------------------------------------------------------
# Write into a temporary folder next to --out

parent = os.path.dirname(out_dir)
os.makedirs(parent, exist_ok=True)
tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(out_dir)}-")
os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the export is an ordinary folder
try:
    write_hf_folder(tmp_dir, model, tokenizer, meta, args.source, model_tag, step, args.dtype)

    # -----------------------------------------------------------------------------
    # Check: transformers loads it and computes what this project computes on the same (rounded) weights

    if args.verify:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=torch.float32,
                                                                     trust_remote_code=remote_code)
        hf_model.eval()
        reference = {k: v.to(dtype).float() for k, v in model.state_dict().items()}  # the exported rounding
        model.float().load_state_dict(reference)
        gen = torch.Generator().manual_seed(0)
        windows = [w for w in model.window_sizes if w is not None]  # long enough for every window to slide
        seq_len = min(max([64] + [w + 17 for w in windows]), meta["model_config"]["sequence_len"])
        ids = torch.randint(0, tokenizer.get_vocab_size(), (2, seq_len), generator=gen)
        with torch.no_grad():
            diff = (hf_model(ids).logits.float() - model(ids)).abs().max().item()
        print0(f"transformers {transformers.__version__}: loaded as {type(hf_model).__name__}; "
               f"max |logit difference| vs this project's model, fp32 on CPU: {diff:.3g}")
        if not diff <= 1e-3:
            raise RuntimeError(f"exported model disagrees with the project's model (max |diff| {diff})")
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_dir, trust_remote_code=remote_code)
        sample = "Hello world! def f(x):\n    return x ** 2  # café 日本語 🙂 12345"
        if hf_tok(sample, add_special_tokens=False)["input_ids"] != tokenizer.encode(sample):
            raise RuntimeError("exported tokenizer encodes sample text differently from the project's tokenizer")
        print0("tokenizer: AutoTokenizer encodes the sample text exactly as the project's tokenizer")

    # -----------------------------------------------------------------------------
    # Move into place

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)  # empty, or --overwrite was given (checked above)
    os.replace(tmp_dir, out_dir)
except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise

size = sum(os.path.getsize(os.path.join(out_dir, name)) for name in os.listdir(out_dir))
print0(f"Wrote {out_dir} ({size / 1e6:.1f} MB: {', '.join(sorted(os.listdir(out_dir)))}) in {time.time() - t0:.1f}s")
