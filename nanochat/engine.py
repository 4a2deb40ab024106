"""
Inference: a KV cache, a safe calculator for the model's tool calls, and the Engine that streams tokens.

- `KVCache`: keys/values of every layer, allocated lazily on the first insert (dtype/device of the keys),
  grown when a sequence outgrows it; `prefill(other)` copies a batch-1 cache into a batch-N one, so a
  prompt is run through the model once and then decoded as `num_samples` independent rows.
- `use_calculator(expr)`: evaluates arithmetic and `"text".count("x")` with an `ast` whitelist (no names,
  no attributes but `.count` on a string literal, no subscripts, no builtins, bounded `**`, a deadline);
  returns None for anything else.
- `Engine(model, tokenizer).generate(...)` yields `(token_column, token_masks)` per step (mask 1 = sampled,
  0 = forced by the tool); `generate_batch(...)` collects whole completions.

Tests: tests/test_engine.py.
"""

import ast
import math
import time
from collections import deque

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of all layers, shaped (num_layers, 2, B, H, T, D). The model's attention calls
    `insert_kv(layer_idx, k, v)` once per layer per forward; the position advances after the last layer.
    `prev_embedding` (B or 1, 1, C) is the last token's embedding of the previous forward, for models with
    smear (GPTConfig.smear), which mix each token's predecessor into it."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.kv_shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv_cache = None  # allocated on the first insert, with the dtype/device of the keys
        self.pos = 0
        self.prev_embedding = None

    def reset(self):
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self):
        return self.pos

    def prefill(self, other):
        """Copy a batch-1 cache (e.g. a prompt run once) into this empty batch-N cache, row by row."""
        assert self.pos == 0, "prefill() expects an empty cache"
        L, _, B, H, T, D = self.kv_shape
        oL, _, oB, oH, _, oD = other.kv_shape
        assert (L, H, D) == (oL, oH, oD), f"cache shapes differ: {self.kv_shape} vs {other.kv_shape}"
        assert oB in (1, B), f"prefill copies a batch-1 (or same-batch) cache, got batch {oB} into {B}"
        if other.kv_cache is not None:
            seq_len = max(T, other.pos)
            self.kv_shape = (L, 2, B, H, seq_len, D)
            self.kv_cache = torch.empty(self.kv_shape, dtype=other.kv_cache.dtype, device=other.kv_cache.device)
            self.kv_cache[:, :, :, :, :other.pos] = other.kv_cache[:, :, :, :, :other.pos]  # broadcasts batch 1
        self.pos = other.pos
        self.prev_embedding = other.prev_embedding  # batch 1 broadcasts over the rows

    def insert_kv(self, layer_idx, k, v):
        """Store k, v (B, H, T_new, D) at the current position; return views of everything up to pos+T_new."""
        if self.kv_cache is None:
            self.kv_cache = torch.empty(self.kv_shape, dtype=k.dtype, device=k.device)
        B, H, T_new, D = k.shape
        t0, t1 = self.pos, self.pos + T_new
        if t1 > self.kv_cache.size(4):  # grow in steps of 1024 positions
            new_len = (t1 + 1024 + 1023) // 1024 * 1024
            grown = torch.empty((*self.kv_shape[:4], new_len, self.kv_shape[5]), dtype=self.kv_cache.dtype,
                                device=self.kv_cache.device)
            grown[:, :, :, :, :t0] = self.kv_cache[:, :, :, :, :t0]
            self.kv_cache = grown
            self.kv_shape = tuple(grown.shape)
        self.kv_cache[layer_idx, 0, :, :, t0:t1] = k
        self.kv_cache[layer_idx, 1, :, :, t0:t1] = v
        k_full = self.kv_cache[layer_idx, 0, :, :, :t1]
        v_full = self.kv_cache[layer_idx, 1, :, :, :t1]
        if layer_idx == self.kv_shape[0] - 1:
            self.pos = t1
        return k_full, v_full


