"""Evaluation through an OpenAI-compatible chat-completions server (`chartvlm eval --backend openai`): chartvlm serve,
vllm serve, SGLang, ...

Only the asking differs from in-process evaluation: the same questions (evaluate.load_test_split), the same
conversation (EvalSettings.messages: the system prompt sent as a system message, the question as text), the same
predictions.jsonl rows (evaluate.prediction_record), resumable and keyed on run.json, which holds the backend, the
server's address and the served model too, so a resume never mixes backends; the same metrics.json and report.
The model folder (model_name_or_path, adapter) gives the trained settings and the processor; no weights are loaded.

The image sent is the one in-process evaluation hands the processor (images.model_image: EXIF orientation applied,
huge images shrunk, RGB), as a lossless PNG data URI: a server that resizes with the same pixel limits computes the
same pixel_values. chartvlm serve says its limits in /v1/models and a difference is refused; vLLM must be started
with them (--mm-processor-kwargs, README).

Requests: request_concurrency in flight (the server batches them), each within request_timeout, retried up to
request_retries times with exponential backoff on 429, 5xx and connection errors (a Retry-After header is honoured);
any other refusal stops the evaluation with the server's message, keeping the answers so far for a resume.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import time
from pathlib import Path

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

# Retried statuses: rate-limited, overloaded, or a failing server that may recover.
RETRIED_STATUSES = (429, 500, 502, 503, 504)
BACKOFF_S = 0.5        # the first retry's wait, doubled at each further one
BACKOFF_MAX_S = 30.0   # the longest wait between tries (a larger Retry-After too)


def api_url(base_url: str) -> str:
    """The OpenAI API root of a server address: http://host:port and http://host:port/v1 both name .../v1."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def image_data_uri(image) -> str:
    """A PIL image as a PNG data URI: lossless, so the server decodes exactly these pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless at every level; 1 is the fastest
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_body(conversation: list[dict], image_uri: str, served_model: str, max_tokens: int,
              template_kwargs: dict | None = None) -> dict:
    """The chat-completions request for a conversation of prompts.build_messages (its image given as `image_uri`):
    the system turn as a system message, the user turn as image_url and text parts in their order, greedy."""
    messages = []
    for message in conversation:
        if message["role"] == "assistant":
            continue
        parts = []
        for item in message["content"]:
            if item["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": image_uri}})
            else:
                parts.append({"type": "text", "text": item["text"]})
        if message["role"] == "system":
            parts = "".join(part["text"] for part in parts)
        messages.append({"role": message["role"], "content": parts})
    body = {"model": served_model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if template_kwargs:  # vLLM and SGLang pass these to the chat template (Qwen3.5: enable_thinking false)
        body["chat_template_kwargs"] = template_kwargs
    return body


def error_message(response) -> str:
    """The message of an error response: OpenAI's {"error": {"message"}}, vLLM's older {"message"}, or its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return response.text[:300]


