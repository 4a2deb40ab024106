"""
The reusable parts of `scripts/chat_web.py`, the web chat and OpenAI-compatible API server (one concern, the
request -> reply path, about 680 lines: over the house ~450, split where a part stands alone: connection and
request guards are nanochat/web_guard.py):

- `Limits` and `validate_chat_request(body, limits, defaults)`: a parsed JSON body -> `ChatRequest`, or an
  `APIError` carrying the HTTP status and OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
  Status codes: 400 for malformed JSON and invalid values (unknown role, non-alternating or empty messages,
  out-of-range numbers, a prompt longer than the model's context), 413 for requests over the size limits
  (too many messages, a message or the whole conversation too long, a body too large), 422 for wrong types.
- `CompletionText`: generated token ids -> the reply text, decoded incrementally (a character split across
  tokens is emitted whole). A calculator call appears in the text as `<<expr=result>>` (the notation GSM8K's
  solutions use), or `<<expr>>` when the calculator could not evaluate it; `assistant_message_parts` turns
  that text back into the tokenizer's python / python_output parts when it comes back as history.
- `StopScanner`: applies `stop` strings to streamed text, holding back only what could begin a stop string.
- `generate_completion(...)`: one request's generation with `nanochat.engine.Engine` (sampling, KV cache and
  the calculator tool are the Engine's), `n` choices as one batch, reporting deltas and finish reasons to a
  callback and stopping at the next token once `cancel` is set (a client that went away).
- `WorkerPool`: one worker per device, a bounded wait queue (`QueueFull` beyond it), counters for /stats.
- `completion_response`, `completion_chunk`, `sse`: OpenAI's response / chunk JSON and server-sent events.

Tests: tests/test_chat_web.py (pure functions here, and the server end to end with the openai client and a
headless Chromium).
"""

import asyncio
import json
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
               'fill="#0b57d0"/><path d="M8 23V9h3l7 9V9h3v14h-3l-7-9v9z" fill="#fff"/></svg>')  # the page's icon

# ----------------------------------------------------------------------------------------------------------
# Request limits and validation

ROLES = ("system", "user", "assistant")


@dataclass
class Limits:
    """Request limits; the defaults are nanochat's chat_web "abuse prevention limits"."""
    max_messages: int = 500  # messages per request
    max_message_chars: int = 8000  # characters per message
    max_total_chars: int = 32000  # characters of the whole conversation
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    min_top_k: int = 0  # 0 = no top-k filtering (nanochat's later chat_web; its first version had 1)
    max_top_k: int = 200
    min_max_tokens: int = 1
    max_max_tokens: int = 4096
    max_n: int = 16  # choices per request (one batch on one worker)
    max_stop: int = 4  # stop strings per request, as OpenAI
    context_len: int = 2048  # the model's sequence_len: the prompt must be shorter

    def max_body_bytes(self):
        """Bodies above this are refused unread (413): the conversation at 4 UTF-8 bytes per character,
        doubled for JSON escapes, plus room for the per-message JSON and the other fields."""
        return 8 * self.max_total_chars + 200 * self.max_messages + 64 * 1024


@dataclass
class SamplingDefaults:
    """What a request gets for the fields it leaves out (the server's -t / -k / -m options)."""
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


