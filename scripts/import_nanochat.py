"""
Import a checkpoint made by nanochat itself (karpathy/nanochat: the October 2025 architecture, e.g. the published
nanochat d32, or the current 2026 one with sliding windows, value embeddings, lambdas, smear and backout) into
this project's formats under $NANOCHAT_BASE_DIR, so that every script here (chat_sft, chat_eval, chat_cli,
chat_web, export_hf) can use it; the architecture travels in the written meta's model_config.

    python -m scripts.import_nanochat ~/nanochat-d32 --phase sft                 # flat folder from the hub
    python -m scripts.import_nanochat ~/.cache/nanochat --phase base --model_tag d20   # a nanochat base dir
    python -m scripts.import_nanochat PATH --phase mid --output_tag mine --step 765 --overwrite 1

PATH is either one folder with model_<step>.pt, meta_<step>.json, tokenizer.pkl (+ token_bytes.pt, optim_<step>.pt
or nanochat 2026's optim_<step>_rank<r>.pt, converted to this project's [AdamW, Muon] state for one process)
or a nanochat base dir (tokenizer/ + base_checkpoints/<tag>/, mid_checkpoints/, chatsft_checkpoints/).
Writes <base_dir>/tokenizer/ (text formats, no pickle) and <base_dir>/<phase dir>/<output_tag or d<depth>>/ at
the same step, with meta `source: "nanochat import"`; prints a summary and the command that fine-tunes it.
Safety: tensors are read with torch.load(weights_only=True), tokenizer.pkl with an unpickler that admits only
tiktoken's Encoding (nanochat/nanochat_import.py). An existing different tokenizer or checkpoint folder is
never replaced unless --overwrite 1. Tests: tests/test_import_nanochat.py.
"""

import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile

import torch

from nanochat.checkpoint_manager import SOURCE_DIRS, find_last_step, load_checkpoint, save_checkpoint
from nanochat.checks import first_nonfinite
from nanochat.common import UserError, get_base_dir, get_git_commit, install_error_handler, print0
from nanochat.config import Option, load_config
from nanochat.folder_lock import LOCK_FILE, lock_output_folder
from nanochat.gpt import GPT, GPTConfig
from nanochat.nanochat_import import (NANOCHAT_CONFIG_KEYS, config_from_nanochat, find_nanochat_checkpoint,
                                      largest_config, nanochat_optimizer_state, old_token_bytes_mismatches, read_meta,
                                      read_tensors, tensor_file_limit, tokenizer_from_pickle, unsupported_config,
                                      unsupported_parts)
from nanochat.runs import default_output_tag, new_run_id, tokenizer_sha256
from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config (PATH may come first without a key: `import_nanochat PATH --phase base`)

OPTIONS = [
    Option("path", str, None, "nanochat checkpoint folder or nanochat base dir (also accepted as the first argument)"),
    Option("phase", str, None, "which training phase the checkpoint is from", choices=("base", "mid", "sft")),
    Option("model_tag", str, None, "in a nanochat base dir: the model tag to import (default: largest d<depth>)"),
    Option("step", int, None, "the step to import (default: the last complete one)", min=0),
    Option("output_tag", str, None, "model tag to write under (default: d<depth>)"),
    Option("optimizer", bool, True, "also import optim_<step>.pt when present"),
    Option("overwrite", bool, False, "replace an existing different tokenizer / checkpoint folder"),
]
argv = sys.argv[1:]
if argv and not argv[0].startswith("-"):
    argv = ["--path", argv[0]] + argv[1:]
config = load_config(OPTIONS, argv=argv, description=__doc__)
if not config["path"]:
    raise UserError("give the nanochat checkpoint folder: python -m scripts.import_nanochat PATH --phase base|mid|sft")
if not config["phase"]:
    raise UserError("--phase is required: base, mid or sft (which nanochat stage made the checkpoint)")
phase = config["phase"]

# -----------------------------------------------------------------------------
# Read the source (nothing is written before every check has passed)

src = find_nanochat_checkpoint(config["path"], phase, config["model_tag"], config["step"])
step = src["step"]
print0(f"Importing {src['model']} (step {step})")
src_meta = read_meta(src["meta"])  # model_config numbers checked: integers within bounds
model_config = src_meta["model_config"]
problems = unsupported_config(model_config)  # the config first: it bounds how much may be read
if problems:
    raise UserError(f"{src['meta']}: this checkpoint's model_config is not one nanochat writes (October 2025 or "
                    f"2026): {'; '.join(problems)}")
