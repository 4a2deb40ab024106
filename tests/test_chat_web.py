"""scripts/chat_web.py and nanochat/web.py: request validation, reply text with calculator calls, stop strings,
generation with a scripted engine; then the server in a subprocess on a free loopback port with a tiny random
checkpoint, driven by the real `openai` client, raw HTTP, and a headless Chromium (Debian's `chromium`,
through Playwright; the browser test FAILS when chromium is missing)."""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch
from tiny_checkpoint import make_tiny_checkpoint

from nanochat.web import (APIError, ChatRequest, CompletionText, Limits, SamplingDefaults, StopScanner,
                          assistant_message_parts, generate_completion, network_exposure_warning, parse_json_body,
                          validate_chat_request)
from nanochat.web_guard import (check_content_type, check_host_and_origin, default_allowed_hosts, host_allowed,
                                json_nesting_depth)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------------
# Request validation (pure)

LIMITS = Limits(context_len=256)
DEFAULTS = SamplingDefaults(temperature=0.8, top_k=50, max_tokens=64)


def user(text):
    return {"role": "user", "content": text}


def test_validate_defaults_and_fields():
    req = validate_chat_request({"messages": [user("hi")]}, LIMITS, DEFAULTS)
    assert (req.temperature, req.top_k, req.top_p, req.max_tokens, req.n, req.seed, req.stop, req.stream) == \
        (0.8, 50, 1.0, 64, 1, None, [], False)
    req = validate_chat_request({"messages": [{"role": "system", "content": "be brief"}, user("a"),
                                              {"role": "assistant", "content": "b"},
                                              {"role": "user", "content": [{"type": "text", "text": "c"}]}],
                                 "temperature": 0, "top_k": 0, "top_p": 0.5, "max_completion_tokens": 7, "n": 3,
                                 "seed": -5, "stop": "x", "stream": True, "stream_options": {"include_usage": True}},
                                LIMITS, DEFAULTS)
    assert (req.temperature, req.top_k, req.top_p, req.max_tokens, req.n, req.seed, req.stop) == \
        (0.0, 0, 0.5, 7, 3, -5, ["x"])
    assert req.stream and req.include_usage and req.messages[-1] == user("c")