@dataclass
class ChatRequest:
    messages: list  # normalized for RustBPETokenizer.render_for_completion: [{"role", "content"}, ...]
    temperature: float
    top_k: int
    top_p: float
    max_tokens: int
    n: int = 1
    seed: int = None  # None: a fresh random seed per request
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    model: str = None


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self):
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message, type="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _type_name(value):
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _wrong_type(param, expected, value):
    return APIError(422, f"'{param}' must be {expected}, got {_type_name(value)}", param, "invalid_type")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _number(body, name, default, low, high, integer=False, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if integer and not _is_int(value):
        raise _wrong_type(name, "an integer", value)
    if not integer and not _is_number(value):
        raise _wrong_type(name, "a finite number", value)
    if value < low or value > high or (low_open and value == low):
        low_text = f"> {low}" if low_open else f">= {low}"
        raise APIError(400, f"'{name}' must be {low_text} and <= {high}, got {value}", name, "out_of_range")
    return value


def message_text(i, message):
    """The text of message i: a string, or OpenAI's list of content parts ({"type": "text", "text": ...})."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(422, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": "
                               f"...}}) are supported", f"messages[{i}].content", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise _wrong_type(f"messages[{i}].content", "a string or a list of text parts", content)


def validate_chat_request(body, limits, defaults):
    """A parsed JSON body of POST /v1/chat/completions -> ChatRequest; raises APIError (see module doc).
    The conversation rules (optional system first, then user/assistant alternating, ending with user) are
    RustBPETokenizer's, checked by nanochat.tokenizer.normalize_messages."""
    from nanochat.tokenizer import normalize_messages

    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}", None, "invalid_body")
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", "messages",
                       "missing_required_parameter")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of messages", messages)
    if not messages:
        raise APIError(400, "'messages' is empty: send at least one user message", "messages", "empty_messages")
    if len(messages) > limits.max_messages:
        raise APIError(413, f"too many messages: {len(messages)} (at most {limits.max_messages})", "messages",
                       "too_many_messages")
    clean, total_chars = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _wrong_type(f"messages[{i}]", "an object with 'role' and 'content'", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise _wrong_type(f"messages[{i}].role", "a string", role)
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})",
                           f"messages[{i}].role", "invalid_role")
        text = message_text(i, message)
        if len(text) > limits.max_message_chars:
            raise APIError(413, f"messages[{i}] is too long: {len(text)} characters (at most "
                           f"{limits.max_message_chars})", f"messages[{i}].content", "message_too_long")
        total_chars += len(text)
        content = assistant_message_parts(text) if role == "assistant" else text
        clean.append({"role": role, "content": content})
    if total_chars > limits.max_total_chars:
        raise APIError(413, f"the conversation is too long: {total_chars} characters (at most "
                       f"{limits.max_total_chars})", "messages", "conversation_too_long")
    try:
        normalize_messages({"messages": clean})
    except ValueError as e:
        raise APIError(400, str(e).replace("message ", "messages[", 1).replace(":", "]:", 1)
                       if str(e).startswith("message ") else str(e), "messages", "invalid_conversation") from None
    if clean[-1]["role"] != "user":
        raise APIError(400, f"the last message must be from the user (got {clean[-1]['role']!r}): the model "
                       "answers it", "messages", "invalid_conversation")

    temperature = _number(body, "temperature", defaults.temperature, limits.min_temperature, limits.max_temperature)
    top_k = _number(body, "top_k", defaults.top_k, limits.min_top_k, limits.max_top_k, integer=True)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    max_tokens = body.get("max_completion_tokens")  # OpenAI's newer name for max_tokens
    name = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    max_tokens = _number(body, name, defaults.max_tokens, limits.min_max_tokens, limits.max_max_tokens,
                         integer=True)
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    seed = _number(body, "seed", None, -2 ** 63, 2 ** 64 - 1, integer=True)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _wrong_type("stream_options", "an object", stream_options)
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _wrong_type("stream_options.include_usage", "a boolean", include_usage)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _wrong_type("stop", "a string or an array of strings", stop)
    if len(stop) > limits.max_stop:
        raise APIError(400, f"'stop' has {len(stop)} strings (at most {limits.max_stop})", "stop", "out_of_range")
    if any(s == "" for s in stop):
        raise APIError(400, "'stop' strings must not be empty", "stop", "invalid_value")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    return ChatRequest(messages=clean, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                       max_tokens=max_tokens, n=n, seed=seed, stop=stop, stream=stream,
                       include_usage=include_usage and stream, model=model)


def network_exposure_warning(host, api_key):
    """The warning to log when `host` is not a loopback address (the server is reachable from the network),
    else None."""
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"WARNING: listening on {host}: the server is reachable from the network"
            + (" (API key required)" if api_key else " by anyone: pass --api_key to require a key"))


