"""
nanochat's GPT with every GPTConfig part (the 2026 architecture: sliding windows, value embeddings, resid/x0
lambdas, smear, backout, q/k scale, rotary base, padded vocabulary) as a transformers model, for folders written by
scripts/export_hf.py. The exporter copies this file into the folder as modeling_nanochat_gpt.py, and config.json's
auto_map points transformers at it:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

Self-contained: torch and transformers only (never imports nanochat). The weights keep this project's names
(transformer.h.{i}.attn.c_q.weight, value_embeds.{i}.weight, ...), and the maths is nanochat/gpt.py's, checked by
the exporter on fp32 logits. No KV cache: generate() recomputes the whole sequence at each step (correct, slow
for long outputs). attention_mask masks padded keys (right padding; positions count from the row's start).
Importing this module in the nanochat package has no effect beyond defining the classes.

Tests: .venv/bin/python -m pytest tests/test_export_hf.py
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class NanoChatGPTConfig(PretrainedConfig):
    model_type = "nanochat_gpt"

    def __init__(self, vocab_size=32768, padded_vocab_size=32768, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=2048, window_sizes=None,
                 value_embed_layers=(), lambdas=False, smear=False, backout=False, qk_scale=1.0, rope_theta=10000.0,
                 final_logit_softcapping=15.0, **kwargs):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size  # embedding / lm_head rows; logits are cropped to vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        # per layer: None = full causal attention, w = the query sees itself and the w keys before it
        self.window_sizes = list(window_sizes) if window_sizes is not None else [None] * num_hidden_layers
        self.value_embed_layers = list(value_embed_layers)  # layers with a value embedding and its gate
        self.lambdas = lambdas  # resid_lambdas / x0_lambdas
        self.smear = smear  # smear_gate / smear_lambda
        self.backout = backout  # backout_lambda (layer num_hidden_layers // 2)
        self.qk_scale = qk_scale
        self.rope_theta = rope_theta
        self.final_logit_softcapping = final_logit_softcapping
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24


def _norm(x):
    return F.rms_norm(x, (x.size(-1),))


def _rotate(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class _Linear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class _Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        C, H, Hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, C // H
        self.qk_scale = config.qk_scale
        self.c_q = _Linear(C, H * self.head_dim, bias=False)
        self.c_k = _Linear(C, Hkv * self.head_dim, bias=False)
        self.c_v = _Linear(C, Hkv * self.head_dim, bias=False)
        self.c_proj = _Linear(C, C, bias=False)
        self.ve_gate = _Linear(VE_GATE_CHANNELS, Hkv, bias=False) if layer_idx in config.value_embed_layers else None

    def forward(self, x, ve, cos, sin, mask):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = _norm(_rotate(q, cos, sin)), _norm(_rotate(k, cos, sin))
        q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=mask,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class _MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = _Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.c_proj = _Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class _Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = _Attention(config, layer_idx)
        self.mlp = _MLP(config)

    def forward(self, x, ve, cos, sin, mask):
        x = x + self.attn(_norm(x), ve, cos, sin, mask)
        return x + self.mlp(_norm(x))


class NanoChatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["_Block"]

    def __init__(self, config):
        super().__init__(config)
        C, L, V = config.hidden_size, config.num_hidden_layers, config.padded_vocab_size
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(V, C),
                                          "h": nn.ModuleList([_Block(config, i) for i in range(L)])})
        self.lm_head = _Linear(C, V, bias=False)
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if config.smear:
            self.smear_gate = _Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = config.num_key_value_heads * (C // config.num_attention_heads)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def _rotary(self, T, device):
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.config.rope_theta ** (channel / head_dim))
        freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def forward(self, input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=None, **kwargs):
        cfg = self.config
        B, T = input_ids.shape
        device = input_ids.device
        cos, sin = self._rotary(T, device)
        t = torch.arange(T, device=device)
        masks = {}
        for w in set(cfg.window_sizes):
            m = t[None, :] <= t[:, None]
            if w is not None:
                m = m & (t[:, None] - t[None, :] <= w)
            m = m[None, None]
            if attention_mask is not None:
                m = m & attention_mask.bool()[:, None, None, :]
            masks[w] = m
        x = self.transformer.wte(input_ids)
        x = _norm(x.to(self.lm_head.weight.dtype))
        if cfg.smear and T > 1:
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, x_backout = x, None
        for i, block in enumerate(self.transformer.h):
            if cfg.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[cfg.window_sizes[i]])
            if cfg.backout and i == cfg.num_hidden_layers // 2:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        logits = self.lm_head(_norm(x))[..., :cfg.vocab_size].float()
        cap = cfg.final_logit_softcapping
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # no cache: the whole sequence each step
