"""
Reading checkpoints made by nanochat itself (karpathy/nanochat: the October 2025 architecture, and the current
one of 2026 with sliding windows, value embeddings, lambdas, smear and backout) so that
scripts/import_nanochat.py can write them in this project's formats (about 480 lines: the safe readers, the
tokenizer unpickler and both layouts' mappings, optimizer state included, are one concern).

nanochat's files: `model_<step>.pt` (torch.save'd state dict), `meta_<step>.json` (step, model_config,
user_config, metrics such as val_bpb), the optimizer state (`optim_<step>.pt`: October, rank 0's list of
[AdamW, Muon] state dicts; `optim_<step>_rank<r>.pt`: 2026, one MuonAdamW state dict per rank, converted here
by nanochat_optimizer_state), `tokenizer.pkl` (a pickled tiktoken Encoding) and `token_bytes.pt`.
Which 2026 parts a checkpoint has is read from its weights' names (value_embeds.*, resid_lambdas, smear_gate,
backout_lambda), its padded vocabulary from the embedding's rows and its windows from meta's window_pattern.
The files sit either in one flat folder (as published on the hub) or in a nanochat base dir (`tokenizer/` + `base_checkpoints/<tag>/`, `mid_checkpoints/`, `chatsft_checkpoints/`).

Nothing here executes code from the files: tensors are read with torch.load(weights_only=True) and the
tokenizer pickle with a restricted unpickler that only admits tiktoken's Encoding class, which it replaces by
an inert stand-in (pickle.find_class is the only way a pickle can reach a callable).

Tests: .venv/bin/python -m pytest tests/test_import_nanochat.py
"""

import glob
import io
import json
import math
import os
import pickle
import re
import stat

import torch

from nanochat.checkpoint_manager import torch_error_summary
from nanochat.common import UserError
from nanochat.gpt import ARCH_PRESETS, GPT, GPTConfig, config_problem

# nanochat's phase folders (the same names as this project's SOURCE_DIRS)
PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints"}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # published models keep wte in bf16


# Bounds on what an import reads: files are regular files under a size limit (never /dev/zero, a FIFO or a
# 100 GB file read whole); model_config numbers are integers in these inclusive ranges (nanochat d32: sequence_len
# 2048, n_layer 32, n_embd 2048, vocab 65536).
MAX_META_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 256 << 20
MODEL_CONFIG_BOUNDS = {"sequence_len": (1, 1 << 20), "vocab_size": (1, 1 << 21), "n_layer": (1, 1024),
                       "n_head": (1, 1024), "n_kv_head": (1, 1024), "n_embd": (1, 1 << 16)}