def parse_json_body(raw, limits):
    """Request bytes -> parsed JSON (APIError 413 if too large, 400 if not UTF-8 JSON or nested deeper than
    web_guard.MAX_JSON_DEPTH)."""
    from nanochat.web_guard import MAX_JSON_DEPTH, json_nesting_depth

    if len(raw) > limits.max_body_bytes():
        raise APIError(413, f"the request body is {len(raw)} bytes (at most {limits.max_body_bytes()})", None,
                       "body_too_large")
    if json_nesting_depth(raw) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels", None,
                       "invalid_json")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None


def _reject_constant(name):  # json accepts NaN / Infinity, which are not JSON
    raise ValueError(f"{name} is not a JSON value")


def prompt_tokens(tokenizer, request, context_len):
    """The prompt ids for the request's conversation (APIError 400 if they do not leave room for a reply)."""
    ids = tokenizer.render_for_completion({"messages": request.messages})
    if len(ids) >= context_len:
        raise APIError(400, f"the conversation is {len(ids)} tokens; this model's context is {context_len} tokens "
                       "and the reply needs at least one: shorten the conversation or start a new one",
                       "messages", "context_length_exceeded")
    return ids


# ----------------------------------------------------------------------------------------------------------
# Generated tokens -> text (with the calculator calls in a readable form), and stop strings

TOOL_OPEN, TOOL_EQUALS, TOOL_CLOSE = "<<", "=", ">>"
_TOOL_CALL = re.compile(r"<<([^<>=]*?)(?:=([^<>]*?))?>>")


def assistant_message_parts(text):
    """An assistant reply as returned by this server -> the tokenizer's content: a plain string, or a list of
    text / python / python_output parts where the text has `<<expr=result>>` calculator calls."""
    if TOOL_OPEN not in text:
        return text
    parts, pos = [], 0
    for m in _TOOL_CALL.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        if m.group(2) is not None:
            parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if not parts:
        return text
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


