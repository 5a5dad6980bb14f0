"""An OpenAI-compatible HTTP API over the cluster's public API, served beside the Gradio page.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``. Bodies are parsed and checked here (not by pydantic), so that every bad
value gets OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` with status 400,
a missing or wrong key 401, an unknown model 404, a cluster that cannot serve 503.

Semantics, where OpenAI leaves room:
- ``max_tokens`` / ``max_completion_tokens`` default to the rest of the longest sequence the cluster
  holds (the model's context, or less when a shard's cache is smaller: ``max_model_len``);
- ``n`` > 1 with a ``seed`` gives choice ``i`` the seed ``seed + i`` (so the choices differ);
- ``top_k`` is an extension (0 or -1: off); ``logprobs`` on ``/v1/completions`` takes 0..20;
- vLLM's ``ignore_eos``, ``stop_token_ids`` and ``skip_special_tokens`` are extensions too;
- a parameter this server does not implement is a 400 naming it, unless its value means "off"
  (``response_format`` ``{"type": "text"}``, ``tools: []``, ``tool_choice: "none"``, ``logit_bias: {}``,
  ``min_tokens: 0``, ...): it would change what comes back, so it is never silently ignored;
- an error in the middle of a stream is an ``{"error": ...}`` event, then ``data: [DONE]`` (as vLLM);
- a client that goes away (a closed stream, a dropped connection) cancels its requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.api import ClusterUnavailable, SamplingParams
from ui.chat import ChatError, check_messages, check_text

MAX_N = 16
MAX_BODY_BYTES = 32 * 2**20  # a chat at its cap of characters fits several times over
MAX_STOP = 16
MAX_LOGPROBS = 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        # ASCII JSON: a message that quotes the request (a lone surrogate in it) still encodes
        return Response(json.dumps(body), status_code=self.status, media_type="application/json")


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def _unsupported(key: str, hint: str = "") -> APIError:
    return APIError(400, f"'{key}' is not supported by this server" + (f": {hint}" if hint else ""), param=key,
                    code="unsupported_parameter")


def _get(body: dict, key: str, kind, default=None, *, lo=None, hi=None, nullable: bool = True):
    """``body[key]`` checked for type (``int``, ``float``, ``bool``, ``str``) and range."""
    value = body.get(key, default)
    if value is None:
        return default
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        try:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            ok = False
    else:
        ok = isinstance(value, kind)
    if not ok:
        name = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[kind]
        raise _bad(key, f"'{key}' must be {name}, got {json.dumps(value)[:40]}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(key, f"'{key}' must be in {lo}..{hi}, got {value}")
    return kind(value) if kind is float else value


def _refuse_unsupported(body: dict) -> None:
    """A 400 naming the first parameter that asks for something this server does not do. Each is
    accepted only at the value that means "off" (or absent, or null): any other value would change
    the output's shape or the distribution it is drawn from, so it must not be silently ignored."""
    for key, off in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1), ("min_p", 0)):
        if _get(body, key, float, off) != off:
            raise _unsupported(key, f"leave it at {off}")
    if _get(body, "min_tokens", int, 0) != 0:
        raise _unsupported("min_tokens", "leave it at 0")
    if _get(body, "best_of", int, 1) != 1:
        raise _unsupported("best_of", "leave it at 1 (ask for several choices with 'n')")
    if _get(body, "echo", bool, False):
        raise _unsupported("echo")
    if _get(body, "suffix", str, ""):
        raise _unsupported("suffix")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise _unsupported("response_format", f"only {{\"type\": \"text\"}} is, got {json.dumps(kind)[:40]}")
    for key, off, hint in (("tools", [], "this server calls no tools; leave it out or empty"),
                           ("functions", [], "this server calls no functions; leave it out or empty"),
                           ("tool_choice", "none", "this server calls no tools; leave it out or \"none\""),
                           ("function_call", "none", "this server calls no functions; leave it out or \"none\""),
                           ("logit_bias", {}, "leave it out or empty")):
        if body.get(key) not in (None, off):
            raise _unsupported(key, hint)


