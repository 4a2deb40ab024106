"""nanochat.engine: KVCache, the KV-cache path against the no-cache forward of a tiny GPT, sampling
(determinism, seeds, independent rows), the calculator tool and its forced tokens."""

import time

import pytest
import torch

from chat_eval_worker import ByteTokenizer, MarkovModel, UniformModel, tiny_gpt
from nanochat.engine import Engine, KVCache, evaluate_expression, sample_next_token, use_calculator

TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SP = TOK.special_ids
PROMPT = [SP["<|bos|>"], SP["<|user_start|>"], *TOK.encode("Hi there, what is up?"), SP["<|user_end|>"],
          SP["<|assistant_start|>"]]


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt(TOK.get_vocab_size(), seed=0)


# ----------------------------------------------------------------------------------------------------------
# KVCache


def test_kv_cache_inserts_returns_views_and_advances_after_last_layer():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=4, head_dim=5, num_layers=2)
    assert cache.kv_cache is None and cache.get_pos() == 0  # lazily allocated
    k0, v0 = torch.randn(2, 3, 3, 5, dtype=torch.float64), torch.randn(2, 3, 3, 5, dtype=torch.float64)
    k, v = cache.insert_kv(0, k0, v0)
    assert cache.kv_cache.dtype == torch.float64 and k.shape == (2, 3, 3, 5)
    assert cache.get_pos() == 0  # not after the first of two layers
    torch.testing.assert_close(k, k0) and torch.testing.assert_close(v, v0)
    cache.insert_kv(1, k0 + 1, v0 + 1)
    assert cache.get_pos() == 3
    # one more token: views cover all 4 positions; then grow past seq_len=4
    k1 = torch.randn(2, 3, 1, 5, dtype=torch.float64)
    for layer in range(2):
        k, v = cache.insert_kv(layer, k1, k1)
    assert k.shape == (2, 3, 4, 5) and cache.get_pos() == 4
    torch.testing.assert_close(k[:, :, :3], k0 + 1) and torch.testing.assert_close(k[:, :, 3:], k1)
    k2 = torch.randn(2, 3, 2, 5, dtype=torch.float64)
    for layer in range(2):
        k, v = cache.insert_kv(layer, k2, k2)
    assert k.shape == (2, 3, 6, 5) and cache.get_pos() == 6 and cache.kv_cache.size(4) >= 6
    torch.testing.assert_close(k[:, :, :3], k0 + 1)  # old contents survive the growth
    torch.testing.assert_close(k[:, :, 4:], k2)
    cache.reset()
    assert cache.get_pos() == 0


def test_kv_cache_prefill_copies_batch1_into_every_row():
    one = KVCache(batch_size=1, num_heads=2, seq_len=3, head_dim=4, num_layers=2)
    ks = [torch.randn(1, 2, 3, 4) for _ in range(2)]
    for layer in range(2):
        one.insert_kv(layer, ks[layer], -ks[layer])
    many = KVCache(batch_size=5, num_heads=2, seq_len=10, head_dim=4, num_layers=2)
    many.prefill(one)
    assert many.get_pos() == 3
    new = torch.randn(5, 2, 1, 4)
    for layer in range(2):
        k, v = many.insert_kv(layer, new, new)
        assert k.shape == (5, 2, 4, 4)
        for row in range(5):
            torch.testing.assert_close(k[row, :, :3], ks[layer][0])
            torch.testing.assert_close(v[row, :, :3], -ks[layer][0])
        torch.testing.assert_close(k[:, :, 3:], new)
    with pytest.raises(AssertionError):
        KVCache(batch_size=5, num_heads=3, seq_len=10, head_dim=4, num_layers=2).prefill(one)


# ----------------------------------------------------------------------------------------------------------
# The KV-cache path against the plain forward of a real tiny GPT