class ChatClient:
    """Chat completions from one server, with retries. Safe to share between threads (httpx.Client is)."""

    def __init__(self, base_url: str, timeout: float = 300.0, retries: int = 5, backoff_s: float = BACKOFF_S,
                 transport=None):
        import httpx

        self.url = api_url(base_url)
        self.retries, self.backoff_s = retries, backoff_s
        self.http = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def models(self) -> list[dict]:
        """The entries of the server's GET /v1/models."""
        import httpx

        try:
            response = self.http.get(self.url + "/models")
        except httpx.HTTPError as error:
            raise ChartVLMError(f"cannot reach the server at {self.url} ({type(error).__name__}: {error}); is it "
                                "running? (chartvlm serve --model DIR, or vllm serve)") from None
        if response.status_code != 200:
            raise ChartVLMError(f"{self.url}/models answered HTTP {response.status_code}: {error_message(response)}")
        try:
            return list(response.json()["data"])
        except (ValueError, KeyError, TypeError):
            raise ChartVLMError(f"{self.url}/models did not answer an OpenAI model list") from None

    def complete(self, body: dict, where: str) -> str:
        """The answer text (choices[0].message.content) for a chat-completions `body`. 429, 5xx and connection
        errors are retried with backoff; another refusal, or the last failed try, raises ChartVLMError naming
        `where` and the server's message."""
        import httpx

        for attempt in range(self.retries + 1):
            wait = None
            try:
                response = self.http.post(self.url + "/chat/completions", json=body)
            except httpx.TransportError as error:  # refused or dropped connections, timeouts
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return _answer_text(response, where)
                problem = f"HTTP {response.status_code}: {error_message(response)}"
                if response.status_code not in RETRIED_STATUSES:
                    raise ChartVLMError(f"{where}: the server refused the question: {problem}")
                wait = _retry_after(response)
            if attempt == self.retries:
                raise ChartVLMError(f"{where}: no answer from {self.url} after {attempt + 1} tries; the last one: "
                                    f"{problem}")
            # Jitter keeps the concurrent requests that failed together from retrying together.
            delay = min(wait if wait is not None else self.backoff_s * 2 ** attempt * random.uniform(0.75, 1.25),
                        BACKOFF_MAX_S)
            logger.debug("%s: %s; retrying in %.2f s", where, problem, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")


def _retry_after(response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(float(value), 0.0)
    except ValueError:  # absent, or an HTTP date: back off exponentially
        return None


def _answer_text(response, where: str) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ChartVLMError(f"{where}: the server's answer is not a chat completion: {response.text[:300]}") from None
    return content or ""


# ---------------------------------------------------------------------------------------------- evaluation
def check_backend_config(config, comparing: bool) -> None:
    """Before anything is loaded: what the openai backend cannot do as in-process evaluation does."""
    from chartvlm.distributed import world_size

    if comparing:
        raise ChartVLMError("backend openai evaluates the one served model: evaluate the other model in its own run "
                            "(compare_model / compare_adapter are in-process only)")
    if world_size() > 1:
        raise ChartVLMError("backend openai runs in one process: raise request_concurrency instead of launching "
                            "several ranks")
    if config.eval.prompt_style != "chartvlm":
        raise ChartVLMError(f"backend openai asks with chartvlm's prompt style only: {config.eval.prompt_style} "
                            "reproduces a harness's own image resizing and decoding, which in-process evaluation does")
    if config.eval.generation_config not in (None, "chartvlm"):
        raise ChartVLMError(f"backend openai decodes greedily (temperature 0); generation_config "
                            f"{config.eval.generation_config} reads the checkpoint's generation_config.json, which "
                            "only the server has")


def served_entry(client: ChatClient, name: str | None) -> dict:
    """The /v1/models entry of `name`, or of the server's only model when `name` is None."""
    entries = client.models()
    ids = [entry.get("id") for entry in entries]
    if name is None:
        if len(entries) != 1:
            raise ChartVLMError(f"the server at {client.url} serves {ids}: choose one with --served_model")
        return entries[0]
    for entry in entries:
        if entry.get("id") == name:
            return entry
    raise ChartVLMError(f"the server at {client.url} does not serve {name!r}; it serves {ids}")


def check_served_settings(entry: dict, settings) -> None:
    """A chartvlm server says how it resizes images: it must be the way this evaluation prepares them, or its
    answers would differ from in-process evaluation's. Other servers cannot tell (README: start vLLM with them)."""
    info = entry.get("chartvlm")
    if not isinstance(info, dict):
        logger.warning("%s does not say how it resizes images: it must use min_pixels=%d and max_pixels=%d (vllm serve "
                       "--mm-processor-kwargs), or its answers will differ from in-process evaluation",
                       entry.get("id"), settings.min_pixels, settings.max_pixels)
        return
    served = (info.get("min_pixels"), info.get("max_pixels"))
    if served != (settings.min_pixels, settings.max_pixels):
        raise ChartVLMError(f"the server resizes images to {served[0]:,}-{served[1]:,} pixels, this evaluation to "
                            f"{settings.min_pixels:,}-{settings.max_pixels:,}: the answers would differ from in-process "
                            "evaluation; serve the folder this evaluation reads its settings from, or pass its "
                            "--min_pixels and --max_pixels")
    digests = info.get("digests") or {}
    for name in ("model", "adapter"):
        local, remote = getattr(settings, f"{name}_digest"), digests.get(name)
        if remote and local and remote != local:
            logger.warning("the server's %s weights differ from %s's (digest %s, not %s); the run records the "
                           "server's", name, settings.model if name == "model" else settings.adapter, remote, local)
        if remote:
            setattr(settings, f"{name}_digest", remote)


def evaluate_through_server(config, model_path: str, adapter: str | None, out_dir: Path, dataset,
                            progress: bool = True, skipped=None, in_split: int | None = None):
    """evaluate.evaluate_one with the answers asked of the server at config.eval.base_url."""
    from chartvlm.evaluate import eval_settings
    from chartvlm.modeling import load_processor, model_type
    from chartvlm.prompts import template_variables
    from chartvlm.settings import resolve

    asked = resolve(config, model_path, adapter)
    processor = load_processor(asked.trained_folder or model_path, asked.min_pixels, asked.max_pixels)
    settings = eval_settings(config, asked, model_path, adapter, model_type(model_path), processor, dataset,
                             skipped, in_split)
    if settings.system_message is None:
        raise ChartVLMError("backend openai sends the system prompt as a message; a run without one cannot be asked "
                            "of a server, which adds its own default when a request has none")
    client = ChatClient(config.eval.base_url, config.eval.request_timeout, config.eval.request_retries)
    try:
        entry = served_entry(client, config.eval.served_model)
        check_served_settings(entry, settings)
        settings.backend, settings.base_url, settings.served_model = "openai", client.url, entry["id"]
        settings.request_concurrency = config.eval.request_concurrency
        logger.info("evaluating %s at %s (settings of %s%s) on %s/%s (%d questions, %d requests at a time) -> %s",
                    settings.served_model, client.url, model_path, f" + {adapter}" if adapter else "",
                    config.data.dataset, config.data.test_split, len(dataset), settings.request_concurrency, out_dir)
        return remote_predictions(client, processor, dataset, out_dir, settings, template_variables(processor),
                                  progress=progress)
    finally:
        client.close()


def remote_predictions(client: ChatClient, processor, dataset, out_dir: str | Path, settings,
                       template_variables: dict | None = None, resume: bool = True, progress: bool = True):
    """evaluate.run_predictions through `client`: every row of `dataset` asked of the server (settings.served_model,
    settings.request_concurrency requests in flight), scored and streamed to out_dir/predictions.jsonl as it
    arrives, then put in dataset order; returns the results (metrics.json)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    from chartvlm.evaluate import (_check_or_write_fingerprint, _complete_rows, _put_in_dataset_order,
                                   prediction_record, question_id, write_result)
    from chartvlm.images import model_image
    from chartvlm.prompts import extract_answer, message_image, prompt_style

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_fingerprint(out, settings, resume)
    predictions = out / "predictions.jsonl"
    done = {row["index"] for row in _complete_rows(predictions)}
    pending = [i for i in range(len(dataset)) if i not in done]
    if done:
        logger.info("resuming: %d of %d questions already scored", len(done), len(dataset))
    style = prompt_style(settings.prompt_style)

    def ask(index: int, row: dict) -> str:
        where = f"question {index} ({question_id(row, index, settings.split)})"
        conversation = settings.messages(row)
        image = model_image(message_image(conversation), processor, where, style)
        body = chat_body(conversation, image_data_uri(image), settings.served_model, settings.max_new_tokens,
                         template_variables)
        return extract_answer(client.complete(body, where))

    concurrency = settings.request_concurrency or 1
    started = time.perf_counter()
    bar = tqdm(total=len(done) + len(pending), initial=len(done), unit="q", desc="eval", disable=not progress)
    answered = len(done)
    upcoming = iter(pending)
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="chartvlm-ask")
    in_flight: dict = {}

    def top_up() -> None:
        # Rows are read here, in one thread; at most two per request slot wait, so memory stays bounded.
        while len(in_flight) < 2 * concurrency:
            index = next(upcoming, None)
            if index is None:
                return
            row = dataset[index]
            in_flight[pool.submit(ask, index, row)] = (index, row)

    try:
        with predictions.open("a", encoding="utf-8") as sink:
            top_up()
            while in_flight:
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    index, row = in_flight.pop(future)
                    record = prediction_record(row, index, settings.split, future.result(), settings.metric)
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()
                    os.fsync(sink.fileno())
                    answered += 1
                    bar.update(1)
                top_up()
    except ChartVLMError as error:
        raise ChartVLMError(f"{error}. The {answered} questions answered before are kept in {predictions}: run the "
                            "same command again to resume") from None
    except OSError as error:
        raise ChartVLMError(f"writing {predictions} failed: {error.strerror}; the {answered} questions answered "
                            "before are kept: fix that and run the same command again to resume") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    elapsed = time.perf_counter() - started
    _put_in_dataset_order(predictions)
    return write_result(out, settings, questions_timed=len(pending), seconds=elapsed)
