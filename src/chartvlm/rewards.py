"""GRPO rewards: small named functions that score every completion of a generation batch.

They take TRL's reward-function call, so a user's own function written for TRL works here unchanged:
keyword arguments `completions` (each completion as TRL gives it: a list holding the assistant message, or a
string), `completion_ids` (its token ids, up to and including the end token), `prompts`, and every column of
the training rows, one value per completion: `label` (the answers the metric accepts), `query` (the question),
`row_id`. A reward returns one float per completion, or None for a completion it does not score.

The answer a reward scores is the one evaluation scores: `prompts.extract_answer` of the decoded completion
(after a <think>...</think> block, stripped), judged by `chartvlm.metrics`. A config names the rewards with
their weights (`rewards: {relaxed_accuracy: 1.0, format: 0.5}`); GRPO maximises the weighted sum.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable

from chartvlm.errors import ChartVLMError
from chartvlm.metrics import relaxed_accuracy as metric_accuracy
from chartvlm.prompts import extract_answer

# A ChartQA answer is a word, a number or a short name ("Democratic Republic of the Congo"): longer text is an
# explanation, which the metric scores as wrong.
MAX_ANSWER_WORDS = 10
_TAG = re.compile(r"</?(think|analysis)>")
_REASONED = re.compile(r"\s*<think>(?P<reasoning>.*?)</think>(?P<answer>.*)", re.DOTALL)


def completion_text(completion) -> str:
    """The decoded text of one completion as TRL passes it (conversational: [{"role", "content"}])."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def is_bare_answer(text: str) -> bool:
    """One line of at most MAX_ANSWER_WORDS words, no reasoning tag: what the system prompt asks for."""
    text = text.strip()
    return bool(text) and "\n" not in text and not _TAG.search(text) and len(text.split()) <= MAX_ANSWER_WORDS


def is_reasoned_answer(text: str) -> bool:
    """One non-empty <think>...</think> block first, then a bare answer."""
    found = _REASONED.fullmatch(text)
    return bool(found and found["reasoning"].strip() and not _TAG.search(found["reasoning"])
                and is_bare_answer(found["answer"]))


def relaxed_accuracy(completions: list, label: list, metric: str = "relaxed", **_) -> list[float]:
    """The ChartQA metric of each completion's answer (1.0 if it is right for any label, else 0.0), exactly as
    evaluation scores it."""
    return [metric_accuracy(extract_answer(completion_text(c)), labels, metric=metric)
            for c, labels in zip(completions, label, strict=True)]


def answer_format(completions: list, reasoning: bool = False, **_) -> list[float]:
    """1.0 for a completion in the asked form, else 0.0: a bare answer, or with reasoning <think>...</think>
    followed by a bare answer."""
    check = is_reasoned_answer if reasoning else is_bare_answer
    return [float(check(completion_text(c))) for c in completions]


def length_penalty(completion_ids: list, max_completion_length: int, buffer: int, **_) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to max_completion_length - buffer tokens, then down linearly to -1 at
    the limit, where a completion was cut short."""
    free = max_completion_length - buffer
    return [0.0 if len(ids) <= free else max(-1.0, (free - len(ids)) / buffer) for ids in completion_ids]


def _named(function: Callable, name: str, **settings) -> Callable:
    """`function` with its settings bound, under the name the config gives it: TRL logs a reward by its function's
    name (rewards/<name>/mean)."""

    def reward(**kwargs):
        return function(**kwargs, **settings)

    reward.__name__ = reward.__qualname__ = name
    return reward


def user_reward(spec: str) -> Callable:
    """The function a "module:function" entry names (a module installed, on PYTHONPATH or in the working
    folder), logged under `spec` and checked on every call (`checked_rewards`)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ChartVLMError(f"rewards: {spec!r} is neither a chartvlm reward ({', '.join(BUILT_IN)}) nor "
                            "'module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:  # `python -m` puts it there; console scripts do not
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ChartVLMError(f"rewards: cannot import {module_name!r} for {spec!r}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        where = getattr(module, "__file__", None)
        raise ChartVLMError(f"rewards: {module_name}{f' ({where})' if where else ''} has no function "
                            f"{function_name!r} ({spec!r})")
    return checked_rewards(function, spec)


def checked_rewards(function: Callable, name: str) -> Callable:
    """`function` (sync or async) under `name`, its result checked: one reward per completion, each a finite
    number or None (NaN counts as None, as in TRL). A wrong result stops training with a message naming the
    reward, not a tensor error."""

    def check(rewards, completions) -> list:
        if isinstance(rewards, (str, bytes)) or not hasattr(rewards, "__len__"):
            raise ChartVLMError(f"reward {name} returned {type(rewards).__name__}, not a list of one reward per "
                                "completion")
        if len(rewards) != len(completions):
            raise ChartVLMError(f"reward {name} returned {len(rewards)} rewards for {len(completions)} completions "
                                "(one per completion, None for one it does not score)")
        for i, value in enumerate(rewards):
            if value is not None and (isinstance(value, (str, bytes, bool)) or not _is_number(value)):
                raise ChartVLMError(f"reward {name} returned {value!r} for completion {i}: a reward is a finite "
                                    "number, or None (or NaN) for a completion it does not score")
        return list(rewards)

    if inspect.iscoroutinefunction(function):
        async def reward(**kwargs):
            return check(await function(**kwargs), kwargs["completions"])
    else:
        def reward(**kwargs):
            return check(function(**kwargs), kwargs["completions"])
    reward.__name__ = reward.__qualname__ = name
    return reward


def _is_number(value) -> bool:
    try:
        return not math.isinf(float(value))
    except (TypeError, ValueError):
        return False


BUILT_IN = ("relaxed_accuracy", "format", "length_penalty")


def build_rewards(rewards: dict[str, float], *, metric: str, reasoning: bool, max_completion_length: int,
                  length_penalty_buffer: int | None = None) -> tuple[list[Callable], list[float]]:
    """The reward functions a config names, with their weights, in its order."""
    functions, weights = [], []
    for name, weight in rewards.items():
        if name == "relaxed_accuracy":
            function = _named(relaxed_accuracy, name, metric=metric)
        elif name == "format":
            function = _named(answer_format, name, reasoning=reasoning)
        elif name == "length_penalty":
            buffer = length_penalty_buffer or max(1, max_completion_length // 4)
            if buffer > max_completion_length:
                raise ChartVLMError(f"length_penalty_buffer={buffer} is longer than max_completion_length="
                                    f"{max_completion_length}")
            function = _named(length_penalty, name, max_completion_length=max_completion_length, buffer=buffer)
        else:
            function = user_reward(name)
        functions.append(function)
        weights.append(float(weight))
    return functions, weights