def test_chunked_cache_forward_matches_full_forward(gpt):
    ids = torch.tensor([PROMPT])
    full = gpt(ids)
    c = gpt.config
    cache = KVCache(batch_size=1, num_heads=c.n_kv_head, seq_len=8, head_dim=c.n_embd // c.n_head,
                    num_layers=c.n_layer)
    parts = [gpt(ids[:, :10], kv_cache=cache), gpt(ids[:, 10:14], kv_cache=cache)]  # prefill, then a chunk
    parts += [gpt(ids[:, t:t + 1], kv_cache=cache) for t in range(14, ids.size(1))]  # then one at a time
    assert cache.get_pos() == ids.size(1)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def _greedy_no_cache(model, tokens, max_tokens):
    out = list(tokens)
    for _ in range(max_tokens):
        next_token = int(torch.argmax(model(torch.tensor([out]))[0, -1]))
        out.append(next_token)
        if next_token in (SP["<|assistant_end|>"], SP["<|bos|>"]):
            break
    return out[len(tokens):]


def test_kv_cache_generation_equals_no_cache_greedy(gpt):
    reference = _greedy_no_cache(gpt, PROMPT, 24)
    assert len(set(reference)) > 3  # the perturbed random model does not just repeat one token
    assert SP["<|python_start|>"] not in reference  # (no tool call, so the two paths are comparable)
    columns = list(Engine(gpt, TOK).generate(PROMPT, num_samples=3, max_tokens=24, temperature=0.0))
    for row in range(3):
        assert [col[row] for col, _ in columns] == reference
    assert all(mask == [1, 1, 1] for _, mask in columns)


def test_temperature_zero_is_deterministic_and_top_k_1_is_greedy(gpt):
    engine = Engine(gpt, TOK)
    a, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=12, temperature=0.0, seed=1)
    b, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=12, temperature=0.0, seed=2)
    c, _ = engine.generate_batch(PROMPT, num_samples=2, max_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert a[0] == a[1] == b[0] == c[0] == c[1]
    assert len(a[0]) > len(PROMPT)


def test_seed_reproduces_samples(gpt):
    engine = Engine(gpt, TOK)
    kw = dict(num_samples=4, max_tokens=16, temperature=1.0)
    a, _ = engine.generate_batch(PROMPT, seed=123, **kw)
    b, _ = engine.generate_batch(PROMPT, seed=123, **kw)
    c, _ = engine.generate_batch(PROMPT, seed=124, **kw)
    assert a == b
    assert a != c


def test_rows_sample_independently_with_a_uniform_model():
    model = UniformModel(TOK.get_vocab_size())
    columns = list(Engine(model, TOK).generate(PROMPT, num_samples=8, max_tokens=5, temperature=1.0, seed=0))
    first = columns[0][0]
    assert len(set(first)) > 1  # each row samples its own first token (nanochat v1 broadcast it)
    rows = [tuple(col[r] for col, _ in columns) for r in range(8)]
    assert len(set(rows)) == 8
    assert model.calls[0] == (1, len(PROMPT))  # the prompt is run once, with batch 1
    assert all(call == (8, 1) for call in model.calls[1:])
    assert len(model.calls) == len(columns)  # no forward after the last step


def test_sample_next_token_top_k_and_argmax():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 0.0, 2.9]])
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, temperature=0.0).tolist() == [[1], [0]]
    for _ in range(20):
        t = sample_next_token(logits, rng, temperature=2.0, top_k=2)[:, 0].tolist()
        assert t[0] in (1, 2) and t[1] in (0, 3)


def test_generate_batch_stops_each_row_and_drops_the_terminal_token():
    a, b = ord("a"), ord("b")
    table = {SP["<|assistant_start|>"]: a, a: b, b: SP["<|assistant_end|>"]}
    model = MarkovModel(TOK.get_vocab_size(), table, default=ord("z"))
    results, masks = Engine(model, TOK).generate_batch(PROMPT, num_samples=2, max_tokens=50, temperature=0.0)
    assert results == [PROMPT + [a, b]] * 2
    assert masks == [[0] * len(PROMPT) + [1, 1]] * 2
    assert len(model.calls) == 3  # prefill + 2 decode steps, stopped when every row ended
    # max_tokens bounds the steps when no row ends
    model = MarkovModel(TOK.get_vocab_size(), {}, default=ord("z"))
    results, _ = Engine(model, TOK).generate_batch(PROMPT, max_tokens=7, temperature=0.0)
    assert results[0] == PROMPT + [ord("z")] * 7
    # keep_end (chat_rl): the terminal token stays, as a sampled token; a row cut by max_tokens has none
    model = MarkovModel(TOK.get_vocab_size(), table, default=ord("z"))
    results, masks = Engine(model, TOK).generate_batch(PROMPT, max_tokens=50, temperature=0.0, keep_end=True)
    assert results == [PROMPT + [a, b, SP["<|assistant_end|>"]]] and masks == [[0] * len(PROMPT) + [1, 1, 1]]
    results, _ = Engine(model, TOK).generate_batch(PROMPT, max_tokens=2, temperature=0.0, keep_end=True)
    assert results == [PROMPT + [a, b]]


