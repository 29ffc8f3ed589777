"""Load chart QA data from wherever a user keeps it, as one schema (`chartvlm.schema`).

Sources: a hub dataset id, a `save_to_disk` folder, parquet (file, glob or folder), the original ChartQA release
layout (`{split}/{split}_human.json` + `png/`), or a JSONL file of image paths. JSON and JSONL are streamed into an
Arrow cache keyed on their content; bad rows follow `on_bad_sample` (`chartvlm.validate.SkippedRows`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import numbers
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from chartvlm.errors import BadSampleError, ChartVLMError
from chartvlm.hub import ensure_hub_reachable, is_glob, is_local_source
from chartvlm.schema import CORE_COLUMNS, IMAGE_MODE, extra_features, normalise_columns, normalise_row, note_type
from chartvlm.validate import SKIPPED_FILENAME, SkippedRows

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Bump when the normalisation changes, so cached Arrow files built by older code are not reused.
_CACHE_VERSION = "chartvlm-data-3"


def load_chartqa(
    source: str,
    split: str = "train",
    subset: float | int | None = None,
    seed: int = 42,
    cache_dir: str | None = None,
    on_bad_sample: "str | SkippedRows" = "error",
    allow_outside_images: bool = False,
) -> "datasets.Dataset":
    """Load ChartQA-style data from `source` and return it in the normalised ChartQA schema.

    `source`: a hub dataset id (HuggingFaceM4/ChartQA, lmms-lab/ChartQA, ...), a `save_to_disk`
    folder, a parquet file / glob / folder, the original release folder, or a `.jsonl` file.
    `split` picks the split where the source has several (for a JSONL file it only names rows).
    `subset`: None for all rows, a float in (0, 1] for a fraction, an int for a row count; the rows
    are drawn with `seed` and kept in their original order. `cache_dir` is where Arrow files built
    from JSON/JSONL/parquet/hub data go (default: the datasets cache). JSON/JSONL files are streamed:
    memory does not grow with their length.

    `on_bad_sample`: "error" raises BadSampleError for the first bad row (naming file and line, or
    file and row); "skip" leaves bad rows out, counted and logged; a SkippedRows collects them for
    skipped.jsonl. A row's `row_id` is its position in the source, skipped rows included. These
    checks read no pixels; `validate_rows` checks the images of the rows a run uses.
    `allow_outside_images`: accept JSON/JSONL image paths that leave the data's folder.
    Raises ChartVLMError on bad input.
    """
    source = str(source)
    skipped = on_bad_sample if isinstance(on_bad_sample, SkippedRows) else SkippedRows(on_bad_sample)
    skipped_before = len(skipped)
    if is_local_source(source):
        dataset, where = _load_local(source, split, cache_dir, skipped, allow_outside_images)
    else:
        dataset, where = _load_hub(source, split, cache_dir, skipped), source
    if len(skipped) > skipped_before:
        logger.warning("%s (%s): skipped %d bad rows (on_bad_sample=skip)", where, split, len(skipped) - skipped_before)
    if len(dataset) == 0:
        bad = len(skipped) - skipped_before
        raise ChartVLMError(f"{where}: every row of the {split} split is bad ({bad} rows, each listed with its reason "
                            f"in {SKIPPED_FILENAME})" if bad else f"{where}: the {split} split has no rows.")
    if "row_id" not in dataset.column_names:
        dataset = dataset.add_column("row_id", [f"{split}-{index}" for index in range(len(dataset))])
    dataset = select_subset(dataset, subset, seed, f"{where} ({split})")
    logger.info("loaded %d rows from %s (split %s)", len(dataset), where, split)
    return dataset


def _load_local(source: str, split: str, cache_dir: str | None, skipped: SkippedRows,
                allow_outside_images: bool = False) -> tuple["datasets.Dataset", str]:
    path = os.path.expanduser(source)
    if is_glob(path) and not os.path.exists(path):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise ChartVLMError(f"{source}: the pattern matches no files.")
        if not all(file.endswith(".parquet") for file in files):
            raise ChartVLMError(f"{source}: a glob must match only .parquet files, got {files[:5]}.")
        return _load_parquet(files, cache_dir, source, split, skipped), source
    if not os.path.exists(path):
        raise ChartVLMError(f"{source}: no such file or folder.")
    if os.path.isfile(path):
        if path.endswith(".parquet"):
            return _load_parquet([path], cache_dir, source, split, skipped), source
        if path.endswith(".jsonl"):
            return _dataset_from_source("jsonl", path, split, cache_dir, skipped, allow_outside_images), source
        raise ChartVLMError(
            f"{source}: unsupported file type. Give a .parquet or .jsonl file, or a folder "
            f"(save_to_disk output, parquet files, or the ChartQA release layout)."
        )
    return _load_folder(path, split, cache_dir, skipped, allow_outside_images), source


def _load_folder(folder: str, split: str, cache_dir: str | None, skipped: SkippedRows,
                 allow_outside_images: bool = False) -> "datasets.Dataset":
    if _is_saved_dataset(folder):
        return _load_saved(folder, split, skipped)
    release_dir = _find_release_split_dir(folder, split)
    if release_dir is not None:
        return _dataset_from_source("release", release_dir, split, cache_dir, skipped, allow_outside_images)
    parquet_files = _find_split_parquet(folder, split)
    if parquet_files:
        return _load_parquet(parquet_files, cache_dir, folder, split, skipped)
    jsonl = os.path.join(folder, f"{split}.jsonl")
    if os.path.isfile(jsonl):
        return _dataset_from_source("jsonl", jsonl, split, cache_dir, skipped, allow_outside_images)

    found = _splits_in_folder(folder)
    if found:
        raise ChartVLMError(f"{folder}: no '{split}' split here; available splits: {', '.join(found)}.")
    entries = sorted(os.listdir(folder))
    raise ChartVLMError(
        f"{folder}: not a dataset folder I recognise (contains: {', '.join(entries[:10]) or 'nothing'}). "
        f"Expected a save_to_disk folder, parquet files named {split}-*.parquet (or {split}/*.parquet, "
        f"data/{split}-*.parquet), the ChartQA release layout ({split}/{split}_human.json + png/), "
        f"or {split}.jsonl."
    )


def _load_hub(source: str, split: str, cache_dir: str | None, skipped: SkippedRows) -> "datasets.Dataset":
    import datasets

    ensure_hub_reachable(source, repo_type="dataset")
    try:
        dataset = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except datasets.exceptions.DatasetNotFoundError as error:
        raise ChartVLMError(f"{source}: {error}") from None
    except ValueError as error:
        if "split" in str(error).lower():  # 'Unknown split "x". Should be one of [...]'
            raise ChartVLMError(f"{source}: {error}") from None
        raise
    return normalise_columns(dataset, source, split, skipped)


def _load_saved(folder: str, split: str, skipped: SkippedRows) -> "datasets.Dataset":
    import datasets

    loaded = datasets.load_from_disk(folder)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ChartVLMError(
                f"{folder}: no '{split}' split in this DatasetDict; available splits: {', '.join(loaded)}."
            )
        return normalise_columns(loaded[split], f"{folder} ({split})", split, skipped)
    logger.info("%s holds a single Dataset; using it as the %s split", folder, split)
    return normalise_columns(loaded, folder, split, skipped)


def _load_parquet(files: list[str], cache_dir: str | None, where: str, split: str,
                  skipped: SkippedRows) -> "datasets.Dataset":
    import datasets

    try:
        dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise ChartVLMError(f"{where}: could not read the parquet data ({error}).") from None
    return normalise_columns(dataset, where, split, skipped)


def _release_records(split_dir: str, split: str) -> Iterator[tuple[str, Any]]:
    """The original ChartQA release: {split}_human.json then {split}_augmented.json, images in png/.
    Yields (file[index], raw row or the BadSampleError that rejects it)."""
    for kind, origin in (("human", 0), ("augmented", 1)):
        path = os.path.join(split_dir, f"{split}_{kind}.json")
        if not os.path.isfile(path):
            continue
        # One JSON list per file, so the file is parsed whole (ChartQA's largest holds 20,901 records).
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            text = data.decode("utf-8-sig")
            records = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as error:
            raise ChartVLMError(f"{path}: the key {error.key!r} appears twice in one object; keep one") from None
        except UnicodeDecodeError as error:
            raise ChartVLMError(f"{path}: not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
                                "save the file as UTF-8.") from None
        except json.JSONDecodeError as error:
            raise BadSampleError(f"{path}:{error.lineno}", f"not valid JSON ({error.msg})") from None
        if not isinstance(records, list):
            raise ChartVLMError(
                f"{path}: expected a JSON list of {{imgname, query, label}}, got {type(records).__name__}."
            )
        for index, record in enumerate(records):
            where = f"{path}[{index}]"
            if not isinstance(record, Mapping):
                yield where, BadSampleError(where, f"expected a JSON object, got {type(record).__name__}")
            elif not isinstance(record.get("imgname"), str):
                yield where, BadSampleError(where, "no 'imgname'")
            else:
                raw = {key: value for key, value in record.items() if key != "imgname"}
                raw["image"] = os.path.join("png", record["imgname"])
                raw["human_or_machine"] = origin
                yield where, _check_surrogates(raw, text, where)


def _check_surrogates(raw: Any, text: str, where: str) -> Any:
    """`raw` parsed from JSON `text`; a BadSampleError if a broken \\u escape left a lone surrogate in it
    (Arrow cannot store it). Only text holding a surrogate escape is examined."""
    if "\\ud" not in text and "\\uD" not in text:
        return raw
    try:
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        bad = error.object[error.start : error.end]
        return BadSampleError(where, f"holds a lone UTF-16 surrogate {bad!r} (a broken \\u escape), which is not "
                                     "text and cannot be stored")
    return raw


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys; a row with two answers or two images is ambiguous."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    """(file:line, raw row or the BadSampleError that rejects it) for each non-blank line. Lines are
    read as bytes, so a line that is not UTF-8 is one bad row rather than a crash mid-file."""
    with open(path, "rb") as handle:
        for line_number, data in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = data.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield where, BadSampleError(where, f"not valid UTF-8 (byte 0x{data[error.start]:02x} at position "
                                                   f"{error.start + 1} of the line); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                raw = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as error:
                yield where, BadSampleError(where, f"not valid JSON ({error.msg})")
                continue
            except _DuplicateKey as error:
                yield where, BadSampleError(where, f"the key {error.key!r} appears twice in one object; keep one")
                continue
            yield where, _check_surrogates(raw, line, where)


def _source_rows(kind: str, source: str, split: str, skipped: SkippedRows,
                 allow_outside_images: bool = False) -> Iterator[dict[str, Any]]:
    """Normalised rows of a JSONL file or a release split folder, one at a time; bad ones go to `skipped`."""
    if kind == "jsonl":
        records, base_dir = _jsonl_records(source), os.path.dirname(os.path.abspath(source))
    else:
        records, base_dir = _release_records(source, split), source
    for index, (where, raw) in enumerate(records):
        try:
            if isinstance(raw, BadSampleError):
                raise raw
            row = normalise_row(raw, where, base_dir, allow_outside_images)
        except BadSampleError as error:
            skipped.bad(error, f"{split}-{index}")
            continue
        row.setdefault("row_id", f"{split}-{index}")
        yield row


def _dataset_from_source(kind: str, source: str, split: str, cache_dir: str | None, skipped: SkippedRows,
                         allow_outside_images: bool = False) -> "datasets.Dataset":
    """Stream a JSONL file or release folder into an on-disk Arrow cache (images stay files, decoded lazily).

    First pass: check every row (bad ones go to `skipped`), infer the extra columns' types and
    fingerprint the rows, one row in memory at a time. Second pass, only when no cache has that
    fingerprint: the same rows, written by `datasets` in batches. Memory does not grow with the file.
    """
    import datasets

    digest = hashlib.sha256()
    digest.update(_CACHE_VERSION.encode())
    extra_types: dict[str, dict[str, Any]] = {}
    count, skipped_before = 0, len(skipped)
    for row in _source_rows(kind, source, split, skipped, allow_outside_images):
        count += 1
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        for key, value in row.items():
            if key not in CORE_COLUMNS:
                note_type(extra_types.setdefault(key, {}), value)
    if not count:
        if len(skipped) > skipped_before:
            raise ChartVLMError(f"{source}: every row is bad ({len(skipped) - skipped_before} rows, each listed with "
                                f"its reason in {SKIPPED_FILENAME})")
        raise ChartVLMError(f"{source}: no rows found")
    extra, json_keys = extra_features(extra_types, source)
    features = datasets.Features(
        {
            "image": datasets.Image(mode=IMAGE_MODE),
            "query": datasets.Value("string"),
            "label": datasets.List(datasets.Value("string")),
            "human_or_machine": datasets.Value("int64"),
            **extra,
        }
    )
    # Our own fingerprint (rows + schema): a changed file gives a new cache, an unchanged one reuses it.
    digest.update(json.dumps(features.to_dict(), sort_keys=True).encode())
    # Tuples, not lists: from_generator would treat a list in gen_kwargs as one shard per item.
    return datasets.Dataset.from_generator(
        _generate_rows,
        features=features,
        cache_dir=cache_dir,
        gen_kwargs={"kind": kind, "source": source, "split": split, "extra_keys": tuple(extra),
                    "json_keys": json_keys, "allow_outside_images": allow_outside_images},
        fingerprint=digest.hexdigest()[:32],
    )


def _generate_rows(kind: str, source: str, split: str, extra_keys: tuple[str, ...], json_keys: tuple[str, ...],
                   allow_outside_images: bool) -> Iterator[dict[str, Any]]:
    """The second pass of `_dataset_from_source`: bad rows were already counted by the first."""
    for row in _source_rows(kind, source, split, SkippedRows("skip", log_first=0), allow_outside_images):
        for key in extra_keys:
            value = row.get(key)
            if key in json_keys and value is not None and not isinstance(value, str):
                value = json.dumps(value)
            row[key] = value
        yield row


def select_subset(
    dataset: "datasets.Dataset", subset: float | int | None, seed: int, where: str
) -> "datasets.Dataset":
    """A seeded random subset kept in original order; the k-row subset is a prefix of the same
    permutation for every k, so a smaller subset is contained in a larger one with the same seed."""
    if subset is None:
        return dataset
    total = len(dataset)
    if isinstance(subset, bool) or not isinstance(subset, numbers.Real):
        raise ChartVLMError(f"subset must be a fraction in (0, 1] or a row count >= 1, got {subset!r}.")
    if isinstance(subset, numbers.Integral):
        count = int(subset)
        if count < 1:
            raise ChartVLMError(f"subset={subset}: a row count must be >= 1.")
        if count > total:
            raise ChartVLMError(f"subset={subset}, but {where} has only {total} rows.")
    else:
        if not 0 < subset <= 1:
            raise ChartVLMError(
                f"subset={subset!r}: a fraction must be in (0, 1]; pass an integer for a number of rows."
            )
        count = max(1, round(total * float(subset)))
    if count == total:
        return dataset
    import numpy as np

    chosen = np.random.default_rng(seed).permutation(total)[:count]
    return dataset.select(sorted(chosen.tolist()))


# --------------------------------------------------------------------------------------------
# Helpers: layout detection
# --------------------------------------------------------------------------------------------


def _is_saved_dataset(folder: str) -> bool:
    names = ("dataset_dict.json", "state.json")
    return any(os.path.isfile(os.path.join(folder, name)) for name in names)


def _find_release_split_dir(folder: str, split: str) -> str | None:
    """The folder holding {split}_human.json / {split}_augmented.json: folder/{split}/ or folder itself."""
    for candidate in (os.path.join(folder, split), folder):
        if any(os.path.isfile(os.path.join(candidate, f"{split}_{kind}.json")) for kind in ("human", "augmented")):
            return candidate
    return None


def _find_split_parquet(folder: str, split: str) -> list[str]:
    patterns = (
        f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet",
        f"data/{split}-*.parquet", f"data/{split}/*.parquet",
    )
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if files:
            return files
    return []


def _splits_in_folder(folder: str) -> list[str]:
    """Split names visible in a folder (for the "available splits" message)."""
    found = set()
    for path in glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True):
        name = os.path.basename(path)
        parent = os.path.basename(os.path.dirname(path))
        for suffix in ("_human.json", "_augmented.json", ".jsonl"):
            if name.endswith(suffix):
                found.add(name[: -len(suffix)])
        if name.endswith(".parquet"):
            stem = name[: -len(".parquet")]
            found.add(stem.split("-")[0] if "-" in stem else parent if parent not in ("", "data") else stem)
    return sorted(found)
