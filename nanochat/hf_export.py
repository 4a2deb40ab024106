"""
Converting this project's model and tokenizer to Hugging Face transformers, used by scripts/export_hf.py: the
October 2025 architecture to transformers' own `NanoChatForCausalLM` (transformers >= 5.0 ships it); a model with
any of nanochat's 2026 parts (GPTConfig options transformers' class lacks) to a folder with its own modeling file
(nanochat/hf_modeling.py copied in as modeling_nanochat_gpt.py, config.json's auto_map pointing at it), loaded
with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).

- `export_problem(model_config)`: None, or the one-line reason a model_config cannot be exported.
- `remote_code_config(model_config, tokenizer)`: config.json for the 2026 parts (NanoChatGPTConfig).

- `hf_config(model_config, tokenizer)`: config.json (NanoChatConfig) with the same maths as nanochat/gpt.py.
- `hf_state_dict(state_dict)`: parameter names transformer.* -> model.* (q_proj/k_proj/v_proj/o_proj, fc1/fc2).
- `build_hf_tokenizer(tokenizer)`: a `tokenizers` BPE that encodes like tiktoken: the split regex, byte-level
  mapping, merges ordered by the rank of the merged token, and `ignore_merges` (tiktoken returns a whole
  piece that is itself a token without merging).
- `CHAT_TEMPLATE`: Jinja that renders what render_conversation / render_for_completion produce.
- `model_card(meta, ...)`: README.md from the checkpoint meta.
- `write_hf_folder(folder, model, tokenizer, meta, ...)`: all of the above into one folder.

Two known, documented differences from the project's tokenizer: HF recognises special-token strings typed in
the text (chat templates rely on it; pass split_special_tokens=True for untrusted text to encode them as plain
text, as RustBPETokenizer.encode always does), and `tokenizer(text)` prepends <|bos|> (as nanochat's
evaluation does; add_special_tokens=False leaves it out).

Tests: .venv/bin/python -m pytest tests/test_export_hf.py
"""

import dataclasses
import json
import os
import re
import shutil

import torch

from nanochat.gpt import GPTConfig, padded_vocab_size, window_sizes

# The project's norm is F.rms_norm without an eps, i.e. torch.finfo(float32).eps for the fp32 activations the
# parity is checked on (transformers' NanoChatRMSNorm computes in fp32 too).
RMS_NORM_EPS = torch.finfo(torch.float32).eps
ROPE_THETA = 10000.0  # nanochat/gpt.py _precompute_rotary base
SOFTCAP = 15.0  # nanochat/gpt.py logits softcap

