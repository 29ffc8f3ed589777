"""The results of one evaluation: what metrics.json holds, written by evaluation, read by the report, the
comparison table and the quick start. One dataclass, so a key the report shows is a key evaluation writes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from chartvlm.errors import ChartVLMError
from chartvlm.metrics import SPLIT_ORDER

SCHEMA = "chartvlm.eval/1"
METRICS_FILENAME = "metrics.json"


@dataclass
class EvalResult:
    """Relaxed accuracy (percent) overall, per split and per question type, and everything needed to reproduce
    it: the model, the questions asked, the exact prompt, the pixels and every generation setting."""

    model: str
    adapter: str | None
    dataset: str
    split: str
    # evaluated, in_split, test_subset, subset_seed, skipped, duplicated, on_bad_sample
    questions: dict
    metric: str
    overall: dict                   # {"accuracy", "correct", "total"}
    by_split: dict
    by_question_type: dict
    prompt_style: str
    system_message: str | None      # None: no system turn (the template's default, if any)
    prompt: str                     # the exact text before the answer, "{question}" for each question
    pixels: dict                    # min, max (the processor's), pre_resize (a harness's, or null)
    generation: dict                # every effective generation setting
    fingerprint: dict               # content digests of the model, adapter and questions
    throughput: dict
    chartvlm_version: str = ""
    schema: str = SCHEMA
    extra: dict = field(default_factory=dict)
    # Where the answers came from: {"name": "inprocess"}, or the server asked (name openai, base_url, served_model,
    # request_concurrency). Older metrics.json files have none: in-process.
    backend: dict = field(default_factory=lambda: {"name": "inprocess"})
    # The prompt asked for reasoning in <think>...</think>; the answer scored is the text after it.
    reasoning: bool = False

    def save(self, folder: str | Path) -> Path:
        from chartvlm.io import atomic_write_json

        return atomic_write_json(Path(folder) / METRICS_FILENAME, asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> EvalResult:
        path = Path(folder) / METRICS_FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ChartVLMError(f"{path}: cannot read the evaluation results ({error})") from None
        if data.get("schema") != SCHEMA:
            raise ChartVLMError(f"{path} was written by another chartvlm version (schema {data.get('schema')!r}, "
                                f"expected {SCHEMA}); evaluate again into a new folder")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def subset_line(self) -> str | None:
        """The one line that says a subset was evaluated, or None for the whole split."""
        q = self.questions
        if q.get("test_subset") is None:
            return None
        return (f"evaluating {q['evaluated']:,} of {q['in_split']:,} questions: test_subset={q['test_subset']} "
                f"(seed {q['subset_seed']})")

    def accuracy_line(self, name: str) -> str:
        parts = [f"overall {self.overall['accuracy']:.2f}"]
        parts += [f"{split} {self.by_split[split]['accuracy']:.2f}" for split in SPLIT_ORDER if split in self.by_split]
        return f"{name}: " + ", ".join(parts) + f" (n={self.overall['total']})"


def compare_table(base: EvalResult, tuned: EvalResult, base_name: str = "base", tuned_name: str = "fine-tuned") -> str:
    """A Markdown table of accuracy per split, with the difference."""
    rows = [("overall", base.overall, tuned.overall)]
    rows += [(split, base.by_split[split], tuned.by_split[split]) for split in SPLIT_ORDER
             if split in base.by_split and split in tuned.by_split]
    lines = [f"| split | {base_name} | {tuned_name} | difference |", "|---|---:|---:|---:|"]
    for name, b, t in rows:
        lines.append(f"| {name} | {b['accuracy']:.2f} | {t['accuracy']:.2f} | {t['accuracy'] - b['accuracy']:+.2f} |")
    return "\n".join(lines)