def _text(param: str, value: str) -> str:
    """``value`` checked as chat checks a message (valid Unicode, within the length cap); else a 400
    naming ``param``."""
    try:
        return check_text(value, f"'{param}'")
    except ChatError as e:
        raise _bad(param, str(e)) from None


class OpenAIServer:
    def __init__(self, llm, model_name: str | None = None, api_key: str | None = None):
        self.llm, self.api_key = llm, api_key or None
        info = llm.describe()
        self.model_name = model_name or info["model"]
        self.max_context = info.get("max_sequence_tokens", info["max_context"])
        self.vocab_size = info["vocab_size"]  # bounds stop_token_ids
        # the checkpoint's generation_config.json: defaults for values a request leaves out, as vLLM
        self.defaults = info["generation_defaults"]
        self.created = int(info["started_at"])

    # plumbing
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        raw = bytearray()
        async for chunk in request.stream():  # read up to the cap, never the whole of a larger body
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"The request body is over {MAX_BODY_BYTES // 2**20} MiB; send a shorter prompt",
                               code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise APIError(400, "The request body is not valid JSON (or nested too deeply)") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad("model", "'model' is required: a string naming the model (see GET /v1/models)")
        if model != self.model_name:
            raise APIError(404, f"The model {json.dumps(model[:100])} does not exist; this server serves "
                                f"{json.dumps(self.model_name)}", param="model", code="model_not_found")
        return body

    def _check_serving(self) -> None:
        health = self.llm.health()
        if health["state"] == "unhealthy":
            raise APIError(503, f"The cluster cannot serve now: {health['error']}", type_="service_unavailable",
                           code="cluster_unhealthy")

    def _params(self, body: dict, prompt_len: int, chat: bool) -> tuple[list[SamplingParams], int, bool]:
        """Sampling parameters for each of the ``n`` choices, the number of top logprobs, and whether
        logprobs were asked for."""
        room = self.max_context - prompt_len
        if room < 1:
            raise _bad("messages" if chat else "prompt",
                       f"The prompt is {prompt_len} tokens long; the model's context is {self.max_context}")
        # every one given is checked; max_completion_tokens wins over the older max_tokens
        keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        given = [(key, v) for key in keys if (v := _get(body, key, int, None, lo=1)) is not None]
        key, max_tokens = given[0] if given else (keys[-1], None)
        if max_tokens is not None and max_tokens > room:
            raise _bad(key, f"{key} {max_tokens} + the prompt's {prompt_len} tokens exceed the "
                            f"{self.max_context} tokens a sequence may hold here; ask for at most {room}")
        d = self.defaults
        temperature = _get(body, "temperature", float, d.get("temperature", 1.0), lo=0, hi=2)
        top_p = _get(body, "top_p", float, d.get("top_p", 1.0), lo=0, hi=1)
        if top_p == 0:
            raise _bad("top_p", "'top_p' must be > 0")
        top_k = _get(body, "top_k", int, d.get("top_k", 0), lo=-1)
        seed = _get(body, "seed", int, None, lo=-(2**63), hi=2**63 - 1)
        n = _get(body, "n", int, 1, lo=1, hi=MAX_N)
        stop, stop_token_ids = self._stops(body)
        ignore_eos = _get(body, "ignore_eos", bool, False)
        skip_special_tokens = _get(body, "skip_special_tokens", bool, True)
        if chat:
            want = _get(body, "logprobs", bool, False)
            top = _get(body, "top_logprobs", int, 0, lo=0, hi=MAX_LOGPROBS)
            if top and not want:
                raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        else:
            top = _get(body, "logprobs", int, None, lo=0, hi=MAX_LOGPROBS)
            want, top = top is not None, top or 0
        params = []
        for i in range(n):
            s = None if seed is None else (seed + i + 2**63) % 2**64 - 2**63  # stays a 64-bit integer
            try:
                params.append(SamplingParams(temperature=temperature, top_p=top_p, top_k=max(top_k, 0), seed=s,
                                             max_new_tokens=max_tokens or room, stop=stop,
                                             stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                             skip_special_tokens=skip_special_tokens,
                                             logprobs=max(top, 1) if want else 0))
            except ValueError as e:
                raise APIError(400, str(e)) from None
        return params, top, want

    def _stops(self, body: dict) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The ``stop`` strings and vLLM's ``stop_token_ids``, checked."""
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
            raise _bad("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them")
        for s in stop:
            _text("stop", s)
        ids = body.get("stop_token_ids")
        ids = [] if ids is None else ids
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < self.vocab_size for t in ids):
            raise _bad("stop_token_ids", f"'stop_token_ids' must be a list of token ids (integers "
                                         f"0..{self.vocab_size - 1})")
        return tuple(stop), tuple(ids)

    def _submit(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[int]:
        ids = []
        try:
            for p in params:
                ids.append(self.llm.submit(prompt_ids, p))
        except ClusterUnavailable as e:
            for i in ids:
                self.llm.cancel(i)
            raise APIError(503, str(e), type_="service_unavailable", code="cluster_unhealthy") from None
        except ValueError as e:
            for i in ids:
                self.llm.cancel(i)
            raise APIError(400, str(e)) from None
        return ids

    def _events(self, ids: list[int]) -> tuple[asyncio.Queue, list[threading.Thread]]:
        """Each request's stream read in a thread, its events put on one queue as (choice, event)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def pump(index: int, request_id: int):
            try:
                for ev in self.llm.stream(request_id):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
            except Exception as e:  # noqa: BLE001 - reported to the client as this choice's error
                loop.call_soon_threadsafe(queue.put_nowait, (index, e))

        threads = [threading.Thread(target=pump, args=(i, r), daemon=True, name=f"openai-stream-{r}")
                   for i, r in enumerate(ids)]
        for t in threads:
            t.start()
        return queue, threads

    def _logprobs(self, result, top: int, chat: bool, offset0: int = 0, start: int = 0):
        """The ``logprobs`` of a choice's tokens from position ``start`` on (a stream sent the ones
        before with their chunks); ``offset0``: the text offset of the first (completions)."""
        n = len(result.token_logprobs)
        return self._logprobs_of(result.output_ids[start:n], result.token_logprobs[start:],
                                 result.top_logprobs[start:], top, chat, offset0)

    def _logprobs_of(self, ids: list[int], token_logprobs: list[float], top_logprobs: list, top: int, chat: bool,
                     offset0: int = 0):
        texts = self.llm.token_texts(ids)
        alt_ids = [[int(i) for i, _ in alt[:top]] for alt in top_logprobs]
        flat_ids = [i for row in alt_ids for i in row]
        flat = iter(zip(self.llm.token_texts(flat_ids), self.llm.token_bytes(flat_ids) if chat else flat_ids,
                        strict=True))  # one call for every alternative
        alts = [[(*next(flat), lp) for _, lp in alt[:top]] for alt in top_logprobs]
        if chat:  # "bytes": the token's own bytes, so that pieces of one character join up again
            return {"content": [{"token": t, "logprob": lp, "bytes": list(b),
                                 "top_logprobs": [{"token": at, "logprob": alp, "bytes": list(ab)}
                                                  for at, ab, alp in alts[k]] if k < len(alts) else []}
                                for k, (t, b, lp) in enumerate(zip(texts, self.llm.token_bytes(ids),
                                                                   token_logprobs, strict=True))]}
        offsets, pos = [], offset0
        for t in texts:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": texts, "token_logprobs": list(token_logprobs),
                "top_logprobs": [{t: lp for t, _, lp in a} for a in alts] if top else None, "text_offset": offsets}

    @staticmethod
    def _finish_reason(result) -> str:
        if result.error:
            raise APIError(500, f"The request failed in the cluster: {result.error}", type_="server_error")
        return "length" if result.finish_reason == "length" else "stop"

    # routes
    async def health(self, request: Request):
        h = self.llm.health()
        return JSONResponse({"status": h["state"], "error": h["error"]},
                            status_code=503 if h["state"] == "unhealthy" else 200)

    async def models(self, request: Request):
        try:
            self._auth(request)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request, model: str):
        try:
            self._auth(request)
            if model != self.model_name:
                raise APIError(404, f"The model {json.dumps(model[:100])} does not exist", param="model",
                               code="model_not_found")
        except APIError as e:
            return e.response()
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "raymoe",
                "max_model_len": self.max_context}

    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool):
        try:
            self._auth(request)
            body = await self._body(request)
            _refuse_unsupported(body)
            self._check_serving()
            if chat:
                if "messages" not in body:
                    raise _bad("messages", "'messages' is required: a list of {role, content} messages")
                try:
                    prompt = check_messages(body["messages"], "messages")
                except ChatError as e:
                    raise _bad("messages", str(e)) from None
                if not prompt:
                    raise _bad("messages", "'messages' must hold at least one message")
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt and all(
                        isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
                    raise _bad("prompt", "'prompt' must be a string (or one list of token ids); "
                                         "send several prompts as several requests")
                if isinstance(prompt, str):  # tokenizers raise TypeError on a lone surrogate: a 500
                    _text("prompt", prompt)
            try:  # tokenising a long prompt takes a while: off the event loop
                prompt_ids = await asyncio.to_thread(self.llm.encode, prompt)
            except ValueError as e:
                raise _bad("messages" if chat else "prompt", str(e)) from None
            params, top, want = self._params(body, len(prompt_ids), chat)
            stream = _get(body, "stream", bool, False)
            options = body.get("stream_options")
            if options is not None and not stream:
                raise _bad("stream_options", "'stream_options' is only allowed with 'stream': true")
            options = {} if options is None else options
            if not isinstance(options, dict):
                raise _bad("stream_options", "'stream_options' must be an object")
            usage = _get(options, "include_usage", bool, False)
            ids = await asyncio.to_thread(self._submit, prompt_ids, params)  # takes the engine's lock
        except APIError as e:
            return e.response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if stream:
            return _CancellingStream(self._sse(rid, ids, len(prompt_ids), chat, top, want, usage),
                                     on_close=lambda: [self.llm.cancel(i) for i in ids],
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._whole(request, rid, ids, len(prompt_ids), chat, top, want)

    async def _whole(self, request: Request, rid: str, ids: list[int], prompt_len: int, chat: bool, top: int,
                     want: bool):
        queue, _ = self._events(ids)
        results = [None] * len(ids)
        checked = time.monotonic()
        try:
            while any(r is None for r in results):
                if time.monotonic() - checked > 0.5:  # every half second, however fast tokens come
                    checked = time.monotonic()
                    if await request.is_disconnected():  # the client went away: cancel (finally, below)
                        return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled",
                                                       "param": None, "code": None}}, status_code=499)
                try:
                    index, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    continue
                if isinstance(ev, Exception):
                    raise APIError(500, f"The request failed in the cluster: {ev}", type_="server_error")
                if ev.finished:
                    results[index] = ev.result
            choices = []
            for i, r in enumerate(results):
                # decoding every token and alternative takes a while: off the event loop
                logprobs = await asyncio.to_thread(self._logprobs, r, top, chat) if want else None
                choice = {"index": i, "finish_reason": self._finish_reason(r), "logprobs": logprobs}
                if chat:
                    choice["message"] = {"role": "assistant", "content": r.text}
                else:
                    choice["text"] = r.text
                choices.append(choice)
        except APIError as e:
            return e.response()
        finally:
            for i, r in zip(ids, results, strict=True):
                if r is None:
                    self.llm.cancel(i)
        completion = sum(len(r.output_ids) for r in results)
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": choices,
                             "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                                       "total_tokens": prompt_len + completion}})

    async def _sse(self, rid: str, ids: list[int], prompt_len: int, chat: bool, top: int, want: bool,
                   usage: bool) -> AsyncIterator[str]:
        """Server-sent events: per choice a first chunk with the role (chat), text chunks, a last chunk
        with ``finish_reason``; then the usage chunk when asked for, and ``data: [DONE]``. A request
        that fails ends the stream with an error event and ``data: [DONE]``. A client that goes away
        closes this generator, which cancels the requests still running."""
        created, done = int(time.time()), [False] * len(ids)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index, text=None, finish=None, logprobs=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            body = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            if usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        def error(message):  # as vLLM: clients that read until [DONE] stop here too
            body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
            return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"

        queue, _ = self._events(ids)
        texts = [""] * len(ids)
        sent = [0] * len(ids)  # per choice, the tokens whose logprobs went out with their chunks
        completion = 0
        try:
            if chat:
                for i in range(len(ids)):
                    yield chunk(i, role=True)
            while not all(done):
                index, ev = await queue.get()
                if isinstance(ev, Exception):
                    yield error(f"The request failed in the cluster: {ev}")
                    return
                if ev.finished:
                    done[index] = True
                    r = ev.result
                    completion += len(r.output_ids)
                    if r.error:
                        yield error(f"The request failed in the cluster: {r.error}")
                        return
                    # the tokens' logprobs not sent with their own chunks (none where the engine sent all)
                    rest = want and sent[index] < len(r.token_logprobs)
                    logprobs = await asyncio.to_thread(self._logprobs, r, top, chat, len(texts[index]),
                                                       sent[index]) if rest else None
                    if ev.text:
                        texts[index] += ev.text
                    # the last piece of text goes with the finish reason, and the logprobs of the tokens
                    # not sent yet
                    yield chunk(index, ev.text, "length" if r.finish_reason == "length" else "stop", logprobs)
                elif want and ev.logprobs:
                    # each token's logprobs with its chunk, as vLLM streams them (its text may be held back:
                    # part of a character or of a stop string; the chunk then has logprobs and no text)
                    lps = ev.logprobs
                    logprobs = await asyncio.to_thread(self._logprobs_of, ev.token_ids, [lp for lp, _ in lps],
                                                       [alt for _, alt in lps], top, chat, len(texts[index]))
                    sent[index] += len(ev.token_ids)
                    texts[index] += ev.text
                    yield chunk(index, ev.text, logprobs=logprobs)
                elif ev.text:
                    texts[index] += ev.text
                    yield chunk(index, ev.text)
            if usage:
                yield f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': self.model_name, 'choices': [], 'usage': {'prompt_tokens': prompt_len, 'completion_tokens': completion, 'total_tokens': prompt_len + completion}})}\n\n"  # noqa: E501
            yield "data: [DONE]\n\n"
        finally:
            for i, d in zip(ids, done, strict=True):
                if not d:
                    self.llm.cancel(i)


class _CancellingStream(StreamingResponse):
    """A stream whose requests are cancelled however the response ends, also when the client is gone
    before the body starts (the body generator's own ``finally`` never runs then)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # cancelling a finished request does nothing


def openai_routes(llm, model_name: str | None = None, api_key: str | None = None) -> list:
    """The API's routes, to put in front of the page's (``app_kwargs={"routes": ...}`` of
    ``Blocks.launch``)."""
    server = OpenAIServer(llm, model_name, api_key)
    router = APIRouter()
    router.add_api_route("/health", server.health, methods=["GET"])
    router.add_api_route("/v1/models", server.models, methods=["GET"])
    router.add_api_route("/v1/models/{model:path}", server.model, methods=["GET"])
    router.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    router.add_api_route("/v1/completions", server.completions, methods=["POST"])
    return router.routes