def check_regular_file(path, max_bytes, what):
    """UserError unless `path` is a regular file (not a device, FIFO or folder) of at most max_bytes. -> size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {path} is not a regular file (a device, FIFO or folder); give the checkpoint's files")
    if st.st_size > max_bytes:
        raise UserError(f"{what} {path} is {st.st_size:,} bytes, more than the {max_bytes:,} a {what} of this model "
                        f"can take; it is not the file of this checkpoint")
    return st.st_size


def read_limited(path, max_bytes, what):
    """The bytes of a regular file of at most max_bytes (checked on the open file, so a swap after the check is
    caught too)."""
    check_regular_file(path, max_bytes, what)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{what} {path} grew past {max_bytes:,} bytes while being read")
    return data


def check_model_config(model_config, path):
    """The model_config of a nanochat meta file as a dict of ints, each an integer (not 2.7, not Infinity, not a
    string) within MODEL_CONFIG_BOUNDS, with heads that divide the width: a UserError naming the key otherwise."""
    config = {}
    for key, value in model_config.items():
        if key not in MODEL_CONFIG_BOUNDS:
            config[key] = value  # unsupported_parts names unknown keys
            continue
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # 2.0 is 2; 2.7, inf and nan are not integers
        low, high = MODEL_CONFIG_BOUNDS[key]
        if type(value) is not int or not low <= value <= high:
            raise UserError(f"{path}: model_config {key} = {value!r} must be an integer from {low} to {high}")
        config[key] = value
    if all(k in config for k in MODEL_CONFIG_BOUNDS):
        if config["n_embd"] % config["n_head"] or (config["n_embd"] // config["n_head"]) % 2 \
                or config["n_head"] % config["n_kv_head"]:
            raise UserError(f"{path}: model_config n_embd {config['n_embd']}, n_head {config['n_head']}, n_kv_head "
                            f"{config['n_kv_head']} do not fit (n_embd a multiple of n_head with an even head size, "
                            f"n_head a multiple of n_kv_head)")
    return config


# ---------------------------------------------------------------------------------------------------------
# the tokenizer pickle

class _PickledEncoding:
    """Inert stand-in for tiktoken.core.Encoding while unpickling: it only records the state that pickle
    hands to __setstate__ (tiktoken's own __setstate__ would run Encoding.__init__, or, for a state that is a
    string, fetch a registered encoding from the network)."""

    def __setstate__(self, state):
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    ALLOWED = {("tiktoken.core", "Encoding"): _PickledEncoding}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_tiktoken_pickle(path):
    """-> dict(name, pat_str, mergeable_ranks {bytes: int}, special_tokens {str: int}) from a pickled tiktoken
    Encoding (nanochat's tokenizer.pkl). Anything else (another global, which is how a malicious pickle runs
    code, or a state of the wrong shape) raises UserError before any of it is called."""
    data = read_limited(path, MAX_TOKENIZER_BYTES, "tokenizer pickle")
    try:
        obj = _EncodingUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load this tokenizer pickle ({e}): only a pickled tiktoken Encoding "
                        "is accepted, and nothing else in it is ever called; re-create the file with nanochat's "
                        "tok_train if you do not trust where it came from") from None
    except Exception as e:  # truncated or garbage bytes
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    state = getattr(obj, "state", None) if isinstance(obj, _PickledEncoding) else None
    problem = _encoding_state_problem(state)
    if problem:
        raise UserError(f"{path}: not a pickled tiktoken Encoding as nanochat writes it ({problem})")
    return {k: state[k] for k in ("name", "pat_str", "mergeable_ranks", "special_tokens")}


def _encoding_state_problem(state):
    """None if `state` is the dict tiktoken's Encoding.__getstate__ returns, else what is wrong with it."""
    if isinstance(state, str):
        return f"it refers to the registered encoding {state!r} instead of carrying its own ranks"
    if not isinstance(state, dict):
        return f"expected an Encoding, found {type(state).__name__}"
    missing = [k for k in ("name", "pat_str", "mergeable_ranks", "special_tokens") if k not in state]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(state["name"], str) or not isinstance(state["pat_str"], str):
        return "name / pat_str are not strings"
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not isinstance(ranks, dict) or not all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items()):
        return "mergeable_ranks is not a {bytes: int} dict"
    if not isinstance(specials, dict) or not all(isinstance(k, str) and type(v) is int for k, v in specials.items()):
        return "special_tokens is not a {str: int} dict"
    if sorted(ranks.values()) != list(range(len(ranks))):
        return "ranks are not 0..n-1"
    ids = sorted(specials.values())
    if len(set(ids)) != len(ids) or (ids and ids[0] < len(ranks)):
        return f"special token ids {ids} collide with each other or with the {len(ranks)} ranks"
    return None


def tokenizer_from_pickle(path):
    """A RustBPETokenizer equal to the pickled nanochat tokenizer (same ranks, pattern and special ids)."""
    from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

    state = load_tiktoken_pickle(path)
    missing = [s for s in SPECIAL_TOKENS if s not in state["special_tokens"]]
    if missing:
        raise UserError(f"{path}: the tokenizer lacks nanochat's special tokens {', '.join(missing)}")
    try:
        return RustBPETokenizer.from_ranks(state["mergeable_ranks"], state["pat_str"], state["special_tokens"])
    except ValueError as e:  # tiktoken's regex compiler: a pat_str it cannot parse
        raise UserError(f"{path}: the tokenizer's pat_str {state['pat_str'][:80]!r} is not a valid pattern "
                        f"({' '.join(str(e).split())[:120]})") from None


