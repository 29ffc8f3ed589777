"""Scoring: ChartQA relaxed accuracy and the per-split / per-question-type summary.

`relaxed_correctness` is the standard metric (Pix2Struct / MatCha / lmms-eval): a number may be
off by 5% of the TARGET, anything else must match case-insensitively. Two other metrics exist
only under their own names, so a score is never silently computed with a non-standard rule:

- `relaxed_correctness_swapped`: the 5% is measured relative to the PREDICTION, which is what
  Qwen-VL's and InternVL's eval scripts (and VLMEvalKit before Sep 2025) compute because they
  pass the arguments in the other order. Use it only to compare with numbers from those scripts.
- `lenient_correctness`: strips commas, "$", a trailing "." and "%" first. Not the standard.

Parsing follows Python's `float()` exactly, as the reference implementation does. That means
"1e3", "1_000", " 42 " and "inf"/"nan" all parse. NaN never matches numerically: a NaN on
either side makes the relative change NaN, which fails the `<=` test, and because a NaN target
is truthy there is no fall-back to string equality either ("nan" vs "nan" is wrong). The same
holds for an infinite target (inf - inf is NaN). Real ChartQA labels contain neither.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

# Order in which splits are listed; any other split name follows, sorted.
SPLIT_ORDER = ("human", "augmented")


def _parse_number(text: str) -> float | None:
    """ChartQA's number parsing: trailing "%" divides by 100, otherwise plain `float()`."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _within_tolerance(candidate: str, reference: str, max_relative_change: float) -> bool:
    """The relaxed rule with the tolerance taken relative to `reference`.

    Numeric comparison only when `candidate` parses and `reference` parses to a non-zero
    number; otherwise case-insensitive string equality (so a zero reference needs the same
    spelling: "0.0" does not match "0").
    """
    candidate_value = _parse_number(candidate)
    reference_value = _parse_number(reference)
    if candidate_value is not None and reference_value:
        relative_change = abs(candidate_value - reference_value) / abs(reference_value)
        return relative_change <= max_relative_change
    return candidate.lower() == reference.lower()


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """Standard ChartQA relaxed correctness of one prediction against one label.

    The prediction is stripped of surrounding whitespace (the reference definition scores the
    stripped prediction); the target is used as given. If the prediction parses as a number and
    the target parses as a non-zero number, correct iff |p - t| / |t| <= max_relative_change.
    Otherwise correct iff the lower-cased strings are equal. No other normalisation: "1,000",
    "$42", "62%" (against 62) and "Yes." are wrong. See the module docstring for NaN/inf.
    """
    return _within_tolerance(prediction.strip(), target, max_relative_change)


def relaxed_correctness_swapped(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """NOT the standard metric: relaxed correctness with the tolerance relative to the PREDICTION.

    Reproduces Qwen-VL's / InternVL's / old VLMEvalKit's scoring, which call the standard function
    with prediction and target swapped: against target 100, "95" is wrong and "105.2" is right.
    Also the zero check moves to the prediction (a prediction of "0" falls back to string equality).
    """
    return _within_tolerance(target, prediction.strip(), max_relative_change)


def _lenient_normalise(text: str) -> str:
    return text.strip().replace(",", "").replace("$", "").rstrip(" .%")


def lenient_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """NOT the standard metric: the standard check after a forgiving clean-up of both strings.

    Both prediction and target lose surrounding whitespace, every "," and "$", and any trailing
    "." and "%" characters; so "1,625,942" matches 1625942, "62%" matches 62, "$42" matches 42
    and "Yes." matches "Yes". Note that "62%" then no longer matches 0.62, and a decimal comma
    ("6,8") becomes 68.
    """
    return _within_tolerance(_lenient_normalise(prediction), _lenient_normalise(target), max_relative_change)


METRICS: dict[str, Callable[[str, str, float], bool]] = {
    "relaxed": relaxed_correctness,
    "relaxed_swapped": relaxed_correctness_swapped,
    "lenient": lenient_correctness,
}


def relaxed_accuracy(prediction: str, labels: Sequence[str], metric: str = "relaxed") -> float:
    """1.0 if the prediction is correct for ANY of the labels under `metric`, else 0.0.

    `metric` is a key of `METRICS` ("relaxed" is the standard ChartQA metric). The prediction is
    stripped of surrounding whitespace. A single label given as a bare string is treated as a
    one-element list (not as a sequence of characters).
    """
    if metric not in METRICS:
        raise ChartVLMError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not isinstance(prediction, str):
        raise ChartVLMError(f"prediction must be a string, got {type(prediction).__name__}: {prediction!r}")
    if isinstance(labels, str):
        labels = [labels]
    if len(labels) == 0:
        raise ChartVLMError(f"no labels to score prediction {prediction!r} against")
    for label in labels:
        if not isinstance(label, str):
            raise ChartVLMError(f"labels must be strings, got {type(label).__name__} {label!r} in {list(labels)!r}")
    correct = METRICS[metric]  # each metric strips the prediction itself
    return 1.0 if any(correct(prediction, label) for label in labels) else 0.0


def _tally(correct: int, total: int) -> dict:
    return {"accuracy": 100.0 * correct / total, "correct": correct, "total": total}


def summarise(rows: Iterable[dict]) -> dict:
    """Accuracy (percent, 0-100, unrounded) overall, per split and per question type.

    Each row is a prediction record with at least "correct" (bool); "split" ("human" /
    "augmented") and "question_type" are optional, and rows where they are missing or None are
    left out of that breakdown only. Returns
    {"overall": {"accuracy", "correct", "total"}, "by_split": {name: {...}},
    "by_question_type": {name: {...}}}; splits are listed human, augmented, then others sorted;
    question types sorted.
    """
    counts: dict[str, dict[str, list[int]]] = {"by_split": {}, "by_question_type": {}}
    n_correct = n_total = 0
    for index, row in enumerate(rows):
        if "correct" not in row:
            where = f"id {row['id']!r}" if "id" in row else f"row {index}"
            raise ChartVLMError(f"prediction record {where} has no 'correct' field: {row!r}")
        hit = int(bool(row["correct"]))
        n_correct += hit
        n_total += 1
        for group, key in (("by_split", "split"), ("by_question_type", "question_type")):
            name = row.get(key)
            if name is None:
                continue
            tally = counts[group].setdefault(str(name), [0, 0])
            tally[0] += hit
            tally[1] += 1
    if n_total == 0:
        raise ChartVLMError("no prediction records to summarise (the evaluation produced 0 rows)")

    def split_key(name: str) -> tuple:
        return (SPLIT_ORDER.index(name), "") if name in SPLIT_ORDER else (len(SPLIT_ORDER), name)

    return {
        "overall": _tally(n_correct, n_total),
        "by_split": {name: _tally(*counts["by_split"][name]) for name in sorted(counts["by_split"], key=split_key)},
        "by_question_type": {
            name: _tally(*counts["by_question_type"][name]) for name in sorted(counts["by_question_type"])
        },
    }