class CompletionText:
    """Token ids of one reply -> its text, incrementally: `add(token)` returns the text that became visible.
    Ordinary tokens are decoded together so a character split across tokens appears once complete; the
    tool's special tokens become `<<`, `=`, `>>`; other special tokens (which a well-trained model does not
    emit inside a reply) are dropped."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.specials = {
            special(name) for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                       "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                                       "<|output_start|>", "<|output_end|>")}
        # hidden: the special tokens that are neither the tool's nor a reply's end (chat_cli keeps them out of
        # its history too)
        self.hidden = self.specials - {self.python_start, self.python_end, self.output_start, self.output_end}
        self.pending = []  # ordinary tokens not yet shown (they end inside a UTF-8 character)
        self.in_call = False  # between `<<` and its `>>`
        self.after_python_end = False  # `=` or `>>` depends on whether the tool's output follows
        self.text = ""  # everything returned so far

    def _flush(self, final):
        """The decoded pending tokens, unless (not final) they end inside a character: then wait for more. Once
        a run of tokens decodes to whole characters it is emitted and dropped, so decoding stays linear."""
        decoded = self.tokenizer.decode(self.pending) if self.pending else ""
        if not final and decoded.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.pending = []
        return decoded

    def add(self, token):
        out = ""
        if self.after_python_end and token != self.output_start:
            out += TOOL_CLOSE  # the calculator had no answer: the call shows as <<expr>>
            self.after_python_end = self.in_call = False
        if token not in self.specials:
            out += self._flush_after(token)
        else:
            out += self._flush(final=True)
            if token == self.python_start and not self.in_call:
                out += TOOL_OPEN
                self.in_call = True
            elif token == self.python_end and self.in_call:
                self.after_python_end = True
            elif token == self.output_start and self.after_python_end:
                out += TOOL_EQUALS
                self.after_python_end = False
            elif token == self.output_end and self.in_call:
                out += TOOL_CLOSE
                self.in_call = False
        self.text += out
        return out

    def _flush_after(self, token):
        self.pending.append(token)
        return self._flush(final=False)

    def finish(self):
        """The text still held back (an incomplete character; an unclosed tool call is closed)."""
        out = self._flush(final=True)
        if self.in_call:
            out += TOOL_CLOSE
            self.in_call = self.after_python_end = False
        self.text += out
        return out


class StopScanner:
    """Cuts streamed text at the first occurrence of any stop string. `push(text)` -> (text safe to emit,
    stopped); only a suffix that could be the start of a stop string is held back. `flush()` -> the rest."""

    def __init__(self, stops):
        self.stops = list(stops)
        self.held = ""
        self.stopped = False

    def push(self, text):
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out, True
        keep = 0  # the longest suffix of held that is a proper prefix of a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        out = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return out, False

    def flush(self):
        out, self.held = ("" if self.stopped else self.held), ""
        return out


# ----------------------------------------------------------------------------------------------------------
# One request's generation (runs in a worker thread)


@dataclass
class GenerationResult:
    texts: list
    finish_reasons: list
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    cancelled: bool = False


def generate_completion(engine, tokenizer, prompt, request, emit=None, cancel=None, autocast=None, seed=None):
    """Generate `request.n` replies to the prompt ids with the Engine, as one batch. For every piece of text
    that becomes visible, emit("delta", index, text); when a reply ends, emit("finish", index, reason) with
    reason "stop" (<|assistant_end|> or a stop string) or "length" (max_tokens, or the model's context).
    Checks `cancel` (a threading.Event) before each token. completion_tokens counts every token added to a
    reply (including the calculator's forced output) up to where it ended, not the final <|assistant_end|>."""
    import contextlib

    import torch

    emit = emit or (lambda *args: None)
    n = request.n
    from nanochat.chat_turn import reply_stop_tokens

    stop_tokens = reply_stop_tokens(tokenizer)
    texts = [CompletionText(tokenizer) for _ in range(n)]
    scanners = [StopScanner(request.stop) for _ in range(n)]
    outputs, finish, counts = [""] * n, [None] * n, [0] * n
    cancelled = False
    t0 = time.perf_counter()

    def put(i, text):
        if text:
            outputs[i] += text
            emit("delta", i, text)

    def end(i, reason):
        finish[i] = reason
        emit("finish", i, reason)

    with (autocast or contextlib.nullcontext()), torch.no_grad():
        generator = engine.generate(prompt, num_samples=n, max_tokens=request.max_tokens,
                                    temperature=request.temperature, top_k=request.top_k or None,
                                    top_p=request.top_p, seed=request.seed if seed is None else seed)
        try:
            for token_column, _ in generator:
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
                for i, token in enumerate(token_column):
                    if finish[i] is not None:
                        continue
                    if token in stop_tokens:
                        out, _ = scanners[i].push(texts[i].finish())
                        put(i, out + scanners[i].flush())
                        end(i, "stop")
                        continue
                    counts[i] += 1
                    out, stopped = scanners[i].push(texts[i].add(token))
                    put(i, out)
                    if stopped:
                        end(i, "stop")
                if all(f is not None for f in finish):
                    break
        finally:
            generator.close()  # frees the KV cache now, also when cancelled
    if not cancelled:  # the rows still open ran out of max_tokens
        for i in range(n):
            if finish[i] is None:
                out, stopped = scanners[i].push(texts[i].finish())
                put(i, out + scanners[i].flush())
                end(i, "stop" if stopped else "length")
    return GenerationResult(texts=outputs, finish_reasons=finish, prompt_tokens=len(prompt),
                            completion_tokens=sum(counts), seconds=time.perf_counter() - t0, cancelled=cancelled)


# ----------------------------------------------------------------------------------------------------------
# Worker pool with a bounded queue


class QueueFull(Exception):
    pass


@dataclass
class Worker:
    index: int
    engine: object
    tokenizer: object
    device: object
    autocast: object  # a callable returning a fresh autocast context


class WorkerPool:
    """Workers (one per device) handed out to requests. Requests that find no free worker wait, at most
    `max_queue` of them at a time; `acquire` raises QueueFull at once beyond that. Also keeps the counters
    shown by GET /stats. Use from one asyncio event loop; `release` may be called from any thread."""

    def __init__(self, workers, max_queue):
        self.workers = list(workers)
        self.max_queue = max_queue
        self.free = asyncio.Queue()
        for worker in self.workers:
            self.free.put_nowait(worker)
        self.waiting = 0
        self.loop = None
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests_served = 0
        self.requests_rejected = 0  # 503: the queue was full
        self.requests_cancelled = 0  # the client went away mid-generation
        self.tokens_generated = 0
        self.generation_seconds = 0.0

    async def acquire(self):
        self.loop = asyncio.get_running_loop()
        if self.free.empty() and self.waiting >= self.max_queue:
            self.requests_rejected += 1
            raise QueueFull()
        self.waiting += 1
        try:
            return await self.free.get()
        finally:
            self.waiting -= 1

    def release(self, worker):
        """Give a worker back; thread-safe (generation threads call it when they finish)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self.loop is None or running is self.loop:
            self.free.put_nowait(worker)
            return
        try:
            self.loop.call_soon_threadsafe(self.free.put_nowait, worker)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def record(self, result):
        with self.lock:
            self.tokens_generated += result.completion_tokens
            self.generation_seconds += result.seconds
            if result.cancelled:
                self.requests_cancelled += 1
            else:
                self.requests_served += 1

    def stats(self):
        with self.lock:
            busy = len(self.workers) - self.free.qsize()
            return {
                "workers": len(self.workers),
                "busy_workers": busy,
                "queued_requests": self.waiting,
                "max_queue": self.max_queue,
                "requests_served": self.requests_served,
                "requests_rejected": self.requests_rejected,
                "requests_cancelled": self.requests_cancelled,
                "tokens_generated": self.tokens_generated,
                "tokens_per_second": round(self.tokens_generated / self.generation_seconds, 2)
                if self.generation_seconds > 0 else 0.0,
                "uptime_seconds": round(time.time() - self.started, 1),
                "devices": sorted({str(w.device) for w in self.workers}),
            }


class Generation:
    """One request's generation on a worker thread, seen from asyncio: `events()` yields ("delta", i, text),
    ("finish", i, reason), then ("done", GenerationResult) or ("error", message). The thread gives the worker
    back to the pool when it ends; leaving `events()` early (the client disconnected) sets `cancel`, so the
    thread stops at the next token."""

    def __init__(self, pool, worker, prompt, request, seed):
        self.pool, self.worker = pool, worker
        self.cancel = threading.Event()
        self.queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, args=(prompt, request, seed), daemon=True,
                                       name=f"generation-worker{worker.index}")
        self.thread.start()

    def _put(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server shutdown): nobody is listening
            self.cancel.set()

    def _run(self, prompt, request, seed):
        try:
            if getattr(self.worker.device, "type", None) == "cuda":
                import torch

                torch.cuda.set_device(self.worker.device)  # this thread's kernels go to the worker's GPU
            result = generate_completion(self.worker.engine, self.worker.tokenizer, prompt, request,
                                         emit=self._put, cancel=self.cancel, autocast=self.worker.autocast(),
                                         seed=seed)
            self.pool.record(result)
            self._put("done", result)
        except Exception as e:  # reported to the client as a server error; the worker stays usable
            self._put("error", f"{type(e).__name__}: {e}")
        finally:
            self.pool.release(self.worker)

    async def events(self):
        try:
            while True:
                event = await self.queue.get()
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            self.cancel.set()


async def cancel_when_disconnected(request, cancel, interval=0.2):
    """Set `cancel` once the client of a non-streaming request has gone away (a streamed response notices by
    itself: its sending is cancelled). `request` is a Starlette Request; run this as a task, cancel it after."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(interval)


# ----------------------------------------------------------------------------------------------------------
# OpenAI's response formats


def new_completion_id():
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(completion_id, created, model, texts, finish_reasons, prompt_tokens, completion_tokens):
    """The body of a non-streaming chat completion."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, finish_reasons))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(completion_id, created, model, index=None, delta=None, finish_reason=None, usage_=None):
    """One streamed chunk: a delta of choice `index` (the first one carries the role), its finish_reason, or
    (index None) the final usage chunk with no choices."""
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": []}
    if index is not None:
        chunk["choices"].append({"index": index, "delta": delta or {}, "logprobs": None,
                                 "finish_reason": finish_reason})
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def sse(data):
    """One server-sent event: `data: <json>` (or the literal `[DONE]`) and a blank line."""
    return "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"