# ----------------------------------------------------------------------------------------------------------
# Calculator tool


@pytest.mark.parametrize("expr, expected", [
    ("2+3*4", "14"), ("(1 + 2) * -3", "-9"), ("10/4", "2.5"), ("48/2", "24"), ("7 // 2", "3"), ("7 % 3", "1"),
    ("2**10", "1024"), ("1,234 * 2", "2468"), ('"strawberry".count("r")', "3"), ("'banana'.count('an')", "2"),
    (" 0.1 * 3 ", "0.3"),
])
def test_calculator_evaluates_arithmetic_and_count(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')", "__import__('os').system('true')", "os.system('true')", "x", "x + 1", "(1).real",
    "'abc'.upper()", "'abc'.count", "abs(-1)", "print(1)", "[1, 2][0]", "'abc'[0]", "lambda: 1", "1 if 1 else 2",
    "'a' * 10**9", "'a' + 'b'", "'abc'.count(x)", "'abc'.count('a', 1)", "1/0", "(-8) ** 0.5", "1e308 * 10",
    "x = 1", "import os", "", "2 ** 1000", "10**99 * 10**99",
])
def test_calculator_refuses(expr):
    assert use_calculator(expr) is None


def test_calculator_refuses_power_bombs_quickly():
    for expr in ["9**9**9", "2**2**2**2**2**2", "(10**50)**(10**50)", "9**9**9**9", "-9**9**9"]:
        t0 = time.monotonic()
        assert use_calculator(expr) is None
        assert time.monotonic() - t0 < 0.5, expr
    t0 = time.monotonic()
    assert use_calculator("(" * 5000 + "1" + ")" * 5000) is None  # too long / too deep, still quick
    assert time.monotonic() - t0 < 0.5
    assert evaluate_expression("3**4") == 81


def _tool_model(expr):
    """A model that writes <|python_start|> expr <|python_end|>, then '!' after the output, then ends."""
    chain = [SP["<|assistant_start|>"], SP["<|python_start|>"], *TOK.encode(expr), SP["<|python_end|>"]]
    assert len(set(chain)) == len(chain)  # the Markov table needs distinct tokens
    table = dict(zip(chain[:-1], chain[1:]))
    table[SP["<|output_end|>"]] = ord("!")
    table[ord("!")] = SP["<|assistant_end|>"]
    return MarkovModel(TOK.get_vocab_size(), table, default=ord("!"))


def test_tool_call_forces_output_tokens():
    results, masks = Engine(_tool_model("12*3"), TOK).generate_batch(PROMPT, num_samples=2, max_tokens=40,
                                                                     temperature=0.0)
    out, mask = results[0][len(PROMPT):], masks[0][len(PROMPT):]
    expected = [SP["<|python_start|>"], *TOK.encode("12*3"), SP["<|python_end|>"],
                SP["<|output_start|>"], *TOK.encode("36"), SP["<|output_end|>"], ord("!")]
    assert out == expected
    assert mask == [1] * 6 + [0] * 4 + [1]  # the tool's tokens are forced, not sampled
    assert results[1] == results[0]


def test_refused_tool_call_forces_nothing():
    results, masks = Engine(_tool_model("os.getpid()"), TOK).generate_batch(PROMPT, max_tokens=40,
                                                                            temperature=0.0)
    out = results[0][len(PROMPT):]
    assert SP["<|output_start|>"] not in out
    assert out == [SP["<|python_start|>"], *TOK.encode("os.getpid()"), SP["<|python_end|>"], ord("!")]
    assert set(masks[0][len(PROMPT):]) == {1}