# ----------------------------------------------------------------------------------------------------------
# Calculator tool: a whitelist evaluator over the `ast` of one expression

MAX_EXPR_CHARS = 512  # longer "expressions" are not a calculator call
MAX_POW_EXPONENT = 100  # `**` exponent bound (absolute value)
MAX_ABS_RESULT = 10 ** 100  # every intermediate number stays below this, so nothing blows up
CALCULATOR_TIMEOUT = 0.1  # seconds; checked at every node (each node is bounded work by the limits above)

_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a ** b,
}
_UNARY_OPS = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic / str.count, or it is too big or too slow."""


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(x):
    if isinstance(x, complex) or not _is_number(x):
        raise CalculatorError(f"not a real number: {x!r}")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not finite")
    if abs(x) >= MAX_ABS_RESULT:
        raise CalculatorError("result too large")
    return x


def _check_pow(base, exponent):
    if abs(exponent) > MAX_POW_EXPONENT:
        raise CalculatorError(f"exponent {exponent!r} too large")
    if base != 0 and abs(base) != 1 and exponent > 0:
        if exponent * math.log10(abs(base)) >= 100:  # estimate before computing
            raise CalculatorError("power too large")


def _eval_node(node, deadline):
    if time.monotonic() > deadline:
        raise CalculatorError("calculator time limit")
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, deadline)
    if isinstance(node, ast.Constant):
        if _is_number(node.value):
            return _check_number(node.value)
        raise CalculatorError(f"constant {node.value!r} is not a number")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _check_number(_UNARY_OPS[type(node.op)](_eval_node(node.operand, deadline)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _check_number(_eval_node(node.left, deadline))
        right = _check_number(_eval_node(node.right, deadline))
        if isinstance(node.op, ast.Pow):
            _check_pow(left, right)
        return _check_number(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Call):  # only "literal".count("literal")
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "count" and isinstance(func.value, ast.Constant)
                and isinstance(func.value.value, str) and not node.keywords and len(node.args) == 1
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            return func.value.value.count(node.args[0].value)
        raise CalculatorError("only \"text\".count(\"x\") calls are allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def evaluate_expression(expr, timeout=CALCULATOR_TIMEOUT):
    """Evaluate a calculator expression; raises CalculatorError for anything outside the whitelist."""
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError("expression too long")
    expr = expr.strip()
    if '"' not in expr and "'" not in expr:
        expr = expr.replace(",", "")  # "1,234 * 5": thousands separators in plain arithmetic
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"cannot parse: {e}") from e
    try:
        return _eval_node(tree, time.monotonic() + timeout)
    except (ArithmeticError, RecursionError, MemoryError) as e:  # 1/0, float overflow, deep nesting
        raise CalculatorError(str(e)) from e


def format_calculator_result(value):
    """Integral floats print as integers (48/2 -> "24", as the GSM8K tool outputs are written); others with
    up to 12 significant digits."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def use_calculator(expr):
    """The tool the model calls between <|python_start|> and <|python_end|>: the result as a string, or None."""
    try:
        return format_calculator_result(evaluate_expression(expr))
    except CalculatorError:
        return None