state_dict = read_tensors(src["model"], tensor_file_limit(largest_config(model_config)))
if not isinstance(state_dict, dict):
    raise UserError(f"{src['model']}: expected a state dict, found {type(state_dict).__name__}")
state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}  # torch.compile's key prefix
problems = unsupported_parts(state_dict, model_config)
if problems:
    raise UserError(f"{src['model']}: this checkpoint does not fit any model this project can build: "
                    f"{'; '.join(problems)}. nanochat's October 2025 and 2026 layouts import (gpt.GPTConfig)")
config_obj = config_from_nanochat(state_dict, model_config)
bad = first_nonfinite(state_dict.items())
if bad is not None:
    raise UserError(f"{src['model']}: parameter '{bad}' holds NaN/inf; nothing was imported (pick a good step)")
tokenizer = tokenizer_from_pickle(src["tokenizer_pkl"])
if tokenizer.get_vocab_size() > config_obj.vocab_size:
    raise UserError(f"{src['tokenizer_pkl']}: tokenizer vocab {tokenizer.get_vocab_size()} is larger than the "
                    f"model's vocab_size {config_obj.vocab_size} in {src['meta']}: they are not from the same run")
token_bytes = compute_token_bytes(tokenizer)
optim_data = None
optim_limit = tensor_file_limit(config_obj, copies=4)  # moments + momentum buffers (+ a second moment)
if src["optim_ranks"] and config["optimizer"]:  # nanochat 2026: MuonAdamW, one file per rank
    with torch.device("meta"):
        meta_model = GPT(config_obj)
    optim_data = nanochat_optimizer_state([read_tensors(p, optim_limit) for p in src["optim_ranks"]], meta_model,
                                          meta_model.setup_optimizers(), src["optim_ranks"][0])
elif src["optim"] and config["optimizer"]:
    optim_data = read_tensors(src["optim"], optim_limit)