_WEIGHT_NAMES = [  # (this project's name, the transformers name); {i} is the layer index
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.h.{i}.attn.c_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("transformer.h.{i}.attn.c_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("transformer.h.{i}.attn.c_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("transformer.h.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("transformer.h.{i}.mlp.c_fc.weight", "model.layers.{i}.mlp.fc1.weight"),
    ("transformer.h.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.fc2.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def hf_state_dict(state_dict, dtype=None):
    """This project's GPT state dict -> transformers NanoChatForCausalLM names (contiguous tensors, cast to
    `dtype` if given). Raises ValueError on a key it does not know, so nothing is silently dropped."""
    patterns = [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst) for src, dst in _WEIGHT_NAMES]
    out = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("_orig_mod.")
        for pattern, dst in patterns:
            m = pattern.match(key)
            if m:
                name = dst.format(i=m.group(1)) if m.groups() else dst
                break
        else:
            raise ValueError(f"no transformers name for weight {key!r}")
        t = tensor.detach().to("cpu")
        out[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    return out


def hf_config(model_config, tokenizer, dtype="bfloat16"):
    """config.json for NanoChatForCausalLM: sizes from the checkpoint's model_config, ids from the tokenizer."""
    n_embd, n_head = model_config["n_embd"], model_config["n_head"]
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": model_config["vocab_size"],
        "hidden_size": n_embd,
        "intermediate_size": 4 * n_embd,  # MLP 4x wide
        "num_hidden_layers": model_config["n_layer"],
        "num_attention_heads": n_head,
        "num_key_value_heads": model_config["n_kv_head"],
        "head_dim": n_embd // n_head,
        "max_position_embeddings": model_config["sequence_len"],  # the context the model was trained on
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.get_bos_token_id(),
        "eos_token_id": tokenizer.encode_special("<|assistant_end|>"),
        "pad_token_id": None,  # no pad token: an embedding padding_idx would freeze that row when fine-tuning
        "use_cache": True,
        "dtype": dtype,
    }


REMOTE_CODE_FILE = "modeling_nanochat_gpt.py"  # nanochat/hf_modeling.py, as written into the exported folder
_OCTOBER_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def export_problem(model_config):
    """None if the model_config can be exported, else why not (one line): a key no GPTConfig field knows (a
    checkpoint of newer code) has no maths the exporter could write."""
    unknown = sorted(set(model_config) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        return (f"model_config keys {', '.join(unknown)} are not parts this exporter knows (GPTConfig); export it "
                "with the code that trained it")
    return None


def needs_remote_code(model_config):
    """True when the model uses a part transformers' NanoChatForCausalLM lacks (any 2026 GPTConfig option)."""
    october = GPTConfig(**{k: model_config[k] for k in _OCTOBER_FIELDS})
    return GPTConfig(**model_config) != october


def remote_code_config(model_config, tokenizer, dtype="bfloat16"):
    """config.json of a folder loaded through the exported modeling file (NanoChatGPTForCausalLM)."""
    cfg = GPTConfig(**model_config)
    return {
        "architectures": ["NanoChatGPTForCausalLM"],
        "model_type": "nanochat_gpt",
        "auto_map": {"AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.NanoChatGPTConfig",
                     "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.NanoChatGPTForCausalLM"},
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": padded_vocab_size(cfg),
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "max_position_embeddings": cfg.sequence_len,
        "window_sizes": window_sizes(cfg),
        "value_embed_layers": [i for i in range(cfg.n_layer) if cfg.value_embeds and i % 2 == (cfg.n_layer - 1) % 2],
        "lambdas": cfg.lambdas,
        "smear": cfg.smear,
        "backout": cfg.backout,
        "qk_scale": cfg.qk_scale,
        "rope_theta": float(cfg.rotary_base),
        "final_logit_softcapping": SOFTCAP,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.get_bos_token_id(),
        "eos_token_id": tokenizer.encode_special("<|assistant_end|>"),
        "pad_token_id": None,
        "use_cache": False,  # the modeling file has no KV cache
        "dtype": dtype,
    }


def generation_config(tokenizer):
    """generation_config.json: stop where the project's Engine stops (<|assistant_end|> or <|bos|>)."""
    assistant_end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()
    return {"bos_token_id": bos, "eos_token_id": [assistant_end, bos], "pad_token_id": assistant_end}


# ---------------------------------------------------------------------------------------------------------
# tokenizer

def byte_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE vocabularies
    are written in these characters): printable Latin-1 bytes map to themselves, the rest to 256, 257, ..."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_merges(mergeable_ranks):
    """Merges for a `tokenizers` BPE that reproduces tiktoken: every split (left, right) of a token into two
    tokens, ordered by the rank of the merged token (tiktoken merges the adjacent pair whose concatenation has
    the lowest rank), then by the ranks of the halves; the same rule as transformers' TikTokenConverter.
    Listing every split matters: one split per token mis-encodes real text (tested on the data mirror).
    -> list of (left bytes, right bytes)."""
    merges = []
    for token, rank in mergeable_ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable_ranks and right in mergeable_ranks:
                merges.append((rank, mergeable_ranks[left], mergeable_ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def build_hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` equal to the project's RustBPETokenizer (same ids for ordinary text, same
    special-token ids, <|bos|> prepended by the post-processor)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks = tokenizer.enc._mergeable_ranks
    b2u = byte_to_unicode()

    def to_str(token):
        return "".join(b2u[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(left), to_str(right)) for left, right in bpe_merges(ranks)]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer._special_ids.items(), key=lambda kv: kv[1])
    for name, token_id in specials:
        if token_id != hf.get_vocab_size():  # added tokens take the next free id: they must come in id order
            raise ValueError(f"special token {name} has id {token_id}, expected {hf.get_vocab_size()} "
                             "(special tokens must follow the ordinary tokens)")
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    bos = tokenizer.id_to_token(tokenizer.get_bos_token_id())
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.get_bos_token_id())])
    return hf


# render_conversation / render_for_completion as a chat template (nanochat/tokenizer.py). A leading system
# message is merged into the first user message ("system\n\nuser"); assistant content is a string or a list of
# parts {"type": "text" | "python" | "python_output", "text": ...}. With add_generation_prompt a final
# assistant message is dropped and <|assistant_start|> appended, exactly as render_for_completion does.
# {% generation %} marks what render_conversation supervises (mask 1: assistant text, python calls with their
# delimiters, <|assistant_end|>; not <|assistant_start|> nor tool output), so that transformers'
# apply_chat_template(..., return_assistant_tokens_mask=True) and TRL's assistant_only_loss train on the same
# tokens as chat_sft.
CHAT_TEMPLATE = (
    # text(): a string, or a list of {"type": "text", "text": ...} parts (the OpenAI-style form servers such as
    # vLLM may pass for user and system messages), joined
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}{%- for part in content -%}{{ part['text'] }}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system=none) -%}"
    "{%- set msgs = messages -%}"
    "{%- if add_generation_prompt and msgs and msgs[-1]['role'] == 'assistant' -%}"
    "{%- set msgs = msgs[:-1] -%}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for message in msgs -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{ raise_exception('a system message is only allowed as the first message') }}"
    "{%- endif -%}"
    "{%- set ns.system = text(message['content']) -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user_start|>"
    "{%- if ns.system is not none -%}{{ ns.system + '\\n\\n' }}{%- set ns.system = none -%}{%- endif -%}"
    "{{ text(message['content']) }}<|user_end|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}{%- generation -%}{{ message['content'] }}{%- endgeneration -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- generation -%}{{ part['text'] }}{%- endgeneration -%}"
    "{%- elif part['type'] == 'python' -%}"
    "{%- generation -%}<|python_start|>{{ part['text'] }}<|python_end|>{%- endgeneration -%}"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- else -%}{{ raise_exception('unknown content part type ' + part['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- generation -%}<|assistant_end|>{%- endgeneration -%}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def tokenizer_config(tokenizer, model_max_length):
    """tokenizer_config.json for PreTrainedTokenizerFast (transformers 4.x and 5.x)."""
    bos = tokenizer.id_to_token(tokenizer.get_bos_token_id())
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


# ---------------------------------------------------------------------------------------------------------
# model card

def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(meta, source, model_tag, step, num_params, dtype):
    """README.md for the exported folder: sizes, training summary and eval results from the checkpoint meta."""
    cfg = meta["model_config"]
    remote = needs_remote_code(cfg)
    parts = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in _OCTOBER_FIELDS)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- nanochat",
        "---",
        "",
        f"# nanochat {model_tag} ({source}, step {step})",
        "",
        "A small ChatGPT-like model trained with this nanochat repository, exported to the transformers "
        + ("format with its own modeling file (modeling_nanochat_gpt.py: nanochat's 2026 architecture; load with "
           "`trust_remote_code=True`)." if remote else "`NanoChatForCausalLM` format (transformers >= 5.0)."),
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {num_params:,} |",
        f"| layers | {cfg['n_layer']} |",
        f"| width | {cfg['n_embd']} |",
        f"| attention heads | {cfg['n_head']} (key/value heads {cfg['n_kv_head']}) |",
        f"| vocabulary | {cfg['vocab_size']} |",
        f"| context (training) | {cfg['sequence_len']} |",
        f"| weights dtype | {dtype} |",
        "",
        "Architecture: rotary embeddings, QK-norm, parameter-free RMSNorm, ReLU² MLP, untied embeddings, "
        "logit softcap 15" + (f"; nanochat 2026 parts: {parts}." if remote else "."),
        "",
        "## Training",
        "",
        f"- phase: {source}" + (f" (imported from nanochat: {meta['import']['path']})" if "import" in meta else ""),
        f"- step: {step}",
    ]
    if meta.get("git_commit"):
        lines.append(f"- git commit: {meta['git_commit']}")
    user_config = meta.get("user_config") or {}
    if user_config:
        lines += ["", "<details><summary>training configuration</summary>", "", "```"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in user_config.items()]
        lines += ["```", "", "</details>"]
    results = dict(meta.get("metrics") or {})
    results.update({k: v for k, v in meta.items() if isinstance(v, (int, float)) and k != "step"})
    lines += ["", "## Evaluation", ""]
    if results:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(results.items())]
    else:
        lines.append("No evaluation results were recorded in the checkpoint.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH" + (", trust_remote_code=True)" if remote else ")"),
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        'messages = [{"role": "user", "content": "Why is the sky blue?"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                    return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=128, do_sample=False)",
        "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "The tokenizer prepends `<|bos|>` to plain text (nanochat's documents start with it) and, as usual in "
        "transformers, recognises special-token strings in the text; pass `split_special_tokens=True` to encode "
        "untrusted text as ordinary tokens, as nanochat does.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# the folder

def write_hf_folder(folder, model, tokenizer, meta, source, model_tag, step, dtype="bfloat16"):
    """Write config.json, model.safetensors (weights cast to `dtype`), generation_config.json, tokenizer.json,
    tokenizer_config.json and README.md into `folder` (created if needed), plus modeling_nanochat_gpt.py for a
    model with 2026 parts. Needs `safetensors` and `tokenizers`. ValueError (export_problem) for a model_config
    it cannot express."""
    import safetensors.torch

    model_config = meta["model_config"]
    problem = export_problem(model_config)
    if problem:
        raise ValueError(problem)
    os.makedirs(folder, exist_ok=True)
    remote = needs_remote_code(model_config)
    if remote:  # this project's weight names, read by the modeling file written next to them
        weights = {k.removeprefix("_orig_mod."): v.detach().to("cpu", getattr(torch, dtype)).contiguous()
                   for k, v in model.state_dict().items()}
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling.py"),
                        os.path.join(folder, REMOTE_CODE_FILE))
    else:
        weights = hf_state_dict(model.state_dict(), getattr(torch, dtype))
    safetensors.torch.save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})

    def write_text(name, text):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)

    def write_json(name, obj):
        write_text(name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    write_json("config.json", remote_code_config(model_config, tokenizer, dtype) if remote
               else hf_config(model_config, tokenizer, dtype))
    write_json("generation_config.json", generation_config(tokenizer))
    build_hf_tokenizer(tokenizer).save(os.path.join(folder, "tokenizer.json"))
    write_json("tokenizer_config.json", tokenizer_config(tokenizer, meta["model_config"]["sequence_len"]))
    write_text("README.md", model_card(meta, source, model_tag, step, model.num_params(), dtype))
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)  # safetensors writes 0600
    return folder