def old_token_bytes_mismatches(token_bytes_path, token_bytes):
    """Ids where nanochat's saved token_bytes.pt differs from the recomputed byte lengths (None if unreadable).
    nanochat's older tok_train counted len(decode([id]).encode('utf-8')): a token that is not valid UTF-8 on
    its own (the single bytes 128-255, pieces of multi-byte characters) decodes to U+FFFD and was counted as
    3 bytes, which skews bits-per-byte; this project recomputes the lengths from the raw token bytes."""
    try:
        check_regular_file(token_bytes_path, MAX_TOKENIZER_BYTES, "token_bytes file")
        old = torch.load(token_bytes_path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (only a note depends on it)
        return None
    if not isinstance(old, torch.Tensor) or old.shape != token_bytes.shape:
        return None
    return torch.nonzero(old.to(torch.int64) != token_bytes.to(torch.int64)).flatten().tolist()


# ---------------------------------------------------------------------------------------------------------
# locating and reading the checkpoint

def _steps(folder, prefix):
    steps = set()
    for path in glob.glob(os.path.join(folder, f"{prefix}_*")):
        m = re.fullmatch(prefix + r"_(\d+)\.(pt|json)", os.path.basename(path))
        if m:
            steps.add(int(m.group(1)))
    return steps


def _rank_files(checkpoint_dir, step):
    """optim_<step>_rank0.pt, _rank1, ... as long as they are consecutive from rank 0."""
    files = []
    while os.path.exists(p := os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{len(files)}.pt")):
        files.append(p)
    return files


def find_nanochat_checkpoint(path, phase, model_tag=None, step=None):
    """Locate the files of one nanochat checkpoint. `path` is a flat folder (model_*.pt, meta_*.json,
    tokenizer.pkl, ...) or a nanochat base dir (tokenizer/tokenizer.pkl and <phase dir>/<tag>/).
    -> dict(checkpoint_dir, step, model, meta, optim or None, optim_ranks (nanochat 2026's per-rank files,
    rank 0 first; [] if none), tokenizer_pkl, token_bytes or None)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such folder (give a nanochat checkpoint folder or a nanochat base dir)")
    if os.path.exists(os.path.join(path, "tokenizer.pkl")) and _steps(path, "model"):
        checkpoint_dir, tokenizer_dir = path, path
    elif os.path.exists(os.path.join(path, "tokenizer", "tokenizer.pkl")):
        tokenizer_dir = os.path.join(path, "tokenizer")
        phase_dir = os.path.join(path, PHASE_DIRS[phase])
        tags = sorted(t for t in os.listdir(phase_dir) if os.path.isdir(os.path.join(phase_dir, t))) \
            if os.path.isdir(phase_dir) else []
        if not tags:
            raise UserError(f"{path} looks like a nanochat base dir but has no {PHASE_DIRS[phase]}/<tag>/ folder "
                            f"for --phase {phase}")
        if model_tag is None:
            depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
            model_tag = max(depths)[1] if depths else tags[-1]
        elif model_tag not in tags:
            raise UserError(f"--model_tag {model_tag}: no {os.path.join(phase_dir, model_tag)} (found: {', '.join(tags)})")
        checkpoint_dir = os.path.join(phase_dir, model_tag)
    else:
        raise UserError(f"{path}: expected nanochat files here: either model_<step>.pt + meta_<step>.json + "
                        "tokenizer.pkl in one folder, or a nanochat base dir with tokenizer/tokenizer.pkl and "
                        f"{PHASE_DIRS[phase]}/<tag>/")
    complete = _steps(checkpoint_dir, "model") & _steps(checkpoint_dir, "meta")
    if not complete:
        raise UserError(f"{checkpoint_dir}: no step with both model_<step>.pt and meta_<step>.json")
    if step is None:
        step = max(complete)
    elif step not in complete:
        raise UserError(f"--step {step}: no model_{step:06d}.pt + meta_{step:06d}.json in {checkpoint_dir} "
                        f"(steps found: {', '.join(str(s) for s in sorted(complete))})")

    def existing(p):
        return p if os.path.exists(p) else None

    return {
        "checkpoint_dir": checkpoint_dir,
        "step": step,
        "model": os.path.join(checkpoint_dir, f"model_{step:06d}.pt"),
        "meta": os.path.join(checkpoint_dir, f"meta_{step:06d}.json"),
        "optim": existing(os.path.join(checkpoint_dir, f"optim_{step:06d}.pt")),
        "optim_ranks": _rank_files(checkpoint_dir, step),
        "tokenizer_pkl": os.path.join(tokenizer_dir, "tokenizer.pkl"),
        "token_bytes": existing(os.path.join(tokenizer_dir, "token_bytes.pt")),
    }


def read_meta(path):
    """nanochat's meta JSON, its model_config checked (check_model_config: integers within bounds)."""
    data = read_limited(path, MAX_META_BYTES, "meta file")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot read the checkpoint metadata ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise UserError(f"{path}: no 'model_config' object in the checkpoint metadata")
    meta["model_config"] = check_model_config(meta["model_config"], path)
    return meta


def tensor_file_limit(config, copies=1):
    """Most bytes a torch file holding `copies` fp32 copies of the parameters of GPT(config) can take (plus room for
    the pickle's bookkeeping): a larger file is not this model's."""
    with torch.device("meta"):
        num_params = GPT(config).num_params()
    return copies * 4 * num_params + (64 << 20)


def read_tensors(path, max_bytes):
    """torch.load(weights_only=True) of a regular file of at most max_bytes: plain tensors and containers only,
    never code."""
    check_regular_file(path, max_bytes, "torch file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any parse failure: the file is not what we can import)
        raise UserError(f"{path}: cannot load it as a torch checkpoint of plain tensors "
                        f"({torch_error_summary(e)})") from None


def _pattern(key):
    return re.sub(r"\.\d+\.", ".*.", key)  # h.0.attn.c_q.weight and h.1... list once as h.*.attn...


NANOCHAT_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # every version
NANOCHAT_2026_KEYS = ("window_pattern",)  # meta model_config keys of the 2026 code


def config_from_nanochat(state_dict, model_config):
    """The GPTConfig of a nanochat checkpoint: sizes from meta, the 2026 parts from the weights present. The
    q/k scale (1.2) and rotary base (100000) are not in nanochat's files: they are taken as nanochat's current
    values whenever the checkpoint is of the 2026 code (window_pattern in meta or any 2026 weight), else the
    October ones. Raises KeyError/ValueError/TypeError on meta values that are not ints/strings."""
    cfg = {k: int(model_config[k]) for k in NANOCHAT_CONFIG_KEYS}
    parts = {
        "value_embeds": any(k.startswith("value_embeds.") for k in state_dict),
        "lambdas": "resid_lambdas" in state_dict or "x0_lambdas" in state_dict,
        "smear": "smear_gate.weight" in state_dict or "smear_lambda" in state_dict,
        "backout": "backout_lambda" in state_dict,
    }
    if "window_pattern" in model_config:
        if not isinstance(model_config["window_pattern"], str):
            raise TypeError(f"window_pattern {model_config['window_pattern']!r} is not a string")
        parts["window_pattern"] = model_config["window_pattern"]
    if "window_pattern" in model_config or any(parts.values()):
        preset = ARCH_PRESETS["nanochat-2026"]
        parts.update(qk_scale=preset["qk_scale"], rotary_base=preset["rotary_base"])
    wte = state_dict.get("transformer.wte.weight")
    if isinstance(wte, torch.Tensor) and wte.dim() == 2 and wte.size(0) != cfg["vocab_size"]:
        parts["pad_vocab_to"] = ARCH_PRESETS["nanochat-2026"]["pad_vocab_to"]  # nanochat pads to 64 since 2026
    return GPTConfig(**cfg, **parts)


def largest_config(model_config):
    """The GPTConfig with every 2026 part that nanochat's meta sizes can describe: its parameter count bounds how
    large the checkpoint's files may be (tensor_file_limit) before they are read."""
    sizes = {k: int(model_config[k]) for k in NANOCHAT_CONFIG_KEYS}
    return GPTConfig(**sizes, value_embeds=True, lambdas=True, smear=True, backout=True,
                     pad_vocab_to=ARCH_PRESETS["nanochat-2026"]["pad_vocab_to"])


def unsupported_config(model_config):
    """The meta model_config keys nanochat's October 2025 or 2026 code does not write, or that are missing, as
    short descriptions (empty: it fits)."""
    problems = []
    extra_cfg = sorted(set(model_config) - set(NANOCHAT_CONFIG_KEYS) - set(NANOCHAT_2026_KEYS))
    if extra_cfg:
        problems.append("meta model_config keys " + ", ".join(extra_cfg))
    missing_cfg = [k for k in NANOCHAT_CONFIG_KEYS if k not in model_config]
    if missing_cfg:
        problems.append("meta model_config lacks " + ", ".join(missing_cfg))
    return problems


def unsupported_parts(state_dict, model_config):
    """What in a nanochat checkpoint this project's GPT cannot represent, as a list of short descriptions
    (empty: importable): meta keys it does not know (unsupported_config), weights that no GPTConfig option makes,
    missing weights, wrong shapes or dtypes (checked against the GPT of config_from_nanochat)."""
    problems = unsupported_config(model_config)
    if problems:
        return problems
    try:
        config = config_from_nanochat(state_dict, model_config)
    except (TypeError, ValueError) as e:
        return [f"model_config {model_config} is not a valid model ({e})"]
    problem = config_problem(config)
    if problem:
        return [f"model_config {model_config} is not a valid model ({problem})"]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    extra = sorted({_pattern(k) for k in state_dict if k not in expected})
    missing = sorted({_pattern(k) for k in expected if k not in state_dict})
    if extra:
        problems.append("weights " + ", ".join(extra))
    if missing:
        problems.append("missing weights " + ", ".join(missing))
    for k, shape in expected.items():
        v = state_dict.get(k)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            problems.append(f"{k} has shape {got}, expected {shape}")
        elif v.dtype not in _FLOAT_DTYPES:
            problems.append(f"{k} has dtype {v.dtype}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# nanochat 2026's optimizer state (MuonAdamW) -> this project's [AdamW, Muon]

def _nanochat_param_order(model):
    """Parameter names in the order of nanochat's MuonAdamW groups (its setup_optimizer): lm_head, wte, value
    embeddings, resid_lambdas, x0_lambdas, smear/backout scalars (AdamW), then the block matrices grouped by
    shape, shapes sorted (Muon). -> list of (kind, [names]) groups."""
    params = dict(model.named_parameters())
    groups = [("adamw", ["lm_head.weight"]), ("adamw", ["transformer.wte.weight"])]
    ve = [n for n in params if n.startswith("value_embeds.")]
    groups += [("adamw", ve)] if ve else []
    groups += [("adamw", [n]) for n in ("resid_lambdas", "x0_lambdas") if n in params]
    scalars = [n for n in ("smear_gate.weight", "smear_lambda", "backout_lambda") if n in params]
    groups += [("adamw", scalars)] if scalars else []
    matrices = [n for n in params if n.startswith("transformer.h.")]
    for shape in sorted({tuple(params[n].shape) for n in matrices}):
        groups.append(("muon", [n for n in matrices if tuple(params[n].shape) == shape]))
    return groups


def nanochat_optimizer_state(rank_states, model, optimizers, path):
    """Convert nanochat's MuonAdamW state dicts (`rank_states`, one per rank, rank 0 first) into the state dicts
    of `optimizers` = model.setup_optimizers() on one process ([AdamW, Muon]): AdamW moments and step counts
    (slices of ranks concatenated), Muon momentum buffers (nanochat keeps one stacked buffer per shape group,
    split over ranks). nanochat's Muon also keeps a factored second moment (NorMuon-style variance), which this
    project's Muon has no use for: it is dropped. Anything that does not match raises UserError naming `path`."""
    order = _nanochat_param_order(model)
    saved_groups = rank_states[0].get("param_groups") if isinstance(rank_states[0], dict) else None
    if not isinstance(saved_groups, list) or [len(g.get("params", [])) for g in saved_groups] != \
            [len(names) for _, names in order]:
        got = [len(g.get("params", [])) for g in saved_groups] if isinstance(saved_groups, list) else saved_groups
        raise UserError(f"{path}: not nanochat's MuonAdamW state for this model (parameter groups {got}, expected "
                        f"{[len(names) for _, names in order]}); import with --optimizer 0")
    params = dict(model.named_parameters())
    world_size = len(rank_states)
    adam, muon = {}, {}  # name -> state
    for gi, (kind, names) in enumerate(order):
        states = [[rs["state"].get(i, {}) for i in rs["param_groups"][gi]["params"]] for rs in rank_states]
        if kind == "adamw":
            for j, name in enumerate(names):
                per_rank = [st[j] for st in states]
                if not per_rank[0]:
                    continue  # never stepped
                p = params[name]
                sharded = world_size > 1 and p.numel() >= 1024  # nanochat shards large AdamW params along dim 0
                moments = {}
                for key in ("exp_avg", "exp_avg_sq"):
                    parts = [st[key] for st in per_rank] if sharded else [per_rank[0][key]]
                    moments[key] = torch.cat(parts, dim=0).float()
                    if tuple(moments[key].shape) != tuple(p.shape):
                        raise UserError(f"{path}: {key} of {name} has shape {tuple(moments[key].shape)}, expected "
                                        f"{tuple(p.shape)}; import with --optimizer 0")
                adam[name] = {"step": torch.tensor(float(per_rank[0]["step"])), **moments}
        else:
            first = [st[0] for st in states]  # nanochat keeps a group's state on its first parameter
            if not first[0]:
                continue
            buf = torch.cat([st["momentum_buffer"] for st in first], dim=0)[:len(names)].float()
            if tuple(buf.shape[1:]) != tuple(params[names[0]].shape) or buf.size(0) != len(names):
                raise UserError(f"{path}: a Muon momentum buffer has shape {tuple(buf.shape)}, expected "
                                f"({len(names)}, {', '.join(map(str, params[names[0]].shape))}); import with "
                                "--optimizer 0")
            for j, name in enumerate(names):
                muon[name] = {"momentum_buffer": buf[j].clone()}
    name_of = {id(p): n for n, p in params.items()}
    converted = []
    for opt, states in zip(optimizers, (adam, muon)):
        sd = opt.state_dict()
        flat = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
        sd["state"] = {i: states[n] for i, n in enumerate(flat) if n in states}
        converted.append(sd)
    return converted


def missing_tokenizer_hint(base_dir, checkpoint_dir):
    """For load_model: when this project's tokenizer is absent but a nanochat tokenizer.pkl is at hand (next to
    the checkpoint, or in <base_dir>/tokenizer/), the import command that converts it; else None."""
    from nanochat.tokenizer import META_FILE

    if os.path.exists(os.path.join(base_dir, "tokenizer", META_FILE)):
        return None
    phase = {v: k for k, v in PHASE_DIRS.items()}.get(
        os.path.basename(os.path.dirname(os.path.abspath(checkpoint_dir))), "base")
    fix = "which this project does not load directly (it is a pickle); import the checkpoint first:"
    if os.path.exists(os.path.join(checkpoint_dir, "tokenizer.pkl")):
        return (f"{os.path.join(checkpoint_dir, 'tokenizer.pkl')} is a nanochat tokenizer, {fix} "
                f"NANOCHAT_BASE_DIR=<new folder> python -m scripts.import_nanochat {checkpoint_dir} --phase {phase}")
    if os.path.exists(os.path.join(base_dir, "tokenizer", "tokenizer.pkl")):
        return (f"{os.path.join(base_dir, 'tokenizer', 'tokenizer.pkl')} is a nanochat tokenizer (this is a nanochat "
                f"base dir), {fix} NANOCHAT_BASE_DIR=<new folder> python -m scripts.import_nanochat {base_dir} "
                f"--phase {phase}")
    return None
