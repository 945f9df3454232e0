"""An OpenAI-compatible HTTP server over generate.py's continuous-batching engine (FastAPI + uvicorn).

    python serve.py CHECKPOINT_DIR [--host 127.0.0.1] [--port 8000] [--max_batch_size 16] [--max_seq_len N]
                    [--quantize int8|nf4|fp4|bnb.int8] [--dtype float32|bfloat16|float16] [--api_key KEY]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (messages through the checkpoint's chat
template), GET /health. The model's id is CHECKPOINT_DIR as given. `stream: true` sends server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`. Parameters: max_tokens / max_completion_tokens, temperature,
top_p, seed, stop, n, logprobs / top_logprobs (chat) and logprobs (completions), stream_options.include_usage;
any other is refused by name. Sampling settings not given come from the checkpoint's generation_config.json, as
generate.py's do. Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.

Every request becomes one engine sequence per prompt and per `n`; the engine runs on a thread of its own and
decodes all running sequences together, one token each per step. A client that goes away cancels its sequences,
which frees their slots at once.
"""

import argparse
import asyncio
import json
import sys
import time
import uuid

from generate import DTYPES, LLM, Engine, Request, Token

# ----------------------------------------------------------------------------------------------------------------
# Errors: one exception, sent as OpenAI's error object with its HTTP status


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


# ----------------------------------------------------------------------------------------------------------------
# Parameters. Each endpoint takes the names below; an unknown one is refused by name, and the penalties are taken
# only at their neutral value (this server has no repetition penalties).

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
          "frequency_penalty", "presence_penalty"}
CHAT_PARAMS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_PARAMS = COMMON | {"prompt", "logprobs", "echo"}
MAX_N = 16


def check_params(body, allowed: set[str]):
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise bad(name, f"unsupported parameter '{name}'; this server takes {', '.join(sorted(allowed))}")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0):
            raise bad(name, f"unsupported parameter '{name}' (only 0): this server has no repetition penalties")
    if body.get("echo"):
        raise bad("echo", "unsupported parameter 'echo' (only false)")


def integer(body, name, low, high=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise bad(name, f"must be an integer {'in [%d, %d]' % (low, high) if high is not None else '>= %d' % low}, "
                        f"got {value!r}")
    return value


def number(body, name, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value > high or value < low or \
            (low_open and value == low):
        raise bad(name, f"must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return float(value)


def boolean(body, name) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}")
    return value


def stop_strings(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "must be a non-empty string or a list of 1 to 4 of them")
    return tuple(stops)


def chat_prompt(body, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):          # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string or a list of text parts")
        plain.append({"role": m["role"], "content": content})
    try:
        return tokenizer.encode_chat(plain)
    except ValueError as e:                     # the template refused the conversation (raise_exception)
        raise bad("messages", str(e)) from None


def completion_prompts(body, tokenizer) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt]
    is_ids = lambda p: isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return prompt
    raise bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")


def engine_requests(body, prompts: list[list[int]], llm: LLM, engine: Engine, chat: bool) -> list[Request]:
    """Check the sampling parameters and the lengths; one Request per prompt and per n."""
    n = integer(body, "n", 1, MAX_N) or 1
    max_tokens = integer(body, "max_tokens", 1)
    if chat:
        max_tokens = integer(body, "max_completion_tokens", 1) or max_tokens
    temperature = number(body, "temperature", 0, 2)
    top_p = number(body, "top_p", 0, 1, low_open=True)
    seed = integer(body, "seed", -2**63)
    stop = stop_strings(body)
    if chat:
        logprobs = boolean(body, "logprobs")
        top = integer(body, "top_logprobs", 0, 20)
        if top is not None and not logprobs:
            raise bad("top_logprobs", "needs logprobs: true")
        logprobs = (top or 0) if logprobs else None
    else:
        logprobs = integer(body, "logprobs", 0, 5)
    context, param = engine.context, "messages" if chat else "prompt"
    requests = []
    for ids in prompts:
        if len(ids) >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens, but the prompt is "
                                f"{len(ids)} tokens: shorten the {param}.", param, "context_length_exceeded")
        new = max_tokens or (context - len(ids) if chat else 16)       # OpenAI's defaults: all that fits; 16
        if len(ids) + new > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; you asked for "
                                f"{len(ids) + new} ({len(ids)} in the {param}, {new} in the completion): lower "
                                f"max_tokens or shorten the {param}.", "max_tokens", "context_length_exceeded")
        sampling = llm.sampling(temperature=temperature, top_p=top_p)
        for i in range(n):          # with a seed, choice i samples with seed + i: n different, reproducible choices
            requests.append(Request(ids, new, sampling, None if seed is None else seed + i, stop, logprobs=logprobs))
    for r in requests:
        try:
            engine.check(r)
        except ValueError as e:
            raise bad(param, str(e)) from None
    return requests