sha = hashlib.sha256()  # identifies the source, so that re-running the same import is a no-op
with open(src["model"], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        sha.update(chunk)
source_sha256 = sha.hexdigest()

# -----------------------------------------------------------------------------
# Where it goes, and the overwrite rules

base_dir = get_base_dir()
tokenizer_dir = os.path.join(base_dir, "tokenizer")
output_tag = default_output_tag(config["output_tag"], model_config)  # a folder name, never a path
checkpoints_dir = os.path.join(base_dir, SOURCE_DIRS[phase])
checkpoint_dir = os.path.join(checkpoints_dir, output_tag)
if os.path.realpath(checkpoint_dir) == os.path.realpath(src["checkpoint_dir"]):
    raise UserError(f"{checkpoint_dir} is the folder being imported; point NANOCHAT_BASE_DIR at another folder")

write_tokenizer = True
if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
    try:
        existing = RustBPETokenizer.from_directory(tokenizer_dir)
        same = (existing.enc._mergeable_ranks == tokenizer.enc._mergeable_ranks
                and existing.enc._pat_str == tokenizer.enc._pat_str
                and existing._special_ids == tokenizer._special_ids)
    except Exception:  # an unreadable tokenizer is "different"
        same = False
    if same:
        write_tokenizer = False
        print0(f"{tokenizer_dir} already holds this tokenizer: kept")
    elif not config["overwrite"]:
        raise UserError(f"{tokenizer_dir} holds a different tokenizer; every checkpoint of this base dir uses it. "
                        "Import into a fresh NANOCHAT_BASE_DIR, or pass --overwrite 1 to replace it")

lock_output_folder(checkpoint_dir)  # no training run may be writing there while it is replaced
write_checkpoint = True
if any(name != LOCK_FILE for name in os.listdir(checkpoint_dir)):
    try:
        _, _, old_meta = load_checkpoint(checkpoint_dir, find_last_step(checkpoint_dir), "cpu")
        old_source = old_meta.get("import", {}).get("source_sha256")
    except Exception:
        old_source = None
    if old_source == source_sha256 and not write_tokenizer:
        write_checkpoint = False
        print0(f"{checkpoint_dir} already holds this import: kept")
    elif not config["overwrite"]:
        raise UserError(f"{checkpoint_dir} already exists and holds another checkpoint; choose another "
                        "--output_tag, or pass --overwrite 1 to replace that folder")

# -----------------------------------------------------------------------------
# Write, after every check has passed: both parts are staged in temp folders beside their targets, then the
# checkpoint folder is swapped in and, last, the tokenizer files replaced (each file atomically), so a failure
# before this point changes nothing and the old tokenizer never meets a missing checkpoint

staging = tempfile.mkdtemp(prefix=".import-", dir=base_dir)
if write_tokenizer:
    tokenizer.save(os.path.join(staging, "tokenizer"))  # ranks + json + token_bytes.npy from the raw token bytes
new_tokenizer_sha = tokenizer_sha256(os.path.join(staging, "tokenizer") if write_tokenizer else tokenizer_dir)
if write_checkpoint:
    metrics = {k: v for k, v in src_meta.items() if isinstance(v, (int, float)) and k != "step"}
    meta = {
        "step": step,
        "model_config": dataclasses.asdict(config_obj),
        "source": "nanochat import",
        "phase": phase,
        "run_id": new_run_id(),  # this import owns its output folder, as a training run would
        "run_name": "nanochat import",
        "tokenizer_sha256": new_tokenizer_sha,  # ties the checkpoint to the tokenizer written below
        "user_config": src_meta.get("user_config", {}),
        "metrics": metrics,
        "git_commit": get_git_commit(),
        "import": {"path": os.path.abspath(src["model"]), "source_sha256": source_sha256,
                   "nanochat_meta": src_meta},
    }
    staged_checkpoint = tempfile.mkdtemp(prefix=f".import-{output_tag}-", dir=checkpoints_dir)
    save_checkpoint(staged_checkpoint, step, state_dict, optim_data, meta)
    replaced = tempfile.mkdtemp(prefix=f".replaced-{output_tag}-", dir=checkpoints_dir)
    os.rename(checkpoint_dir, os.path.join(replaced, output_tag))  # --overwrite 1 was given (checked above)
    os.rename(staged_checkpoint, checkpoint_dir)
    shutil.rmtree(replaced)
if write_tokenizer:
    replacing = os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json"))
    os.makedirs(tokenizer_dir, exist_ok=True)
    for name in sorted(os.listdir(os.path.join(staging, "tokenizer"))):
        os.replace(os.path.join(staging, "tokenizer", name), os.path.join(tokenizer_dir, name))
    print0(f"Wrote the tokenizer to {tokenizer_dir}" + (" (replaced: --overwrite 1; other checkpoints of this base "
                                                      "dir were made with the old one)" if replacing else ""))
shutil.rmtree(staging)
if src["token_bytes"]:
    mismatches = old_token_bytes_mismatches(src["token_bytes"], token_bytes)
    if mismatches:
        print0(f"note: nanochat's token_bytes.pt differs at {len(mismatches)} ids (older nanochat counted tokens that "
               "are not valid UTF-8 alone, e.g. bytes 128-255, as 3 bytes); recomputed from the raw bytes")

# -----------------------------------------------------------------------------
# Summary and what to run next

with torch.device("meta"):
    num_params = GPT(config_obj).num_params()
print0("")
print0(f"Imported nanochat {phase} checkpoint: depth {config_obj.n_layer}, width {config_obj.n_embd}, "
       f"heads {config_obj.n_head} (kv heads {config_obj.n_kv_head}), vocab {config_obj.vocab_size}, "
       f"parameters {num_params:,}, step {step}, sequence_len {config_obj.sequence_len}")
if config_obj != GPTConfig(**{k: getattr(config_obj, k) for k in NANOCHAT_CONFIG_KEYS}):  # not October's
    parts = {k: v for k, v in vars(config_obj).items() if k not in NANOCHAT_CONFIG_KEYS}
    print0(f"  architecture: nanochat 2026 ({', '.join(f'{k}={v}' for k, v in parts.items())})")
print0(f"  checkpoint: {checkpoint_dir}" + (" (with optimizer state)" if optim_data is not None else ""))
print0(f"  tokenizer:  {tokenizer_dir}")
if phase in ("base", "mid"):
    print0("Fine-tune it:")
    print0(f"  python -m scripts.chat_sft --source={phase} --model_tag={output_tag} --step={step}")
else:
    print0("Chat with it / evaluate it (chat_sft starts from base or mid checkpoints):")
    print0(f"  python -m scripts.chat_cli -i sft -g {output_tag} -s {step}")
    print0(f"  python -m scripts.chat_eval -i sft -g {output_tag} -s {step}")
