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

import argparse
import asyncio
import hmac
import logging
import os
import random
import time

import torch

from nanochat.common import UserError, autocast_ctx, autodetect_device_type, compute_init, install_error_handler
from nanochat.web import (APIError, Generation, Limits, QueueFull, SamplingDefaults, Worker, WorkerPool,
                          cancel_when_disconnected, completion_chunk, completion_response, error_body,
                          network_exposure_warning, new_completion_id, parse_json_body, prompt_tokens, sse, usage,
                          validate_chat_request)

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
logger = logging.getLogger("chat_web")


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config

    limits_default = Limits()
    parser = argparse.ArgumentParser(description="Chat web UI and OpenAI-compatible API server")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which checkpoint family to load")
    parser.add_argument("-g", "--model_tag", "--model-tag", type=str, default=None,
                        help="model tag, e.g. d20 (default: most recent; 'largest': largest d<depth>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to bind (0.0.0.0 makes the server reachable from the network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--num_workers", "--num-workers", type=int, default=None,
                        help="generation workers (default: one per GPU, 1 on CPU/MPS)")
    parser.add_argument("--api_key", "--api-key", type=str, default=os.environ.get("NANOCHAT_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1/* and /stats (default: $NANOCHAT_API_KEY)")
    parser.add_argument("--max_queue", "--max-queue", type=int, default=32,
                        help="requests that may wait for a worker; beyond it: 503 with Retry-After")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
    parser.add_argument("-k", "--top_k", "--top-k", type=int, default=50, help="default top-k (0: off)")
    parser.add_argument("-m", "--max_tokens", "--max-tokens", type=int, default=512, help="default max tokens")
    parser.add_argument("--device_type", "--device-type", type=str, default=None, choices=["cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("-d", "--dtype", type=str, default="bfloat16", choices=["float32", "bfloat16"],
                        help="autocast dtype (bf16 autocast applies on CUDA only)")
    parser.add_argument("--max_messages", type=int, default=limits_default.max_messages,
                        help="most messages per request")
    parser.add_argument("--max_message_chars", type=int, default=limits_default.max_message_chars,
                        help="most characters per message")
    parser.add_argument("--max_total_chars", type=int, default=limits_default.max_total_chars,
                        help="most characters per conversation")
    parser.add_argument("--max_max_tokens", type=int, default=limits_default.max_max_tokens,
                        help="the largest max_tokens a request may ask for")
    args = parser.parse_args(argv)

    def check(ok, message):
        if not ok:
            raise UserError(message)

    check(0 <= args.port <= 65535, f"--port {args.port}: must be in 0..65535")
    check(args.num_workers is None or args.num_workers >= 1, f"--num_workers {args.num_workers}: must be >= 1")
    check(args.max_queue >= 0, f"--max_queue {args.max_queue}: must be >= 0 (0: no waiting, busy -> 503)")
    check(args.api_key is None or args.api_key.strip() != "", "--api_key is empty: give a key or leave it out")
    for name in ("max_messages", "max_message_chars", "max_total_chars", "max_max_tokens"):
        check(getattr(args, name) >= 1, f"--{name} {getattr(args, name)}: must be >= 1")
    limits = Limits(max_messages=args.max_messages, max_message_chars=args.max_message_chars,
                    max_total_chars=args.max_total_chars, max_max_tokens=args.max_max_tokens)
    check(limits.min_temperature <= args.temperature <= limits.max_temperature,
          f"-t/--temperature {args.temperature}: must be in {limits.min_temperature}..{limits.max_temperature}")
    check(limits.min_top_k <= args.top_k <= limits.max_top_k,
          f"-k/--top_k {args.top_k}: must be in {limits.min_top_k}..{limits.max_top_k}")
    check(1 <= args.max_tokens <= limits.max_max_tokens,
          f"-m/--max_tokens {args.max_tokens}: must be in 1..{limits.max_max_tokens} (--max_max_tokens)")
    defaults = SamplingDefaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)

    # ------------------------------------------------------------------------------------------------------
    # Compute init, models (one copy per device) and workers

    import uvicorn  # imported after the checks: `--help` and bad options stay fast
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from nanochat.checkpoint_manager import load_model, resolve_checkpoint
    from nanochat.engine import Engine

    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    if device_type == "cuda":
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        devices = [device]
    num_workers = args.num_workers or len(devices)
    checkpoint_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)  # once, for every copy
    model_tag = os.path.basename(checkpoint_dir)
    models = {}  # one copy of the model per device; workers on the same device share it (inference only)
    workers = []
    for i in range(num_workers):
        worker_device = devices[i % len(devices)]
        if worker_device not in models:
            models[worker_device] = load_model(args.source, worker_device, phase="eval", model_tag=model_tag,
                                               step=step)
        model, tokenizer, meta = models[worker_device]
        workers.append(Worker(index=i, engine=Engine(model, tokenizer), tokenizer=tokenizer, device=worker_device,
                              autocast=lambda: autocast_ctx(device_type, args.dtype)))
    model, tokenizer, meta = models[devices[0]]
    limits.context_len = model.config.sequence_len
    model_id = f"nanochat-{args.source}-{model_tag}-step{step}"
    print(f"model {model_id}: context {limits.context_len} tokens, {num_workers} worker(s) on "
          f"{', '.join(sorted({str(w.device) for w in workers}))}, queue of {args.max_queue}")

    # ------------------------------------------------------------------------------------------------------
    # The app: errors in OpenAI's format, the API key check, the endpoints

    pool = WorkerPool(workers, max_queue=args.max_queue)
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

    def check_api_key(request):
        if args.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), args.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/")
    async def ui():
        return FileResponse(UI_PATH, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "workers": len(workers)}

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
        req = validate_chat_request(parse_json_body(await request.body(), limits), limits, defaults)
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

    warning = network_exposure_warning(args.host, args.api_key)
    if warning:
        print(warning)
    auth = "API key required" if args.api_key else "no API key"
    print(f"chat page: http://{args.host}:{args.port}/   API: http://{args.host}:{args.port}/v1 ({auth})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
