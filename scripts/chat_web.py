"""
Talk to a trained model in the browser, or call it through the OpenAI API. A FastAPI server with one worker per
GPU (one on CPU), a bounded wait queue, streaming, and a one-file chat page (nanochat/ui.html) at `/`.

all GPUs:     python -m scripts.chat_web -i sft                     # one worker per GPU, http://127.0.0.1:8000/
one GPU:      CUDA_VISIBLE_DEVICES=0 python -m scripts.chat_web -i sft
tiny, CPU:    python -m scripts.chat_web -i sft --device_type cpu -m 64
on the LAN:   python -m scripts.chat_web -i sft --host 0.0.0.0 --api_key "$(openssl rand -hex 16)"

Endpoints (OpenAI-compatible where OpenAI has one):
    GET  /                      the chat page
    POST /v1/chat/completions   messages, temperature, top_k or top_p, max_tokens, seed, stop, n, stream
    GET  /v1/models             the loaded checkpoint as the model id
    GET  /health                liveness, no key needed
    GET  /stats                 workers, queue, requests served, tokens/s
A calculator call made during generation appears in the reply text as <<expr=result>> (or <<expr>> when the
calculator had no answer). With --api_key (or $NANOCHAT_API_KEY), /v1/* and /stats need
`Authorization: Bearer KEY`. Library parts: nanochat/web.py; tests: tests/test_chat_web.py.
"""

import asyncio
import hmac
import logging
import os
import random
import time

import torch

from nanochat.checkpoint_manager import SOURCE_DIRS
from nanochat.common import UserError, autocast_ctx, autodetect_device_type, compute_init, install_error_handler
from nanochat.config import ConfigError, Option, load_config
from nanochat.web import (FAVICON_SVG, APIError, Generation, Limits, QueueFull, SamplingDefaults, Worker,
                          WorkerPool, cancel_when_disconnected, completion_chunk, completion_response, error_body,
                          network_exposure_warning, new_completion_id, parse_json_body, prompt_tokens, sse, usage,
                          validate_chat_request)
from nanochat.web_guard import HostOriginGuard, check_content_type, deadline_protocol, default_allowed_hosts, read_body

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
logger = logging.getLogger("chat_web")