BAD_REQUESTS = [  # (body, status, param or None, code)
    ([1, 2], 400, None, "invalid_body"),
    ({}, 400, "messages", "missing_required_parameter"),
    ({"messages": "hi"}, 422, "messages", "invalid_type"),
    ({"messages": []}, 400, "messages", "empty_messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_role"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content", "invalid_type"),
    ({"messages": [user("a"), user("b")]}, 400, "messages", "invalid_conversation"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b"}]}, 400, "messages", "invalid_conversation"),
    ({"messages": [user("a")] * 501}, 413, "messages", "too_many_messages"),
    ({"messages": [user("a" * 8001)]}, 413, "messages[0].content", "message_too_long"),
    ({"messages": [user("a" * 8000), {"role": "assistant", "content": "b" * 8000}] * 2 + [user("c")]}, 413,
     "messages", "conversation_too_long"),
    ({"messages": [user("a")], "temperature": 2.5}, 400, "temperature", "out_of_range"),
    ({"messages": [user("a")], "temperature": "hot"}, 422, "temperature", "invalid_type"),
    ({"messages": [user("a")], "top_k": 201}, 400, "top_k", "out_of_range"),
    ({"messages": [user("a")], "top_k": 1.5}, 422, "top_k", "invalid_type"),
    ({"messages": [user("a")], "top_p": 0}, 400, "top_p", "out_of_range"),
    ({"messages": [user("a")], "max_tokens": 0}, 400, "max_tokens", "out_of_range"),
    ({"messages": [user("a")], "max_tokens": 4097}, 400, "max_tokens", "out_of_range"),
    ({"messages": [user("a")], "max_tokens": True}, 422, "max_tokens", "invalid_type"),
    ({"messages": [user("a")], "n": 0}, 400, "n", "out_of_range"),
    ({"messages": [user("a")], "stop": [1]}, 422, "stop", "invalid_type"),
    ({"messages": [user("a")], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "out_of_range"),
    ({"messages": [user("a")], "stream": "yes"}, 422, "stream", "invalid_type"),
]


@pytest.mark.parametrize("body, status, param, code", BAD_REQUESTS)
def test_validate_rejects(body, status, param, code):
    with pytest.raises(APIError) as info:
        validate_chat_request(body, LIMITS, DEFAULTS)
    e = info.value
    assert (e.status, e.param, e.code) == (status, param, code), e.message
    assert set(e.body()["error"]) == {"message", "type", "param", "code"} and e.message


def test_network_exposure_warning():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert network_exposure_warning(host, None) is None
    assert "reachable from the network by anyone" in network_exposure_warning("0.0.0.0", None)
    assert "API key required" in network_exposure_warning("0.0.0.0", "k")
    assert "reachable from the network" in network_exposure_warning("192.168.1.5", "k")


def test_parse_json_body():
    assert parse_json_body(b'{"a": 1}', LIMITS) == {"a": 1}
    for raw in (b"{nope", b"\xff\xfe", b'{"t": NaN}'):
        with pytest.raises(APIError) as info:
            parse_json_body(raw, LIMITS)
        assert (info.value.status, info.value.code) == (400, "invalid_json")
    with pytest.raises(APIError) as info:
        parse_json_body(b" " * (LIMITS.max_body_bytes() + 1), LIMITS)
    assert info.value.status == 413
    with pytest.raises(APIError) as info:  # 100,000 deep: refused before the parser recurses
        parse_json_body(b"[" * 100_000 + b"]" * 100_000, LIMITS)
    assert (info.value.status, info.value.code) == (400, "invalid_json")


def test_json_nesting_depth_ignores_brackets_in_strings():
    assert json_nesting_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_nesting_depth(b'{"a": "[[[[{{{{", "b": "\\\\", "c": "\\"]"}') == 1  # in strings, escapes too
    assert json_nesting_depth(b'{"a": "x\\\\"}') == 1 and json_nesting_depth(b'"[[["') == 0
    assert json_nesting_depth(b"[" * 40) == 40


def test_host_origin_and_content_type_checks():
    loop = default_allowed_hosts("127.0.0.1")
    assert loop == ["localhost", "127.0.0.1", "::1"] and default_allowed_hosts("0.0.0.0") == ["*"]
    for host in ("127.0.0.1:8000", "localhost", "[::1]:9", "LOCALHOST:1"):
        assert host_allowed(host, loop), host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "", None):
        assert not host_allowed(host, loop), host
    check_host_and_origin({"host": "127.0.0.1:8000", "origin": "http://localhost:8000"}, loop)
    check_host_and_origin({"host": "anything"}, ["*"])
    for headers, code in (({"host": "evil.example"}, "host_not_allowed"),
                          ({"host": "127.0.0.1", "origin": "http://evil.example"}, "origin_not_allowed"),
                          ({"host": "127.0.0.1", "origin": "null"}, "origin_not_allowed")):
        with pytest.raises(APIError) as info:
            check_host_and_origin(headers, loop)
        assert (info.value.status, info.value.code) == (403, code)
    check_content_type({"content-type": "application/json; charset=utf-8"})
    for value in ("text/plain", "application/x-www-form-urlencoded", "", "multipart/form-data; boundary=x"):
        with pytest.raises(APIError) as info:
            check_content_type({"content-type": value} if value else {})
        assert info.value.status == 415


# ----------------------------------------------------------------------------------------------------------
# Reply text, calculator calls, stop strings (pure)


def special_ids(tokenizer):
    return {name: tokenizer.encode_special(f"<|{name}|>") for name in
            ("python_start", "python_end", "output_start", "output_end", "assistant_end", "bos", "user_start")}


def test_completion_text_incremental_and_calculator(tokenizer):
    s = special_ids(tokenizer)
    text = "Café 日本 🙂 ok"
    tokens = tokenizer.encode(text)
    ct = CompletionText(tokenizer)
    pieces = [ct.add(t) for t in tokens] + [ct.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    # a call with a result, a call without one, and a stray special token (dropped)
    seq = (tokenizer.encode("So ") + [s["python_start"]] + tokenizer.encode("12/3") + [s["python_end"],
           s["output_start"]] + tokenizer.encode("4") + [s["output_end"]] + tokenizer.encode(" and ")
           + [s["python_start"]] + tokenizer.encode("x+1") + [s["python_end"], s["user_start"]]
           + tokenizer.encode(" done"))
    ct = CompletionText(tokenizer)
    out = "".join(ct.add(t) for t in seq) + ct.finish()
    assert out == "So <<12/3=4>> and <<x+1>> done"
    assert assistant_message_parts(out) == [
        {"type": "text", "text": "So "}, {"type": "python", "text": "12/3"}, {"type": "python_output", "text": "4"},
        {"type": "text", "text": " and "}, {"type": "python", "text": "x+1"}, {"type": "text", "text": " done"}]
    assert assistant_message_parts("no calls") == "no calls"


def test_stop_scanner_holds_back_only_possible_prefixes():
    sc = StopScanner(["END", "xy"])
    assert sc.push("abc E") == ("abc ", False)  # "E" could start "END"
    assert sc.push("N") == ("", False)
    assert sc.push("Dtail") == ("", True)
    assert sc.push("more") == ("", True) and sc.flush() == ""
    sc = StopScanner(["END"])
    assert sc.push("aEN") == ("a", False) and sc.push("d") == ("ENd", False) and sc.flush() == ""
    sc = StopScanner(["END"])
    assert sc.push("aE") == ("a", False) and sc.flush() == "E"
    assert StopScanner([]).push("END") == ("END", False)


class ScriptedEngine:
    """Yields fixed token rows (one list per sample), like Engine.generate, and records its arguments."""

    def __init__(self, rows):
        self.rows, self.calls, self.closed = rows, [], False

    def generate(self, tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
        self.calls.append(dict(num_samples=num_samples, max_tokens=max_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed))
        try:
            for step in range(max_tokens):
                yield [row[step] if step < len(row) else row[-1] for row in self.rows], [1] * len(self.rows)
        finally:
            self.closed = True


def chat_request(**kw):
    base = dict(messages=[user("hi")], temperature=0.0, top_k=0, top_p=1.0, max_tokens=50)
    base.update(kw)
    return ChatRequest(**base)


def test_generate_completion_finish_reasons_usage_and_stop(tokenizer):
    s = special_ids(tokenizer)
    a, b = tokenizer.encode("hello there"), tokenizer.encode("one two three four")
    engine = ScriptedEngine([a + [s["assistant_end"]], b])
    events = []
    result = generate_completion(engine, tokenizer, [1, 2, 3], chat_request(n=2, max_tokens=len(b), seed=7),
                                 emit=lambda *e: events.append(e))
    assert result.texts == ["hello there", "one two three four"]
    assert result.finish_reasons == ["stop", "length"]
    assert result.completion_tokens == len(a) + len(b) and result.prompt_tokens == 3
    assert engine.calls[0]["num_samples"] == 2 and engine.calls[0]["seed"] == 7 and engine.closed
    assert ("finish", 0, "stop") in events and ("finish", 1, "length") in events
    assert "".join(e[2] for e in events if e[0] == "delta" and e[1] == 1) == "one two three four"
    # a stop string ends the reply early, its text excluded
    engine = ScriptedEngine([b + [s["assistant_end"]]])
    result = generate_completion(engine, tokenizer, [1], chat_request(stop=[" three"]))
    assert result.texts == ["one two"] and result.finish_reasons == ["stop"]
    assert result.completion_tokens < len(b)


def test_generate_completion_cancel_stops_at_next_token(tokenizer):
    engine = ScriptedEngine([tokenizer.encode("a b c d e f g h")])
    cancel = threading.Event()
    seen = []

    def emit(*event):
        seen.append(event)
        cancel.set()  # the client goes away after the first piece of text

    result = generate_completion(engine, tokenizer, [1], chat_request(), emit=emit, cancel=cancel)
    assert result.cancelled and result.completion_tokens == 1 and engine.closed
    assert not any(e[0] == "finish" for e in seen)


def test_engine_top_p_keeps_the_nucleus():
    from nanochat.engine import sample_next_token

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    rng = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, rng, 1.0, None, 0.75)[0, 0].item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.75: the nucleus is the first two
    draws = {sample_next_token(logits, rng, 1.0, 3, 0.99)[0, 0].item() for _ in range(300)}
    assert draws == {0, 1, 2}
    assert {sample_next_token(logits, rng, 1.0, None, 0.1)[0, 0].item() for _ in range(50)} == {0}


# ----------------------------------------------------------------------------------------------------------
# The server, end to end


def make_web_checkpoint(base_dir, tokenizer, sequence_len=2048):
    """tests/tiny_checkpoint.py's tiny random GPT (2 layers, width 64) as an SFT checkpoint, re-saved with zero
    output weights for the special tokens and large ones for the others: replies never end by themselves (no
    <|assistant_end|>) and make no tool calls, so stop, max_tokens and cancellation are what end them, and a
    reply is long enough to stop mid-stream. Loaded and saved only through checkpoint_manager's public API."""
    from nanochat.checkpoint_manager import load_model, save_checkpoint

    checkpoint_dir = make_tiny_checkpoint(base_dir, tokenizer, source="sft", sequence_len=sequence_len)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", base_dir)
        model, _, meta = load_model("sft", "cpu", phase="eval")
    specials = [tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()]
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.6)  # logits ~ N(0, 5): ordinary tokens dominate
        model.lm_head.weight[specials] = 0.0
    save_checkpoint(checkpoint_dir, meta["step"], model.state_dict(), None, meta)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base_dir, *extra, timeout=60):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("NANOCHAT_API_KEY", None)
        self.log_path = os.path.join(str(base_dir), f"server_{self.port}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--device_type", "cpu",
                                      "--port", str(self.port), *extra], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not up after {timeout}s:\n{self.output()}")

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def stats(self, **kw):
        return requests.get(self.url + "/stats", timeout=5, **kw).json()

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("web_base")
    make_web_checkpoint(str(path), tokenizer)
    return path


@pytest.fixture(scope="module")
def server(base_dir):
    srv = Server(base_dir, "--max_queue", "64", "-m", "32", "--num_workers", "2",  # two workers share the model
                 "--header_timeout", "2", "--body_timeout", "2")  # short, so the slow-client tests stay short
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()  # no idle keep-alive connection for the server's shutdown to wait for


CONVERSATION = [{"role": "system", "content": "You are terse."}, user("What is 2+2?"),
                {"role": "assistant", "content": "It is <<2+2=4>> 4."}, user("And 3+3?")]


def test_openai_client_greedy_equals_engine_and_usage(server, client, base_dir, monkeypatch):
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from nanochat.web import CompletionText

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    model, tokenizer, _ = load_model("sft", "cpu", phase="eval")
    conversation = {"messages": [dict(m, content=assistant_message_parts(m["content"])) for m in CONVERSATION]}
    prompt = tokenizer.render_for_completion(conversation)
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=24, temperature=0.0)
    reply = CompletionText(tokenizer)
    expected = "".join(reply.add(t) for t in results[0][len(prompt):]) + reply.finish()
    assert expected.strip() and expected == tokenizer.decode(results[0][len(prompt):])  # no special tokens here

    models = client.models.list()
    assert [m.id for m in models.data] == ["nanochat-sft-d2-step0"]
    out = client.chat.completions.create(model=models.data[0].id, messages=CONVERSATION, temperature=0,
                                         max_tokens=24)
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "length" and out.model == "nanochat-sft-d2-step0"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (len(prompt), 24, len(prompt) + 24)

    stream = client.chat.completions.create(model="any", messages=CONVERSATION, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # streamed in pieces
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == len(prompt)


def test_raw_stream_ends_with_done(server):
    with requests.post(server.url + "/v1/chat/completions", json={"messages": [user("hi")], "stream": True,
                                                                  "max_tokens": 5}, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    with requests.post(server.url + "/v1/chat/completions", stream=True, timeout=60,
                       json={"messages": [user("hi")], "stream": True, "max_tokens": 4, "n": 2}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks:
        choice = chunk["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert all(texts) and reasons == ["length", "length"]


def test_n_seed_and_stop(server, client):
    out = client.chat.completions.create(model="m", messages=[user("Tell me a story")], n=2, temperature=1.0,
                                         max_tokens=16, seed=123)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content != out.choices[1].message.content  # each row samples on its own
    assert out.usage.completion_tokens == 32
    again = client.chat.completions.create(model="m", messages=[user("Tell me a story")], n=2, temperature=1.0,
                                           max_tokens=16, seed=123)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]

    full = client.chat.completions.create(model="m", messages=[user("hello")], temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    cut = client.chat.completions.create(model="m", messages=[user("hello")], temperature=0, max_tokens=24,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 24
    streamed = client.chat.completions.create(model="m", messages=[user("hello")], temperature=0, max_tokens=24,
                                              stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


HTTP_BAD = [  # (raw body or JSON body, status, code); each is followed by a good request
    (b"{not json", 400, "invalid_json"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_role"),
    ({"messages": []}, 400, "empty_messages"),
    ({"messages": [user("a"), user("b")]}, 400, "invalid_conversation"),
    ({"messages": [user("a")] * 501}, 413, "too_many_messages"),
    ({"messages": [user("x" * 8001)]}, 413, "message_too_long"),
    ({"messages": [user("7 " * 3000)]}, 400, "context_length_exceeded"),
    ({"messages": [user("a")], "temperature": 3}, 400, "out_of_range"),
    ({"messages": [user("a")], "top_k": 500}, 400, "out_of_range"),
    ({"messages": [user("a")], "max_tokens": 5000}, 400, "out_of_range"),
    ({"messages": [user("a")], "max_tokens": "ten"}, 422, "invalid_type"),
    ({"messages": [{"role": "user", "content": {"text": "a"}}]}, 422, "invalid_type"),
]


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server):
    url = server.url + "/v1/chat/completions"
    for body, status, code in HTTP_BAD:
        kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = requests.post(url, timeout=30, **kw)
        assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]
        assert "Traceback" not in r.text
        ok = requests.post(url, json={"messages": [user("hi")], "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    r = requests.post(url, data=b"x" * (Limits().max_body_bytes() + 1), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = requests.get(server.url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and "error" in r.json()


def stream_text(url, body, headers=None):
    with requests.post(url + "/v1/chat/completions", json=dict(body, stream=True), stream=True, timeout=120,
                       headers=headers) as r:
        assert r.status_code == 200, r.text
        text, reason, done = "", None, False
        for line in r.iter_lines(decode_unicode=True):
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                reason = choice["finish_reason"] or reason
    return text, reason, done


def test_sixteen_concurrent_streams_all_complete(server):
    before = server.stats()["requests_served"]
    body = {"messages": [user("Count with me")], "temperature": 0, "max_tokens": 12}
    expected = stream_text(server.url, body)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: stream_text(server.url, body), range(16)))
    assert all(r == expected for r in results) and expected[1] == "length" and expected[2]
    stats = server.stats()
    assert stats["requests_served"] == before + 17 and stats["workers"] == 2 and stats["queued_requests"] == 0
    assert stats["tokens_per_second"] > 0


def test_serve_load_benchmark_runs_clean(server):
    from bench.serve_load import percentile, run_level

    assert percentile([3, 1, 2, 4], 0.5) == 2.5 and percentile([5], 0.95) == 5
    r = run_level(server.url, {}, concurrency=2, num_requests=4, max_tokens=8, temperature=0.8, time_limit=60,
                  request_timeout=60)
    assert r["completed"] == 4 and r["errors"] == {} and r["ttft_p95_s"] >= r["ttft_p50_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(4 * 8 / r["wall_s"])


def test_disconnect_frees_the_worker(server):
    before = server.stats()
    with requests.post(server.url + "/v1/chat/completions", stream=True, timeout=60,
                       json={"messages": [user("go on")], "stream": True, "max_tokens": 2000}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.stats()["busy_workers"] == 1  # still generating
    # the connection is closed mid-stream; the worker stops at its next token and serves the next request
    deadline = time.time() + 30
    while server.stats()["requests_cancelled"] == before["requests_cancelled"] and time.time() < deadline:
        time.sleep(0.1)
    stats = server.stats()
    assert stats["requests_cancelled"] == before["requests_cancelled"] + 1 and stats["busy_workers"] == 0
    assert stats["tokens_generated"] - before["tokens_generated"] < 1500  # it did not run to max_tokens
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [user("hi")], "max_tokens": 3},
                      timeout=30)
    assert r.status_code == 200


@pytest.fixture(scope="module")
def keyed_server(base_dir):
    """A second server: an API key, and a queue of one request (one worker)."""
    srv = Server(base_dir, "--api_key", "s3cret", "--max_queue", "1", "--host", "127.0.0.1")
    yield srv
    srv.stop()


KEY = {"Authorization": "Bearer s3cret"}


def test_api_key_required(keyed_server):
    srv = keyed_server
    url = srv.url + "/v1/chat/completions"
    body = {"messages": [user("hi")], "max_tokens": 2}
    r = requests.post(url, json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert requests.get(srv.url + "/v1/models", timeout=5).status_code == 401
    assert requests.get(srv.url + "/stats", timeout=5).status_code == 401
    assert requests.post(url, json=body, headers=KEY, timeout=30).status_code == 200
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
    assert client.chat.completions.create(model="m", messages=[user("hi")], max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert requests.get(srv.url + "/health", timeout=5).status_code == 200  # liveness stays open
    assert "reachable from the network" not in srv.output()


def test_non_streaming_client_that_gives_up_frees_the_worker(server):
    before = server.stats()
    with pytest.raises(requests.Timeout):
        requests.post(server.url + "/v1/chat/completions", timeout=(5, 0.3),
                      json={"messages": [user("go on")], "max_tokens": 2000})
    deadline = time.time() + 30
    while server.stats()["requests_cancelled"] == before["requests_cancelled"] and time.time() < deadline:
        time.sleep(0.1)
    stats = server.stats()
    assert stats["requests_cancelled"] == before["requests_cancelled"] + 1 and stats["busy_workers"] == 0
    assert stats["tokens_generated"] - before["tokens_generated"] < 1500


def test_max_queue_gives_503_to_the_excess(keyed_server):
    srv = keyed_server
    body = {"messages": [user("a short answer")], "max_tokens": 5, "temperature": 0}
    first = requests.post(srv.url + "/v1/chat/completions", stream=True, timeout=60, headers=KEY,
                          json=dict(body, stream=True, max_tokens=2000))
    first_lines = first.iter_lines()  # kept: dropping the iterator closes the connection
    next(first_lines)  # the only worker is busy for a while
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(requests.post, srv.url + "/v1/chat/completions", json=body, headers=KEY,
                               timeout=60) for _ in range(2)]
        t0 = time.time()
        codes = []
        for f in concurrent.futures.as_completed(futures):
            r = f.result()
            codes.append(r.status_code)
            if r.status_code == 503:
                assert time.time() - t0 < 5 and r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "server_busy"
                first.close()  # the waiting request gets the worker
    assert sorted(codes) == [200, 503]
    assert requests.get(srv.url + "/stats", headers=KEY, timeout=5).json()["requests_rejected"] == 1


def test_bad_options_exit_2(base_dir, monkeypatch):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    p = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--max_queue", "-1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("error: command line --max_queue: key 'max_queue' must be >= 0, got -1")
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its handler on import
    from nanochat.common import UserError
    from scripts.chat_web import main

    for args, match in ((["-t", "5"], "-t/--temperature: key 'temperature' must be <= 2.0"),
                        (["--num_workers", "0"], "num_workers"), (["--port", "70000"], "'port' must be <= 65535"),
                        (["-m", "5000"], "max_tokens: 5000 is above max_max_tokens = 4096"),
                        (["-i", "grpo"], "'source' must be one of 'base', 'mid', 'sft', 'rl', 'dpo', got 'grpo'"),
                        (["-k", "201"], "'top_k' must be <= 200"), (["--api_key", " "], "api_key")):
        with pytest.raises(UserError, match=match):
            main(args)


# The tiny model writes 2,000 tokens in about 3 s here. A Stop clicked from Python after waiting for some text
# (two round trips to the browser) can land after the reply has ended on a loaded machine (CI failed so once),
# so the tests stop a reply from inside the page: the click or Esc is dispatched in the same JavaScript turn
# that shows the text, while the server still has most of the reply to write.
STOP_IN_PAGE = """([index, minChars, how]) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error('reply ' + index + ' never reached ' + minChars + ' chars')), 30000);
  const attempt = () => {
    const reply = document.querySelectorAll('.message.assistant')[index];
    if (!reply || (reply.dataset.text || '').length <= minChars) return false;
    const button = document.getElementById('stop');
    const seen = {state: reply.dataset.state, usable: !button.disabled && button.offsetParent !== null};
    if (how === 'click') button.click();
    else document.activeElement.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
    clearTimeout(timer);
    resolve(seen);
    return true;
  };
  if (attempt()) return;
  const observer = new MutationObserver(() => { if (attempt()) observer.disconnect(); });
  observer.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
})"""


def stop_mid_reply(page, index, how="click", min_chars=20):
    """Stop the index-th assistant reply with the Stop button (how="click") or Esc (how="escape") once it shows
    more than min_chars characters; the button was visible and enabled then, and the reply still streaming."""
    seen = page.evaluate(STOP_IN_PAGE, [index, min_chars, how])
    assert seen == {"state": "streaming", "usable": True}, seen


# ----------------------------------------------------------------------------------------------------------
# The chat page in a real headless Chromium


def test_browser_chat_stop_new_conversation(server, tmp_path):
    assert shutil.which("chromium") or os.path.exists(CHROMIUM), \
        "Debian's chromium is missing: apt-get install -y chromium (.ci/run installs it)"
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_have_text("nanochat-sft-d2-step0")
            page.click("#toggle-settings")  # temperature, max tokens, API key, system prompt
            # a short first turn that runs to its end
            page.fill("#max-tokens", "8")
            page.fill("#input", "Hello there")
            page.press("#input", "Enter")
            first = page.locator(".message.assistant").nth(0)
            expect(first).to_have_attribute("data-state", "done", timeout=30000)
            assert first.inner_text().strip()
            expect(page.locator("#regenerate")).to_be_enabled()
            # a long second turn: text streams in, then Stop cancels it on the server
            cancelled = server.stats()["requests_cancelled"]
            page.fill("#max-tokens", "2000")
            page.fill("#input", "Tell me more")
            page.click("#send")
            second = page.locator(".message.assistant").nth(1)
            stop_mid_reply(page, 1, "click")
            expect(second).to_have_attribute("data-state", "stopped")
            expect(second).to_contain_text("(stopped)")
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#stop")).to_be_disabled()
            deadline = time.time() + 20
            while server.stats()["requests_cancelled"] == cancelled and time.time() < deadline:
                time.sleep(0.1)
            assert server.stats()["requests_cancelled"] == cancelled + 1  # the server stopped generating
            assert page.locator(".message").count() == 4
            page.click("#regenerate")  # replaces the stopped answer with a new one
            stop_mid_reply(page, 1, "click")
            expect(page.locator(".message.assistant").nth(1)).to_have_attribute("data-state", "stopped")
            assert page.locator(".message").count() == 4
            # calculator calls are shown as distinct boxes (the tiny model never makes one: render one directly)
            page.evaluate("addMessage('assistant', 'It is <<12*3=36>> and <<2**>> then')")
            boxes = page.locator(".message.assistant").nth(2).locator(".tool-call")
            expect(boxes).to_have_count(2)
            expect(boxes.nth(0)).to_have_text("calculator12*3 = 36")
            expect(boxes.nth(1)).to_contain_text("no result")
            page.screenshot(path=str(tmp_path / "chat_web.png"))
            # a readable error: temperature out of range
            page.fill("#temperature", "9")
            page.fill("#input", "again")
            page.click("#send")
            expect(page.locator("#error")).to_contain_text("Error 400")
            expect(page.locator("#error")).to_contain_text("temperature")
            # new conversation: empty page, no error, and it works again
            page.click("#new")
            assert page.locator(".message").count() == 0
            expect(page.locator("#error")).to_be_hidden()
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "6")
            page.fill("#input", "New start")
            page.press("#input", "Enter")
            expect(page.locator(".message.assistant").nth(0)).to_have_attribute("data-state", "done", timeout=30000)
            assert page.locator(".message").count() == 2
            assert os.path.getsize(tmp_path / "chat_web.png") > 1000
        finally:
            browser.close()


HOSTILE = ("# Title\nSome **bold** and *italic* and `inline <b>code</b>`.\n\n- one\n- two <img src=x onerror="
           "\"window.__pwned=1\">\n\n1. first\n2. second\n\n```python\ndef f():\n    return '<script>window.__pwned=2"
           "</script>'\n```\n\n<script>window.__pwned=3</script> [safe](https://example.com) "
           "[bad](javascript:window.__pwned=4) <<6*7=42>>")


def sse_reply(text, pieces=7):
    """An OpenAI stream (server-sent events) carrying `text` in a few deltas, as the server sends it."""
    step = -(-len(text) // pieces)
    chunks = [{"choices": [{"index": 0, "delta": {"content": text[i:i + step]}, "finish_reason": None}]}
              for i in range(0, len(text), step)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def artifacts_dir():
    """Where the browser tests leave their screenshots for review (git-ignored)."""
    path = os.environ.get("NANOCHAT_TEST_ARTIFACTS", os.path.join(REPO, "test-artifacts"))
    os.makedirs(path, exist_ok=True)
    return path


def test_browser_markdown_system_prompt_history_layout(server):
    from playwright.sync_api import expect, sync_playwright

    assert requests.get(server.url + "/favicon.ico", timeout=5).headers["content-type"].startswith("image/svg+xml")
    info = requests.get(server.url + "/info", timeout=5).json()
    assert info["context_length"] == 2048 and info["defaults"]["max_tokens"] == 32
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_have_text("nanochat-sft-d2-step0")
            page.click("#toggle-settings")
            page.fill("#max-tokens", "999999")  # clamped to the context (2048 - 1) and the server's limit
            page.locator("#max-tokens").dispatch_event("change")
            assert page.input_value("#max-tokens") == "2047"
            # the system prompt reaches the server as the first message (the request is checked as sent)
            page.fill("#system", "You are terse.")
            page.fill("#max-tokens", "6")
            page.fill("#temperature", "0")
            with page.expect_request("**/v1/chat/completions") as request:
                page.fill("#input", "Hello there")
                page.press("#input", "Enter")
            sent = json.loads(request.value.post_data)
            assert sent["messages"] == [{"role": "system", "content": "You are terse."},
                                        {"role": "user", "content": "Hello there"}] and sent["max_tokens"] == 6
            first = page.locator(".message.assistant").nth(0)
            expect(first).to_have_attribute("data-state", "done", timeout=30000)
            answer = first.get_attribute("data-text")
            assert answer
            # reload: the conversation and its system prompt come back from localStorage
            page.reload()
            expect(page.locator(".message")).to_have_count(2)
            assert page.locator(".message.assistant").get_attribute("data-text") == answer
            page.click("#toggle-settings")
            assert page.input_value("#system") == "You are terse."
            expect(page.locator("#conversations li")).to_have_count(1)
            expect(page.locator("#conversations li.active .title")).to_have_text("Hello there")
            # hostile markdown (a scripted reply): rendered as structure, never as HTML or script
            page.route("**/v1/chat/completions", lambda route: route.fulfill(
                status=200, headers={"Content-Type": "text/event-stream"}, body=sse_reply(HOSTILE)))
            page.click("#new")
            page.fill("#input", "show me markdown")
            page.click("#send")
            reply = page.locator(".message.assistant").nth(0)
            expect(reply).to_have_attribute("data-state", "done")
            body = reply.locator(".body")
            expect(body.locator("h2")).to_have_text("Title")
            expect(body.locator("strong")).to_have_text("bold")
            expect(body.locator("em")).to_have_text("italic")
            expect(body.locator("p code")).to_have_text("inline <b>code</b>")
            expect(body.locator("ul li")).to_have_count(2)
            expect(body.locator("ol li")).to_have_count(2)
            expect(body.locator(".codeblock pre code")).to_have_text(
                "def f():\n    return '<script>window.__pwned=2</script>'")
            expect(body.locator(".codeblock .bar")).to_contain_text("python")
            expect(body.locator(".tool-call")).to_have_text("calculator6*7 = 42")
            assert body.locator("img, script, b, iframe").count() == 0
            links = body.locator("a")
            expect(links).to_have_count(1)
            assert links.get_attribute("href") == "https://example.com"
            assert page.evaluate("window.__pwned") is None
            assert "javascript:window.__pwned=4" in body.inner_text()  # shown as text, not a link
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
            body.locator(".codeblock button.copy").click()
            assert page.evaluate("navigator.clipboard.readText()").startswith("def f():")
            reply.locator(".actions button.copy").click()
            assert page.evaluate("navigator.clipboard.readText()") == HOSTILE
            page.unroute("**/v1/chat/completions")
            # two conversations in the list: switch back, delete one
            expect(page.locator("#conversations li")).to_have_count(2)
            page.locator("#conversations li .title", has_text="Hello there").click()
            expect(page.locator(".message")).to_have_count(2)
            page.screenshot(path=os.path.join(artifacts_dir(), "chat_web_1280.png"))
            page.locator("#conversations li", has_text="show me markdown").locator(".delete").click()
            expect(page.locator("#conversations li")).to_have_count(1)
            # Esc stops a running answer
            page.fill("#max-tokens", "2000")
            page.fill("#input", "Tell me more")
            page.press("#input", "Enter")
            streaming = page.locator(".message.assistant").nth(1)
            stop_mid_reply(page, 1, "escape", min_chars=10)
            expect(streaming).to_have_attribute("data-state", "stopped")
            # a phone: the input keeps at least half the width, and the conversation list is one tap away
            page.set_viewport_size({"width": 360, "height": 740})
            box = page.locator("#input").bounding_box()
            assert box["width"] >= 180, box
            page.screenshot(path=os.path.join(artifacts_dir(), "chat_web_360.png"))
            expect(page.locator("#sidebar")).to_be_hidden()
            page.click("#toggle-sidebar")
            expect(page.locator("#sidebar")).to_be_visible()
            for name in ("chat_web_1280.png", "chat_web_360.png"):
                assert os.path.getsize(os.path.join(artifacts_dir(), name)) > 1000
        finally:
            browser.close()


# ----------------------------------------------------------------------------------------------------------
# Hostile clients (issue 24): chunked bodies, half-open and slow connections, deep JSON, foreign Host/Origin


def raw_request(port, data, read_timeout=10.0):
    """Send raw bytes, then read until the server closes (or read_timeout); returns what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def test_chunked_body_is_bounded_while_it_streams(server):
    limit = Limits().max_body_bytes()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"x" * 65536
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head)
        s.settimeout(0.05)
        while sent < 20 * limit and not reply:  # at most ~8 MB: the server must answer long before
            try:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
                reply = s.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        s.settimeout(10)
        try:
            reply += s.recv(65536)
        except (OSError, socket.timeout):
            pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent <= limit + 4 * len(chunk) + 2 ** 20, f"the server read {sent} bytes before refusing"  # not all of it


def test_half_open_and_slow_connections_are_closed(server):
    port = server.port
    sockets = []
    try:
        for i in range(60):  # bounded: 60 connections, each holds a partial request
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 3 == 0:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never end
            elif i % 3 == 1:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"")  # body never ends
            sockets.append(s)  # i % 3 == 2: connected, nothing sent
        t0 = time.time()
        assert requests.get(server.url + "/health", timeout=5).status_code == 200  # still answering
        closed = 0
        for s in sockets:
            s.settimeout(max(0.1, 8 - (time.time() - t0)))  # header/body timeouts are 2 s here
            try:
                while s.recv(65536):
                    pass
                closed += 1
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == len(sockets), f"{len(sockets) - closed} of {len(sockets)} slow connections left open"
        assert time.time() - t0 < 8
    finally:
        for s in sockets:
            s.close()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert "Traceback" not in server.output()


def test_deep_json_foreign_host_and_cross_site_posts_are_refused(server):
    url = server.url + "/v1/chat/completions"
    r = requests.post(url, data=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    body = json.dumps({"messages": [user("hi")], "max_tokens": 2})
    r = requests.post(url, data=body, headers={"Content-Type": "text/plain"}, timeout=30)  # a "simple" CORS request
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = requests.post(url, data=body, headers={"Content-Type": "application/json", "Origin": "http://evil.example"},
                      timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = requests.get(server.url + "/v1/models", headers={"Host": "evil.example"}, timeout=5)  # DNS rebinding
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = requests.post(url, data=body, headers={"Content-Type": "application/json",
                                               "Origin": f"http://127.0.0.1:{server.port}"}, timeout=30)
    assert r.status_code == 200  # the page's own origin
    assert "Traceback" not in server.output() and "RecursionError" not in server.output()
