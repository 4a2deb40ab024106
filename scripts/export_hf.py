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

import os
import shutil
import tempfile
import time

import torch

from nanochat.checkpoint_manager import SOURCE_DIRS, build_model, resolve_checkpoint
from nanochat.common import UserError, install_error_handler, print0
from nanochat.config import ConfigError, Option, load_config
from nanochat.hf_export import needs_remote_code, write_hf_folder

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    Option("source", str, "sft", "which checkpoints to export", choices=tuple(SOURCE_DIRS), short="i"),
    Option("model_tag", str, None, "model tag, e.g. d20 (default: the most recently written; 'largest': the largest "
                                   "d<depth>)", short="g"),
    Option("step", int, None, "checkpoint step (default: last)", min=0, short="s"),
    Option("out", str, None, "output folder (required; must not exist or be empty)"),
    Option("dtype", str, "bfloat16", "dtype of the exported weights", choices=("bfloat16", "float32")),
    Option("overwrite", bool, False, "replace the contents of an existing --out folder"),
    Option("verify", bool, True, "load the export with transformers and compare logits and tokenization before "
                                 "finishing"),
]
config = load_config(OPTIONS, description=__doc__)
if not config["out"]:
    raise ConfigError("command line: --out is required: the folder to write the export to (see --help)")

out_dir = os.path.abspath(config["out"])
if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"--out {out_dir} is a file, not a folder")
if os.path.isdir(out_dir) and os.listdir(out_dir) and not config["overwrite"]:
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
try:
    checkpoint_dir, step = resolve_checkpoint(config["source"], config["model_tag"], config["step"])
except UserError as e:
    raise UserError(f"{e}: nothing to export for -i {config['source']} (train one, or import a nanochat checkpoint "
                    "with python -m scripts.import_nanochat)") from None
model_tag = os.path.basename(checkpoint_dir)
print0(f"Exporting {checkpoint_dir} step {step} as {config['dtype']}")
model, tokenizer, meta = build_model(checkpoint_dir, step, "cpu", "eval")
dtype = getattr(torch, config["dtype"])
remote_code = needs_remote_code(meta["model_config"])  # 2026 parts: the folder carries its modeling file

# -----------------------------------------------------------------------------
# Write into a temporary folder next to --out

parent = os.path.dirname(out_dir)
os.makedirs(parent, exist_ok=True)
tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(out_dir)}-")
os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the export is an ordinary folder
try:
    write_hf_folder(tmp_dir, model, tokenizer, meta, config["source"], model_tag, step, config["dtype"])

    # -----------------------------------------------------------------------------
    # Check: transformers loads it and computes what this project computes on the same (rounded) weights

    if config["verify"]:
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
