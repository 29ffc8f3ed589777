"""`chartvlm serve`: an OpenAI-compatible chart-QA server (FastAPI + uvicorn) for development and CPU machines.

    POST /v1/chat/completions   one chart (an image_url part) and one question (text parts), OpenAI's format
    GET  /v1/models             the one model served, with the settings it is asked with
    GET  /health                liveness and the batcher's counters
    GET  /                      a page to try it (serve_page.html)

Answers equal `chartvlm predict`'s: a request becomes the conversation predict builds (predict.InferenceSetup: the
trained system prompt unless the request has a system message, the trained pixel limits, the trained new-token
limit unless max_tokens says otherwise), and concurrent requests are answered together by
generate.generate_completions, the left-padded batched greedy path evaluation uses (batched == one-at-a-time).
For production traffic use vLLM or SGLang on `chartvlm export`'s merged folder (README, Serving).

A request's way through: the handler reads the body (at most max_body_bytes, within request_timeout), checks
every field, and decodes the image in a small thread pool with the checks data loading makes (images.check_image:
integrity, Pillow's decompression-bomb limits, shape), after refusing from the header alone an image above
max_image_pixels; the image is then prepared as every stage prepares it (images.model_image). A Job enters a
bounded queue (full: 503 with Retry-After). One worker thread owns the model (`Batcher`): it waits for a job,
takes what else arrives within batch_window_ms, up to max_batch, drops the jobs whose client left or whose time ran
out, and runs one generation per distinct max_tokens.

Decoding is greedy only: temperature must be 0 or absent, since sampled answers could not equal evaluation's.
Streaming sends the finished answer as OpenAI chunks (a batched greedy answer exists when its batch ends; chart
answers are a few tokens). Every refusal is an OpenAI-shaped error, {"error": {"message", "type", "param",
"code"}}, with a 4xx status and a message naming the problem; overload is 503 with Retry-After; a request out of
time is 504.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at runtime.
import asyncio
import base64
import binascii
import contextlib
import io
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from chartvlm.errors import BadSampleError, ChartVLMError

logger = logging.getLogger(__name__)

PAGE_FILE = "serve_page.html"
# How often a waiting request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.05
# The largest max_tokens a request may ask for, unless the model's own answer length is longer.
MAX_TOKENS_LIMIT = 512
# Seconds a client is told to wait when the queue is full.
RETRY_AFTER_S = 1
# Request fields chartvlm serves only at their neutral value: field -> (accepted values, why).
NEUTRAL_ONLY = {
    "n": ((None, 1), "one answer per request"),
    "top_p": ((None, 1), "decoding is greedy"),
    "frequency_penalty": ((None, 0), "decoding is greedy, without penalties, as evaluation's"),
    "presence_penalty": ((None, 0), "decoding is greedy, without penalties, as evaluation's"),
    "repetition_penalty": ((None, 1), "decoding is greedy, without penalties, as evaluation's"),
    "logprobs": ((None, False), "log probabilities are not returned"),
    "stop": ((None, "", ()), "answers end at <|im_end|>, as the model was trained"),
    "tools": ((None, ()), "tools are not supported"),
    "response_format": ((None, {"type": "text"}), "answers are plain text"),
    "logit_bias": ((None, {}), "decoding is greedy over the model's own scores, as evaluation's"),
}


@dataclass
class ServerArguments:
    """What `chartvlm serve` loads and where it listens."""

    model: str = field(metadata={"help": "Model folder or hub id: a full or merged model, or the base of --adapter "
                                         "(e.g. output/quickstart/finetuned)."})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder to apply on the model."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    served_model_name: str | None = field(
        default=None, metadata={"help": "The name clients ask for (default: --adapter if given, else --model, as "
                                        "given, like vllm serve)."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "New tokens when a request gives no max_tokens (default: the trained "
                                        "max_new_tokens, as chartvlm predict)."})
    force_adapter: bool = field(
        default=False, metadata={"help": "Apply the adapter even if it was trained on another base model."})

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ChartVLMError(f"port must be from 0 to 65535, got {self.port}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ChartVLMError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class ServeLimits:
    """Batching and the limits that keep one request, or a flood of them, from taking the server down."""

    max_batch: int = field(default=8, metadata={"help": "Requests answered together in one generation."})
    batch_window_ms: float = field(
        default=10.0, metadata={"help": "How long the worker waits for more requests before it starts a batch."})
    queue_size: int = field(
        default=32, metadata={"help": "Requests waiting for the model at most; beyond it (and max_batch more being "
                                      "read) a request gets 503 with Retry-After."})
    request_timeout: float = field(
        default=300.0, metadata={"help": "Seconds a request may take, body upload included (then 504)."})
    max_body_bytes: int = field(
        default=16 * 2 ** 20, metadata={"help": "Largest request body (then 413); a base64 image takes 4/3 of its "
                                                "file size."})
    max_image_pixels: int = field(
        default=25_000_000, metadata={"help": "Largest image (width x height, read from its header before any "
                                              "decoding); Pillow's decompression-bomb limits apply too."})
    max_tokens_limit: int | None = field(
        default=None, metadata={"help": f"Largest max_tokens a request may ask for (default: {MAX_TOKENS_LIMIT}, or the "
                                        "model's own answer length where that is longer, e.g. a reasoning model's)."})
    max_text_chars: int = field(
        default=4000, metadata={"help": "Longest question, and longest system message, in characters (a prompt's "
                                        "length is the model's work, which no timeout can stop once it runs)."})
    image_workers: int = field(
        default=2, metadata={"help": "Threads that decode and check images (each holds one decoded image at a "
                                     "time: this bounds their memory)."})
    allow_image_urls: bool = field(
        default=False, metadata={"help": "Fetch http(s) image_url addresses. Off by default: it lets any client make "
                                         "the server fetch any address it can reach."})
    image_url_timeout: float = field(default=10.0, metadata={"help": "Seconds to fetch one image URL."})

    def __post_init__(self):
        for name in ("max_batch", "queue_size", "max_body_bytes", "max_image_pixels", "max_tokens_limit",
                     "max_text_chars", "image_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ChartVLMError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout", "image_url_timeout"):
            if getattr(self, name) <= 0:
                raise ChartVLMError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ChartVLMError(f"batch_window_ms must not be negative, got {self.batch_window_ms}")


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class ServedModel:
    """The model a server answers with: its weights, how it is asked (predict.InferenceSetup) and the name clients
    ask for. One batcher worker uses it at a time (generation sets the tokenizer's padding side)."""

    name: str
    setup: Any  # predict.InferenceSetup
    model: Any
    model_path: str
    adapter: str | None = None
    digests: dict = field(default_factory=dict)

    def answer(self, conversations: list[list[dict]], max_new_tokens: int) -> list:
        """generate.Completion of each conversation, batched (the vision tower runs once per distinct chart)."""
        from chartvlm.generate import generate_completions

        asked = self.setup.asked
        return generate_completions(self.model, self.setup.processor, conversations, max_new_tokens,
                                    share_vision=True, style=asked.style, generation=asked.generation)

    def describe(self) -> dict:
        """What /v1/models tells a client beyond OpenAI's fields: how questions are asked here, so an evaluation
        through this server can check it prepares images as the server does (openai_client)."""
        asked = self.setup.asked
        return {"model": self.model_path, "adapter": self.adapter, "family": self.setup.family,
                "system_message": asked.system_message, "min_pixels": asked.min_pixels,
                "max_pixels": asked.max_pixels, "max_new_tokens": asked.max_new_tokens,
                "generation": asked.generation, "digests": self.digests}


def load_served_model(arguments: ServerArguments, limits: ServeLimits | None = None) -> ServedModel:
    """Load the model (+ adapter) as `chartvlm predict` does and resolve how it is asked; what `limits` refuse
    is refused before the weights are read."""
    from chartvlm.fingerprint import model_digest
    from chartvlm.modeling import check_adapter, check_model_folder, load_model
    from chartvlm.predict import inference_setup
    from chartvlm.prompts import check_system_message

    check_model_folder(arguments.model)
    if arguments.adapter:
        check_adapter(arguments.adapter, arguments.model, arguments.force_adapter)
    flags = ["--max_new_tokens", str(arguments.max_new_tokens)] if arguments.max_new_tokens else []
    setup = inference_setup(arguments.model, arguments.adapter, flags, prog="chartvlm serve")
    if setup.asked.system_message is not None:
        try:
            check_system_message(setup.asked.system_message, "the trained system_message", setup.controls)
        except BadSampleError as error:
            raise ChartVLMError(str(error)) from None
    limit = limits and limits.max_tokens_limit
    if limit is not None and setup.asked.max_new_tokens > limit:
        raise ChartVLMError(f"the default answer length ({setup.asked.max_new_tokens} new tokens) is above "
                            f"--max_tokens_limit {limit}; raise the limit or pass --max_new_tokens")
    model = load_model(arguments.model, adapter=arguments.adapter, force_adapter=arguments.force_adapter)
    model.eval()
    digests = {"model": model_digest(arguments.model),
               "adapter": model_digest(arguments.adapter) if arguments.adapter else None}
    name = arguments.served_model_name or arguments.adapter or arguments.model
    return ServedModel(name, setup, model, arguments.model, arguments.adapter, digests)


# ---------------------------------------------------------------------------------------------- batching
@dataclass
class Job:
    """One request's conversation, waiting for the worker; `future` gets its generate.Completion."""

    conversation: list[dict]
    max_new_tokens: int
    future: Future = field(default_factory=Future)


class Batcher:
    """One worker thread that owns the model and answers queued jobs in batches.

    It waits for a job, then takes what else is queued or arrives within `window_s`, up to `max_batch`. A job whose
    future was cancelled (its client left, its time ran out) is dropped before generation; a running one cannot be
    stopped, its answer is discarded. Jobs asking for different max_new_tokens are generated separately (greedy
    answers do not depend on their batch, so grouping changes nothing but speed)."""

    def __init__(self, answer: Callable[[list[list[dict]], int], list], max_batch: int = 8, window_s: float = 0.01,
                 queue_size: int = 32):
        self.answer, self.max_batch, self.window_s = answer, max_batch, window_s
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.stats = {"batches": 0, "answered": 0, "dropped": 0, "failed": 0, "largest_batch": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="chartvlm-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:  # nobody will answer what is still queued
            try:
                self.jobs.get_nowait().future.cancel()
            except queue.Empty:
                break

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False when the queue is full."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _take_batch(self) -> list[Job]:
        try:
            batch = [self.jobs.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait())
            except queue.Empty:
                break
        return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self.stats["dropped"] += len(batch) - len(live)
            if not live:
                continue
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
            live.sort(key=lambda job: job.max_new_tokens)
            for max_new_tokens, group in itertools.groupby(live, key=lambda job: job.max_new_tokens):
                group = list(group)
                try:
                    completions = self.answer([job.conversation for job in group], max_new_tokens)
                except Exception as error:  # noqa: BLE001 - the worker must outlive any one batch
                    logger.exception("generation failed for a batch of %d", len(group))
                    self.stats["failed"] += len(group)
                    for job in group:
                        job.future.set_exception(error)
                    continue
                for job, completion in zip(group, completions):
                    job.future.set_result(completion)
                self.stats["answered"] += len(group)
                logger.debug("answered a batch of %d (max_new_tokens %d)", len(group), max_new_tokens)


# ---------------------------------------------------------------------------------------------- requests
class ApiError(Exception):
    """A refusal, answered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self):
        return error_response(self.status, self.message, self.param, self.code, self.kind, self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def overloaded(what: str) -> ApiError:
    return ApiError(503, f"the server is busy ({what}); retry after {RETRY_AFTER_S} s", code="overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class ChatRequest:
    """What a chat-completions request asks, checked."""

    question: str
    question_param: str
    image_param: str
    image_bytes: bytes | None   # from a data URI
    image_url: str | None       # an http(s) address (allow_image_urls)
    system_message: Any         # predict.TRAINED, or the request's system text
    max_tokens: int
    stream: bool
    include_usage: bool


def parse_chat_request(payload: Any, served_name: str, limits: ServeLimits, default_max_tokens: int) -> ChatRequest:
    """Check a chat-completions body field by field; anything chartvlm cannot answer as evaluation would is an
    ApiError naming the field."""
    from chartvlm.predict import TRAINED
    from chartvlm.prompts import TEMPLATE_KWARGS

    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    model = payload.get("model")
    if model is None:
        raise ApiError(400, f"model is required: this server serves {served_name!r}", param="model")
    if model != served_name:
        raise ApiError(404, f"the model {_echo(model)} does not exist here: this server serves {served_name!r}",
                       param="model", code="model_not_found")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list: an optional system message, then one user message "
                            "with the chart (an image_url part) and the question (text)", param="messages")
    system, user = TRAINED, None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role in ("system", "developer"):
            if user is not None or system is not TRAINED:
                raise ApiError(400, f"{where}: one system message at most, before the user message", param=where)
            system = _text_content(message.get("content"), f"{where}.content")
        elif role == "user":
            if user is not None:
                raise ApiError(400, f"{where}: chartvlm answers one question about one chart per request: send one "
                                    "user message (multi-turn conversations are not supported)", param=where)
            user = (i, message.get("content"))
        elif role in ("assistant", "tool", "function"):
            raise ApiError(400, f"{where}: role {role!r}: chartvlm answers one question about one chart per request "
                                "(a system message and one user message); earlier turns are not supported",
                           param=f"{where}.role")
        else:
            raise ApiError(400, f"{where}.role must be system or user, got {_echo(role)}", param=f"{where}.role")
    if user is None:
        raise ApiError(400, "no user message: send one with the chart (an image_url part) and the question (text)",
                       param="messages")
    question, question_param, image, image_param = _user_content(*user)
    for text, param, what in ((question, question_param, "question"),
                              (system if isinstance(system, str) else "", "messages", "system message")):
        if len(text) > limits.max_text_chars:
            raise ApiError(400, f"the {what} is {len(text):,} characters long, above this server's limit of "
                                f"{limits.max_text_chars:,} (max_text_chars)", param=param)
    image_bytes, image_url = _image_source(image, image_param, limits)

    # max_completion_tokens is OpenAI's newer name for max_tokens.
    max_tokens = payload.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = payload.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= \
            limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens must be a whole number from 1 to {limits.max_tokens_limit} (this server's "
                            f"max_tokens_limit), got {_echo(max_tokens)}", param="max_tokens")
    temperature = payload.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise ApiError(400, f"temperature must be a number, got {_echo(temperature)}", param="temperature")
    if temperature:
        raise ApiError(400, f"chartvlm serve decodes greedily (temperature 0), as evaluation does, so that answers "
                            f"equal evaluated ones; got temperature={temperature}", param="temperature")
    for name, (neutral, why) in NEUTRAL_ONLY.items():
        value = payload.get(name)
        if value is not None and not any(value == allowed or (isinstance(allowed, tuple) and value == list(allowed))
                                         for allowed in neutral):
            raise ApiError(400, f"{name}={_echo(value)} is not supported: {why}", param=name)
    template_kwargs = payload.get("chat_template_kwargs")
    if template_kwargs is not None and (not isinstance(template_kwargs, dict) or any(
            TEMPLATE_KWARGS.get(key, object()) != value for key, value in template_kwargs.items())):
        raise ApiError(400, f"chat_template_kwargs={_echo(template_kwargs)}: the chat template is rendered as the model "
                            f"was trained, with {TEMPLATE_KWARGS}", param="chat_template_kwargs")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {_echo(stream)}", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {_echo(options)}", param="stream_options")
    return ChatRequest(question=question, question_param=question_param, image_param=image_param,
                       image_bytes=image_bytes, image_url=image_url, system_message=system, max_tokens=max_tokens,
                       stream=bool(stream), include_usage=bool((options or {}).get("include_usage")))


def _echo(value: Any, limit: int = 80) -> str:
    """A client's value quoted in an error message, cut short: an error must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _text_content(content: Any, where: str) -> str:
    """A system message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be text (a string or a list of text parts)", param=where)


def _user_content(index: int, content: Any) -> tuple[str, str, Any, str]:
    """(question, its param, the image_url value, its param) of the user message. Text parts are joined as the
    chat template would render them; the image goes before the question, as in training."""
    where = f"messages[{index}].content"
    if isinstance(content, str):
        raise ApiError(400, f"{where} has no image: send the chart as an image_url part (a data URI such as "
                            "data:image/png;base64,...) next to the question's text part", param=where)
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"{where} must be a list of content parts: one image_url and the question's text",
                       param=where)
    texts, images = [], []
    for j, part in enumerate(content):
        param = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{param}.text must be a string", param=f"{param}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            value = part.get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str):
                raise ApiError(400, f"{param}.image_url must be an object with a url string", param=f"{param}.image_url")
            images.append((url, f"{param}.image_url"))
        else:
            shown = _echo(kind) if kind is not None else repr(type(part).__name__)
            raise ApiError(400, f"{param}: content part type {shown} is not supported; send text and image_url "
                                "parts", param=f"{param}.type")
    if not images:
        raise ApiError(400, f"{where} has no image: add the chart as an image_url part (a data URI such as "
                            "data:image/png;base64,...)", param=where)
    if len(images) > 1:
        raise ApiError(400, f"{where} has {len(images)} images: chartvlm answers about one chart per question",
                       param=images[1][1])
    question = "".join(texts)
    if not question.strip():
        raise ApiError(400, f"{where} has no question: add a text part", param=where)
    return question, where, images[0][0], images[0][1]


def _image_source(url: str, param: str, limits: ServeLimits) -> tuple[bytes | None, str | None]:
    """(bytes of a data URI, None) or (None, an http(s) address to fetch)."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        parts = header[len("data:"):].split(";")
        media = parts[0].strip().lower()
        if not comma or "base64" not in parts[1:]:
            raise ApiError(400, f"{param} must be a base64 data URI (data:image/png;base64,...)", param=param)
        if media and not media.startswith("image/") and media != "application/octet-stream":
            raise ApiError(400, f"{param}: the data URI's media type is {_echo(media)}, not an image", param=param)
        try:
            # Line breaks are legal in base64 (MIME's 76-character lines); anything else outside its alphabet is not.
            return base64.b64decode("".join(payload.split()), validate=True), None
        except (binascii.Error, ValueError) as error:
            raise ApiError(400, f"{param}: the data URI's base64 is corrupt ({error})", param=param) from None
    if url.startswith(("http://", "https://")):
        if not limits.allow_image_urls:
            raise ApiError(400, f"{param}: image URLs are disabled on this server; send the chart as a data URI "
                                "(data:image/png;base64,...), or start the server with --allow_image_urls true",
                           param=param)
        return None, url
    raise ApiError(400, f"{param} must be a data URI (data:image/png;base64,...) or an http(s) URL, got "
                        f"{url[:40]!r}", param=param)


def prepared_image(data: bytes, where: str, limits: ServeLimits, processor, style=None):
    """The request's image as every stage hands it to the processor, after data loading's checks; refused from
    its header alone when above max_image_pixels (nothing is decoded for that). Raises BadSampleError."""
    from PIL import Image

    from chartvlm.images import check_image, model_image, open_image

    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError as error:
        raise BadSampleError(where, f"{error} Downscale the image.") from None
    except Exception:  # noqa: BLE001 - not an image, or a damaged one: check_image says which
        width = height = 0
    if width * height > limits.max_image_pixels:
        raise BadSampleError(where, f"the image is {width}x{height} = {width * height:,} pixels, above this server's "
                                    f"limit of {limits.max_image_pixels:,} (max_image_pixels); downscale it")
    check_image({"bytes": data, "path": None}, where)
    return model_image(open_image(data, where), processor, where, style)


async def fetch_image(url: str, param: str, limits: ServeLimits) -> bytes:
    """The bytes at an http(s) image URL (allow_image_urls): no redirects, at most max_body_bytes, within
    image_url_timeout."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=limits.image_url_timeout, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ApiError(400, f"{param}: fetching {url} gave HTTP {response.status_code}", param=param)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limits.max_body_bytes:
                        raise ApiError(400, f"{param}: the image at {url} is larger than {limits.max_body_bytes:,} "
                                            "bytes (max_body_bytes)", param=param)
                return bytes(data)
    except httpx.HTTPError as error:
        raise ApiError(400, f"{param}: {url} could not be fetched ({type(error).__name__}: {error})",
                       param=param) from None


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, above this server's limit of {limit:,} "
                            "(max_body_bytes)", code="request_too_large")
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is above this server's limit of {limit:,} bytes (max_body_bytes)",
                           code="request_too_large")
        body.append(chunk)
    return b"".join(body)


def completion_body(completion_id: str, created: int, name: str, completion) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.answer},
                         "logprobs": None, "finish_reason": "stop" if completion.stopped else "length"}],
            "usage": _usage(completion)}


def stream_events(completion_id: str, created: int, name: str, completion, include_usage: bool) -> list[str]:
    """OpenAI's server-sent events for a finished answer: the role, the answer, the finish reason, the usage
    (stream_options.include_usage), then [DONE]."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name}

    def chunk(delta: dict, finish: str | None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    events = [chunk({"role": "assistant", "content": ""}, None)]
    if completion.answer:
        events.append(chunk({"content": completion.answer}, None))
    events.append(chunk({}, "stop" if completion.stopped else "length"))
    if include_usage:
        events.append({**base, "choices": [], "usage": _usage(completion)})
    return [f"data: {json.dumps(event, ensure_ascii=False)}\n\n" for event in events] + ["data: [DONE]\n\n"]


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


# ---------------------------------------------------------------------------------------------- the app
def create_app(served: ServedModel, limits: ServeLimits | None = None):
    """The FastAPI app serving `served`. The batcher's worker and the image threads start and stop with the app
    (its lifespan); `app.state.batcher` holds the counters /health reports."""
    from concurrent.futures import ThreadPoolExecutor
    from importlib.resources import files

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    limits = limits or ServeLimits()
    if limits.max_tokens_limit is None:
        limits = dataclasses.replace(limits, max_tokens_limit=max(MAX_TOKENS_LIMIT, served.setup.asked.max_new_tokens))
    batcher = Batcher(served.answer, limits.max_batch, limits.batch_window_ms / 1000, limits.queue_size)
    page = files("chartvlm").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    started = int(time.time())
    # Requests between arrival and answer; bounding them bounds the bodies and images held in memory.
    admission = {"in_flight": 0, "limit": limits.queue_size + limits.max_batch}
    pool: dict[str, ThreadPoolExecutor] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        pool["images"] = ThreadPoolExecutor(limits.image_workers, thread_name_prefix="chartvlm-image")
        batcher.start()
        logger.info("serving %s (batches of up to %d, queue %d)", served.name, limits.max_batch, limits.queue_size)
        try:
            yield
        finally:
            batcher.stop()
            pool["images"].shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="chartvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(HTTPException)
    async def http_error(request, error):  # unknown paths and methods, in OpenAI's shape too
        return error_response(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                              code="not_found" if error.status_code == 404 else None)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    async def health():
        body = {"status": "ok" if batcher.alive else "error", "model": served.name, "queued": batcher.jobs.qsize(),
                "in_flight": admission["in_flight"], **batcher.stats}
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": started,
                                            "owned_by": "chartvlm", "root": served.model_path,
                                            "chartvlm": served.describe()}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if admission["in_flight"] >= admission["limit"]:
            return overloaded(f"{admission['in_flight']} requests in progress").response()
        admission["in_flight"] += 1
        try:
            return await answer(request)
        except ApiError as error:
            return error.response()
        except Exception:  # noqa: BLE001 - one request's failure must not take the server down
            logger.exception("answering a request failed")
            return error_response(500, "the server failed to answer this request (see its log)", kind="server_error")
        finally:
            admission["in_flight"] -= 1

    async def answer(request):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.request_timeout
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), got Content-Type "
                                f"{content_type!r}", code="unsupported_media_type")
        body = await _within(read_body(request, limits.max_body_bytes), deadline, 408,
                             "the request body did not arrive in time")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None
        asked = parse_chat_request(payload, served.name, limits, served.setup.asked.max_new_tokens)
        data = asked.image_bytes
        if data is None:
            data = await _within(fetch_image(asked.image_url, asked.image_param, limits), deadline, 504,
                                 "fetching the image took too long")
        try:
            image = await _within(loop.run_in_executor(pool["images"], prepared_image, data, asked.image_param, limits,
                                                       served.setup.processor, served.setup.asked.style),
                                  deadline, 504, "decoding the image took too long")
            conversation = served.setup.conversation(image, asked.question, asked.question_param,
                                                     system_message=asked.system_message)
        except BadSampleError as error:
            raise ApiError(400, str(error), param=error.where) from None
        job = Job(conversation, asked.max_tokens)
        if not batcher.submit(job):
            raise overloaded(f"{limits.queue_size} requests queued")
        completion = await wait_for_answer(job, request, deadline)
        if completion is None:  # the client left: nobody reads this
            return Response(status_code=499)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if asked.stream:
            events = stream_events(completion_id, created, served.name, completion, asked.include_usage)
            return StreamingResponse(iter(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return completion_body(completion_id, created, served.name, completion)

    async def wait_for_answer(job: Job, request, deadline: float):
        """The job's Completion; None when the client disconnected first. Out of time: 504. Either way the job is
        cancelled, so the worker drops it if it has not started."""
        loop = asyncio.get_running_loop()
        waiter = asyncio.wrap_future(job.future)
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" warnings
        while not waiter.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                job.future.cancel()
                raise ApiError(504, f"no answer within {limits.request_timeout:g} s (request_timeout)", code="timeout")
            await asyncio.wait({waiter}, timeout=min(DISCONNECT_POLL_S, remaining))
            if not waiter.done() and await request.is_disconnected():
                dropped = job.future.cancel()
                logger.info("a client disconnected; its request was %s", "dropped before generation" if dropped
                            else "being generated, the answer is discarded")
                return None
        if waiter.cancelled():  # the server is stopping
            raise overloaded("shutting down")
        error = waiter.exception()
        if isinstance(error, BadSampleError):
            raise ApiError(400, str(error), param=error.where)
        if error is not None:
            raise error
        return waiter.result()

    return app


async def _within(awaitable, deadline: float, status: int, message: str):
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(awaitable, timeout=max(deadline - loop.time(), 0.0))
    except asyncio.TimeoutError:
        raise ApiError(status, message, code="timeout") from None


# ---------------------------------------------------------------------------------------------- running
def run_server(arguments: ServerArguments, limits: ServeLimits) -> None:
    """`chartvlm serve`: load the model, then serve until Ctrl-C."""
    import uvicorn

    served = load_served_model(arguments, limits)
    app = create_app(served, limits)
    logger.info("serving %r at http://%s:%d  (page: /, API: /v1/chat/completions)", served.name, arguments.host,
                arguments.port)
    # log_config None: uvicorn's loggers go through the logging chartvlm's CLI configured.
    uvicorn.run(app, host=arguments.host, port=arguments.port, log_config=None, timeout_graceful_shutdown=10)


class ServerThread:
    """uvicorn serving `app` from a background thread (tests, `chartvlm bench serve`); port 0 picks a free one.

        with ServerThread(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.host = host
        self.thread = threading.Thread(target=self.server.run, name="chartvlm-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ChartVLMError("the server thread did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