# ----------------------------------------------------------------------------------------------------------------
# Running requests: engine sequences whose updates arrive on this event loop


async def run_sequences(engine: Engine, requests: list[Request], http_request, seqs: list):
    """Submit the requests (their sequences go into seqs); yield (choice index, Update) as they decode. Leaving
    early (a client gone, an error) cancels whatever still runs."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    for i, r in enumerate(requests):
        r.on_update = lambda update, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, update))
        seqs.append(engine.submit(r))
    try:
        finished = 0
        while finished < len(seqs):
            try:
                i, update = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http_request.is_disconnected():
                    return
                continue
            if update.finish_reason in ("error", "cancelled"):
                raise ApiError(500, f"generation failed ({update.finish_reason}); see the server's log")
            finished += update.finish_reason is not None
            yield i, update
    finally:
        for seq in seqs:
            if not seq.done.is_set():
                engine.cancel(seq)


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, tokens: list[Token]) -> dict:
    entry = lambda i, lp: {"token": (t := token_text(tokenizer, i)), "logprob": lp, "bytes": list(t.encode())}
    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or []]}
                        for t in tokens]}


def completion_logprobs(tokenizer, tokens: list[Token], offset: int) -> dict:
    texts = [token_text(tokenizer, t.id) for t in tokens]
    offsets = [offset + sum(len(x) for x in texts[:k]) for k in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{token_text(tokenizer, i): lp for i, lp in t.top or []} for t in tokens],
            "text_offset": offsets}


def usage(prompts: list[list[int]], generated: list[int]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(generated),
            "total_tokens": prompt_tokens + sum(generated)}


# ----------------------------------------------------------------------------------------------------------------
# The app


def make_app(llm: LLM, engine: Engine, model_id: str, api_key: str | None = None):
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="FlatLM", docs_url=None, redoc_url=None)
    tokenizer = llm.tokenizer
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.exception_handler(404)
    async def no_route(http_request, _):
        return JSONResponse(ApiError(404, f"no route {http_request.method} {http_request.url.path}").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def wrong_method(http_request, _):
        return JSONResponse(ApiError(405, f"{http_request.method} is not allowed on {http_request.url.path}").body(),
                            status_code=405)

    def authorize(http_request):
        if api_key is None:
            return
        header = http_request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise ApiError(401, "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        if header[len("Bearer "):] != api_key:
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def read_body(http_request, allowed: set[str]) -> dict:
        authorize(http_request)
        try:
            body = await http_request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        check_params(body, allowed)
        if not isinstance(body.get("model"), str):
            raise bad("model", "required: a model id from GET /v1/models")
        if body["model"] != model_id:
            raise ApiError(404, f"the model '{body['model']}' does not exist; this server has '{model_id}'",
                           "model", "model_not_found")
        if body.get("stream_options") is not None and not (
                boolean(body, "stream") and isinstance(body["stream_options"], dict) and
                set(body["stream_options"]) <= {"include_usage"}):
            raise bad("stream_options", "only {\"include_usage\": true|false}, and only with stream: true")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting),
                "finished": dict(engine.finished)}

    @app.get("/v1/models")
    async def list_models(http_request: HttpRequest):
        authorize(http_request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "flatlm", "max_model_len": engine.context}]}

    async def respond(http_request, body, prompts, requests, chat: bool):
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_id}
        texts, seqs = [""] * len(requests), []

        def logprobs_of(i, update):
            if requests[i].logprobs is None:
                return None
            if chat:
                return chat_logprobs(tokenizer, update.tokens)
            return completion_logprobs(tokenizer, update.tokens, len(texts[i]) - len(update.text))

        if boolean(body, "stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)

            async def events():
                if chat:                                          # each choice opens with the assistant's role
                    for i in range(len(requests)):
                        yield sse({**head, "object": kind + ".chunk", "choices": [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}, include_usage)
                async for i, update in run_sequences(engine, requests, http_request, seqs):
                    texts[i] += update.text
                    if not update.text and not update.finish_reason:
                        continue
                    choice = {"index": i, "logprobs": logprobs_of(i, update), "finish_reason": update.finish_reason}
                    if chat:
                        choice["delta"] = {"content": update.text} if update.text else {}
                    else:
                        choice["text"] = update.text
                    yield sse({**head, "object": kind + ".chunk" if chat else kind, "choices": [choice]},
                              include_usage)
                if include_usage:
                    yield sse({**head, "object": kind + ".chunk" if chat else kind, "choices": [],
                               "usage": usage(prompts, [len(s.generated) for s in seqs])}, False)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        tokens = [[] for _ in requests]
        finish = [None] * len(requests)
        async for i, update in run_sequences(engine, requests, http_request, seqs):
            texts[i] += update.text
            tokens[i] += update.tokens
            finish[i] = update.finish_reason
        choices = []
        for i, r in enumerate(requests):
            logprobs = None
            if r.logprobs is not None:
                logprobs = chat_logprobs(tokenizer, tokens[i]) if chat else \
                    completion_logprobs(tokenizer, tokens[i], 0)
            choice = {"index": i, "logprobs": logprobs, "finish_reason": finish[i]}
            if chat:
                choice["message"] = {"role": "assistant", "content": texts[i]}
            else:
                choice["text"] = texts[i]
            choices.append(choice)
        return {**head, "object": kind, "choices": choices, "usage": usage(prompts, [len(s.generated) for s in seqs])}

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: HttpRequest):
        body = await read_body(http_request, CHAT_PARAMS)
        prompts = [chat_prompt(body, tokenizer)]
        return await respond(http_request, body, prompts, engine_requests(body, prompts, llm, engine, True), True)

    @app.post("/v1/completions")
    async def completions(http_request: HttpRequest):
        body = await read_body(http_request, COMPLETION_PARAMS)
        prompts = completion_prompts(body, tokenizer)
        return await respond(http_request, body, prompts, engine_requests(body, prompts, llm, engine, False), False)

    return app


def sse(chunk: dict, include_usage: bool) -> str:
    if include_usage:
        chunk = {**chunk, "usage": None}
    return f"data: {json.dumps(chunk)}\n\n"


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve a FlatLM checkpoint over an OpenAI-compatible HTTP API.")
    p.add_argument("checkpoint_dir", help="a converted checkpoint dir (its path is the model id clients send)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch_size", type=int, default=16, help="sequences decoded together (cache slots)")
    p.add_argument("--max_seq_len", type=int, help="context per sequence (default: the model's); the KV cache "
                   "holds max_batch_size sequences of up to this many tokens")
    p.add_argument("--quantize", choices=["int8", "nf4", "fp4", "bnb.int8"])
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--api_key", help="require 'Authorization: Bearer API_KEY' on /v1/ requests")
    args = p.parse_args(argv)
    model_id = args.checkpoint_dir.rstrip("/") or args.checkpoint_dir
    try:
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port must be in [1, 65535], got {args.port}")
        llm = LLM.load(args.checkpoint_dir, args.device, args.dtype, args.quantize)
        engine = Engine(llm.model, llm.tokenizer, args.max_batch_size, args.max_seq_len)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    import uvicorn
    app = make_app(llm, engine, model_id, args.api_key)
    engine.start()
    print(f"serving {model_id} at http://{args.host}:{args.port}/v1 ({args.max_batch_size} sequences at once, "
          f"context {engine.context})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