# ----------------------------------------------------------------------------------------------------------
# Sampling


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> token ids (B, 1); every row is sampled independently. temperature 0 = argmax.
    top_k keeps the k most likely tokens (None or 0: all); top_p (nucleus sampling, Holtzman et al. 2019)
    then keeps the smallest set of most likely tokens whose probability reaches top_p (None or 1.0: all)."""
    if not temperature >= 0.0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
    else:
        values, indices = logits, None
    if top_p is not None and top_p < 1.0:
        values, order = torch.sort(values, dim=-1, descending=True)
        indices = order if indices is None else indices.gather(1, order)
        probs = F.softmax(values, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus is full; the top one always stays
        values = values.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(F.softmax(values, dim=-1), num_samples=1, generator=rng)
    return choice if indices is None else indices.gather(1, choice)


# ----------------------------------------------------------------------------------------------------------
# Engine


class RowState:
    """Per-row decoding state: tokens so far, tokens the tool forces next, the python block being written."""

    def __init__(self, tokens):
        self.current_tokens = list(tokens)
        self.forced_tokens = deque()
        self.in_python_block = False
        self.python_expr_tokens = []
        self.completed = False


def _model_device(model):
    if hasattr(model, "get_device"):
        return model.get_device()
    return next(model.parameters()).device


class Engine:
    """Streaming generation with a KV cache and the calculator tool (nanochat's API)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _special(self, name):
        return self.tokenizer.encode_special(name)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
                 top_p=None):
        """Yield (token_column, token_masks) per step: one token per row, mask 1 = sampled, 0 = forced.
        The prompt is run once with batch 1; its cache is copied into `num_samples` rows which are then
        decoded independently (each row samples its own tokens). A row ends at <|assistant_end|> or <|bos|>;
        generation stops when every row has ended or after `max_tokens` steps (None: until the model's
        sequence_len is reached)."""
        assert isinstance(tokens, list) and len(tokens) > 0 and isinstance(tokens[0], int), "tokens: list of int"
        device = _model_device(self.model)
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        python_start, python_end = self._special("<|python_start|>"), self._special("<|python_end|>")
        output_start, output_end = self._special("<|output_start|>"), self._special("<|output_end|>")
        assistant_end, bos = self._special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()

        cfg = self.model.config
        if max_tokens is None:
            max_tokens = max(cfg.sequence_len - len(tokens), 1)
        kv_kwargs = dict(num_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer)

        # prefill: the prompt once, batch 1
        kv_cache_prefill = KVCache(batch_size=1, seq_len=len(tokens), **kv_kwargs)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model.forward(ids, kv_cache=kv_cache_prefill)[:, -1, :]  # (1, V)
        # decode: the prompt's cache copied into num_samples rows
        kv_cache_decode = KVCache(batch_size=num_samples, seq_len=len(tokens) + max_tokens, **kv_kwargs)
        kv_cache_decode.prefill(kv_cache_prefill)
        del kv_cache_prefill
        logits = logits.repeat(num_samples, 1)  # (num_samples, V): each row samples its own first token

        rows = [RowState(tokens) for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()
            token_column, token_masks = [], []
            for row, sampled_token in zip(rows, sampled):
                forced = len(row.forced_tokens) > 0
                token = row.forced_tokens.popleft() if forced else sampled_token
                token_column.append(token)
                token_masks.append(0 if forced else 1)
                row.current_tokens.append(token)
                if token == assistant_end or token == bos:
                    row.completed = True
                # tool use: evaluate the python block when it closes, force its output into this row
                if token == python_start:
                    row.in_python_block, row.python_expr_tokens = True, []
                elif token == python_end and row.in_python_block:
                    row.in_python_block = False
                    if row.python_expr_tokens:
                        result = use_calculator(self.tokenizer.decode(row.python_expr_tokens))
                        if result is not None:
                            row.forced_tokens.append(output_start)
                            row.forced_tokens.extend(self.tokenizer.encode(result))
                            row.forced_tokens.append(output_end)
                    row.python_expr_tokens = []
                elif row.in_python_block:
                    row.python_expr_tokens.append(token)
            yield token_column, token_masks
            if all(row.completed for row in rows) or step == max_tokens - 1:
                break
            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model.forward(ids, kv_cache=kv_cache_decode)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, keep_end=False, **kwargs):
        """Whole completions: (results, masks), each a list of num_samples token lists = the prompt plus the
        generated tokens, without the terminal <|assistant_end|>/<|bos|> (with it, mask 1, when keep_end:
        chat_rl trains the decision to stop too). Prompt positions have mask 0."""
        assistant_end, bos = self._special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if completed[i]:
                    continue
                if token == assistant_end or token == bos:
                    completed[i] = True
                    if keep_end:
                        results[i].append(token)
                        masks[i].append(mask)
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(completed):
                break
        return results, masks