LIMITS = Limits()  # the defaults of the request limits, and the bounds of the sampling options
OPTIONS = [
    Option("source", str, "sft", "which checkpoint family to load", choices=tuple(SOURCE_DIRS), short="i"),
    Option("model_tag", str, None, "model tag, e.g. d20 (default: the most recently written; 'largest': the largest "
                                   "d<depth>)", short="g"),
    Option("step", int, None, "checkpoint step (default: last)", min=0, short="s"),
    Option("host", str, "127.0.0.1", "address to bind (0.0.0.0 makes the server reachable from the network)"),
    Option("port", int, 8000, "port to listen on", min=0, max=65535),
    Option("num_workers", int, None, "generation workers (default: one per GPU, 1 on CPU/MPS)", min=1),
    Option("api_key", str, None, "require `Authorization: Bearer KEY` on /v1/* and /stats (default: "
                                 "$NANOCHAT_API_KEY, else no key)"),
    Option("max_queue", int, 32, "requests that may wait for a worker; beyond it: 503 with Retry-After (0: no "
                                 "waiting)", min=0),
    Option("temperature", float, SamplingDefaults.temperature, "default temperature", min=LIMITS.min_temperature,
           max=LIMITS.max_temperature, short="t"),
    Option("top_k", int, SamplingDefaults.top_k, "default top-k (0: off)", min=LIMITS.min_top_k,
           max=LIMITS.max_top_k, short="k"),
    Option("max_tokens", int, SamplingDefaults.max_tokens, "default max tokens (at most max_max_tokens)",
           min=LIMITS.min_max_tokens, short="m"),
    Option("device_type", str, None, "cuda|cpu|mps (default: autodetect)", choices=("cuda", "cpu", "mps")),
    Option("dtype", str, "bfloat16", "autocast dtype (bf16 autocast applies on CUDA only)",
           choices=("float32", "bfloat16"), short="d"),
    Option("max_messages", int, LIMITS.max_messages, "most messages per request", min=1),
    Option("max_message_chars", int, LIMITS.max_message_chars, "most characters per message", min=1),
    Option("max_total_chars", int, LIMITS.max_total_chars, "most characters per conversation", min=1),
    Option("max_max_tokens", int, LIMITS.max_max_tokens, "the largest max_tokens a request may ask for", min=1),
    # connection and request guards (nanochat/web_guard.py)
    Option("allowed_hosts", str, None, "comma-separated host names the Host/Origin headers may name ('*': any; "
                                       "default: the loopback names on a loopback address, any otherwise)"),
    Option("header_timeout", float, 10.0, "seconds a request's line and headers may take before the connection is "
                                          "closed", min=0.01),
    Option("body_timeout", float, 30.0, "seconds a request's body may take after its headers before the connection "
                                        "is closed", min=0.01),
]


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config

    config = load_config(OPTIONS, argv, description=__doc__)
    api_key = config["api_key"] if config["api_key"] is not None else os.environ.get("NANOCHAT_API_KEY")
    if api_key is not None and api_key.strip() == "":
        raise UserError("--api_key (or $NANOCHAT_API_KEY) is empty: give a key or leave it out")
    if config["max_tokens"] > config["max_max_tokens"]:
        raise ConfigError(f"command line -m/--max_tokens: {config['max_tokens']} is above max_max_tokens = "
                          f"{config['max_max_tokens']}; lower it or raise --max_max_tokens")
    limits = Limits(max_messages=config["max_messages"], max_message_chars=config["max_message_chars"],
                    max_total_chars=config["max_total_chars"], max_max_tokens=config["max_max_tokens"])
    defaults = SamplingDefaults(temperature=config["temperature"], top_k=config["top_k"],
                                max_tokens=config["max_tokens"])
    allowed_hosts = ([h.strip() for h in config["allowed_hosts"].split(",") if h.strip()] if config["allowed_hosts"]
                     else default_allowed_hosts(config["host"]))
    if not allowed_hosts:
        raise ConfigError("command line --allowed_hosts is empty: give host names, or '*' for any")

    # ------------------------------------------------------------------------------------------------------
    # Compute init, models (one copy per device) and workers

    import uvicorn  # imported after the checks: `--help` and bad options stay fast
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from nanochat.checkpoint_manager import load_model, resolve_checkpoint
    from nanochat.engine import Engine

    device_type = config["device_type"] or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    if device_type == "cuda":
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        devices = [device]
    num_workers = config["num_workers"] or len(devices)
    checkpoint_dir, step = resolve_checkpoint(config["source"], config["model_tag"], config["step"])  # once, for all
    model_tag = os.path.basename(checkpoint_dir)
    models = {}  # one copy of the model per device; workers on the same device share it (inference only)
    workers = []
    for i in range(num_workers):
        worker_device = devices[i % len(devices)]
        if worker_device not in models:
            models[worker_device] = load_model(config["source"], worker_device, phase="eval", model_tag=model_tag,
                                               step=step)
        model, tokenizer, meta = models[worker_device]
        workers.append(Worker(index=i, engine=Engine(model, tokenizer), tokenizer=tokenizer, device=worker_device,
                              autocast=lambda: autocast_ctx(device_type, config["dtype"])))
    model, tokenizer, meta = models[devices[0]]
    limits.context_len = model.config.sequence_len
    model_id = f"nanochat-{config['source']}-{model_tag}-step{step}"
    print(f"model {model_id}: context {limits.context_len} tokens, {num_workers} worker(s) on "
          f"{', '.join(sorted({str(w.device) for w in workers}))}, queue of {config['max_queue']}")

    # ------------------------------------------------------------------------------------------------------
    # The app: errors in OpenAI's format, the API key check, the endpoints

    pool = WorkerPool(workers, max_queue=config["max_queue"])
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404 unknown path, 405 wrong method, ...
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse(error_body(str(exc), code="invalid_type"), status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # a bug, not the client's fault: logged here, no traceback sent
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)

    app.add_middleware(HostOriginGuard, allowed=allowed_hosts)  # DNS rebinding and cross-site browser requests

    def check_api_key(request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/")
    async def ui():
        return FileResponse(UI_PATH, media_type="text/html")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(FAVICON_SVG, media_type="image/svg+xml")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "workers": len(workers)}

    @app.get("/info")
    async def model_info():  # what the chat page needs: the context, the defaults and the limits (no secrets)
        return {"model": model_id, "context_length": limits.context_len, "max_max_tokens": limits.max_max_tokens,
                "defaults": {"temperature": defaults.temperature, "top_k": defaults.top_k,
                             "max_tokens": defaults.max_tokens}}

    @app.get("/stats")
    async def stats(request: Request):
        check_api_key(request)
        return pool.stats()

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_api_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": started,
                                            "owned_by": "nanochat", "context_length": limits.context_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_body_bytes():  # refused before reading it
            raise APIError(413, f"the request body is {length} bytes (at most {limits.max_body_bytes()})",
                           code="body_too_large")
        check_content_type(request.headers)
        body = await read_body(request, limits.max_body_bytes())  # bounded as it streams in (chunked too)
        req = validate_chat_request(parse_json_body(body, limits), limits, defaults)
        prompt = prompt_tokens(tokenizer, req, limits.context_len)
        req.max_tokens = min(req.max_tokens, limits.context_len - len(prompt))  # the rest ends as "length"
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        try:
            worker = await pool.acquire()
        except QueueFull:
            raise APIError(503, f"the server is busy: {len(workers)} worker(s) busy and {pool.waiting} request(s) "
                           "waiting; retry shortly", type="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        generation = Generation(pool, worker, prompt, req, seed)
        completion_id, created = new_completion_id(), int(time.time())

        if not req.stream:
            texts, reasons, result = [""] * req.n, [None] * req.n, None
            watcher = asyncio.create_task(cancel_when_disconnected(request, generation.cancel))
            try:
                async for event in generation.events():
                    if event[0] == "delta":
                        texts[event[1]] += event[2]
                    elif event[0] == "finish":
                        reasons[event[1]] = event[2]
                    elif event[0] == "done":
                        result = event[1]
                    else:
                        logger.error("generation failed: %s", event[1])
                        raise APIError(500, "generation failed", type="server_error", code="generation_failed")
            finally:
                watcher.cancel()
            return completion_response(completion_id, created, model_id, texts, reasons, result.prompt_tokens,
                                       result.completion_tokens)

        async def stream():
            try:
                for i in range(req.n):  # OpenAI's first chunk of each choice carries the role
                    yield sse(completion_chunk(completion_id, created, model_id, i,
                                               {"role": "assistant", "content": ""}))
                async for event in generation.events():
                    if event[0] == "delta":
                        yield sse(completion_chunk(completion_id, created, model_id, event[1], {"content": event[2]}))
                    elif event[0] == "finish":
                        yield sse(completion_chunk(completion_id, created, model_id, event[1], {}, event[2]))
                    elif event[0] == "done" and req.include_usage:
                        result = event[1]
                        yield sse(completion_chunk(completion_id, created, model_id,
                                                   usage_=usage(result.prompt_tokens, result.completion_tokens)))
                    elif event[0] == "error":
                        logger.error("generation failed: %s", event[1])
                        yield sse(error_body("generation failed", type="server_error", code="generation_failed"))
                yield sse("[DONE]")
            finally:  # the client went away (the stream is cancelled or closed): the worker stops at the next token
                generation.cancel.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------------------
    # Serve

    warning = network_exposure_warning(config["host"], api_key)
    if warning:
        print(warning)
    auth = "API key required" if api_key else "no API key"
    address = f"http://{config['host']}:{config['port']}"
    print(f"chat page: {address}/   API: {address}/v1 ({auth})", flush=True)
    uvicorn.run(app, host=config["host"], port=config["port"], log_level="info", timeout_graceful_shutdown=5,
                http=deadline_protocol(config["header_timeout"], config["body_timeout"]))


if __name__ == "__main__":
    main()
