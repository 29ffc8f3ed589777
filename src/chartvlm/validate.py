"""The one pass over a split before training or evaluation uses it: every row checked (image intact and usable,
question and answers usable text), bad rows skipped with a count or named in an error (`on_bad_sample`), exact
duplicates counted, and whatever a caller measures from each image header (sequence lengths) read once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

from chartvlm.errors import BadSampleError, ChartVLMError
from chartvlm.schema import LOCATION_COLUMN, normalise_label, normalise_query

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

ON_BAD_SAMPLE = ("skip", "error")
SKIPPED_FILENAME = "skipped.jsonl"


class SkippedRows:
    """The on_bad_sample policy of one run and the rows it left out.

    "error" raises the BadSampleError (with what to do about it); "skip" records it: every skip is
    counted, the first `log_first` are logged with file/row and reason, and `write` lists them all
    in skipped.jsonl. Training also records here the duplicates and overlong samples it drops.
    """

    def __init__(self, policy: str = "error", log_first: int = 5):
        if policy not in ON_BAD_SAMPLE:
            raise ChartVLMError(f"on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, got {policy!r}")
        self.policy = policy
        self.log_first = log_first
        self.records: list[dict[str, Any]] = []
        self.duplicates = 0  # exact duplicates seen by validate_rows, dropped or not

    def __len__(self) -> int:
        return len(self.records)

    def bad(self, error: BadSampleError, row_id: str | None = None) -> None:
        if self.policy == "error":
            hint = f"fix or remove the row, or set on_bad_sample=skip to leave bad rows out (in {SKIPPED_FILENAME})"
            raise BadSampleError(error.where, f"{error.reason}. To go on: {hint}") from None
        self.record(error.where, error.reason, row_id)

    def record(self, where: str, reason: str, row_id: str | None = None, kind: str = "bad") -> None:
        self.records.append({"where": where, "row_id": row_id, "kind": kind, "reason": reason})
        if len(self.records) <= self.log_first:
            logger.warning("skipped %s: %s", where, reason)

    def write(self, folder: str | os.PathLike) -> str:
        """skipped.jsonl in `folder` (written atomically; empty when nothing was skipped)."""
        from chartvlm.io import atomic_write_text

        path = os.path.join(folder, SKIPPED_FILENAME)
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in self.records))
        if self.records:
            kinds = Counter(record["kind"] for record in self.records)
            logger.warning("left out %d rows (%s); all listed in %s", len(self.records),
                           ", ".join(f"{count} {kind}" for kind, count in kinds.items()), path)
        return path


def validate_rows(
    dataset: "datasets.Dataset",
    skipped: SkippedRows,
    name: str,
    measure: Any = None,
    drop_duplicates: bool = False,
    control_tokens: tuple[str, ...] = (),
) -> tuple["datasets.Dataset", list[Any]]:
    """The one pass over a split before training or evaluation uses it, one row at a time with the
    image undecoded: each image must open and be intact (`chartvlm.images.check_image`), each
    question and label list usable. Bad rows go to `skipped` (which raises under on_bad_sample=error).

    Exact duplicates (same image, question and labels) are counted in `skipped.duplicates`; with
    `drop_duplicates` (training) they are left out and listed, otherwise (evaluation) kept and reported.
    `measure(row, width, height)` runs on each kept row, so a caller that needs image sizes (training's
    sequence lengths) reads every header once. `control_tokens` (prompts.control_tokens of the model's
    tokenizer): a question or label holding one is a bad row, since the tokenizer would not read it as text.
    Rows are named by their source_location (file:line) where the loader recorded it. Returns the kept rows
    and their measure values.
    """
    from chartvlm.prompts import check_user_text

    import datasets

    from chartvlm.images import check_image

    raw = dataset.cast_column("image", datasets.Image(decode=False))
    keep, values, first_seen, duplicates = [], [], {}, 0
    for index, row in enumerate(raw):
        row_id = str(row.get("row_id") or index)
        where = row.get(LOCATION_COLUMN) or f"{name} row {row_id}"
        try:
            width, height = check_image(row["image"], where)
            check_user_text(normalise_query(row["query"], where), "question", where, control_tokens)
            if row["label"] is None:
                raise BadSampleError(where, "no answer")
            for label in normalise_label(row["label"], where):
                check_user_text(label, "answer", where, control_tokens)
        except BadSampleError as error:
            skipped.bad(error, row_id)
            continue
        key = _duplicate_key(row)
        if key in first_seen:
            duplicates += 1
            if drop_duplicates:
                skipped.record(where, f"exact duplicate of row {first_seen[key]} (same image, question and labels)",
                               row_id, kind="duplicate")
                continue
        else:
            first_seen[key] = row_id
        keep.append(index)
        if measure is not None:
            values.append(measure(row, width, height))
    skipped.duplicates += duplicates
    if duplicates:
        logger.warning("%s: %d rows are exact duplicates of an earlier row (same image, question and labels); %s",
                       name, duplicates, "dropped" if drop_duplicates else "kept, each one counts")
    if not keep:
        raise ChartVLMError(f"{name}: no usable rows left ({len(raw)} checked); see {SKIPPED_FILENAME} and the log.")
    if len(keep) < len(raw):
        dataset = dataset.select(keep)
    return dataset, values


def _duplicate_key(row: dict[str, Any]) -> bytes:
    """Image (its path, or its bytes when embedded), question and labels, hashed."""
    digest = hashlib.blake2b(digest_size=16)
    image = row["image"]
    digest.update(image["bytes"] if image.get("bytes") else os.path.abspath(image["path"]).encode())
    digest.update(json.dumps([row["query"], row["label"]]).encode())
    return digest.digest()
