"""Load chart QA data from wherever a user keeps it and return one schema (the ChartQA one).

Every source ends up as a `datasets.Dataset` with the columns `image` (`datasets.Image`, decoded
lazily; `chartvlm.images.to_rgb` makes it RGB where it is used), `query` (str), `label` (list of
str), `human_or_machine` (int: 0 human-written, 1 augmented), `row_id` (str), plus any extra columns.

Sources: a hub dataset id, a `save_to_disk` folder, parquet (file, glob or folder), the original
ChartQA release layout (`{split}/{split}_human.json` + `png/`), or a JSONL file of image paths.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from chartvlm.errors import BadSampleError, ChartVLMError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

QUICKSTART_HINT = "for an offline run use the quick start: `make quickstart` (synthetic charts + a tiny model)"

# Images keep their stored mode here; every consumer (collate, generate, report) converts with
# chartvlm.images.to_rgb, which draws transparent pixels on white as viewers and transformers do.
# datasets' Image(mode="RGB") would drop alpha and show whatever colour hides under transparency.
IMAGE_MODE = None

CORE_COLUMNS = ("image", "query", "label", "human_or_machine")
_QUERY_KEYS = ("query", "question")
_LABEL_KEYS = ("label", "answer", "answers")
# Bump when the normalisation changes, so cached Arrow files built by older code are not reused.
_CACHE_VERSION = "chartvlm-data-3"

ON_BAD_SAMPLE = ("skip", "error")
# Where a JSON/JSONL row came from (file:line, file[index]), so a bad image found later is named by it.
LOCATION_COLUMN = "source_location"
SKIPPED_FILENAME = "skipped.jsonl"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def is_local_source(source: str) -> bool:
    """True if `source` names local data (an existing path, a glob, or something path-shaped).

    Anything else is treated as a hub id ("owner/name"). A path-shaped string that does not exist
    (e.g. "./data/train.jsonl") still counts as local, so the user gets "not found" rather than a
    network lookup.
    """
    source = str(source)
    if os.path.exists(os.path.expanduser(source)):
        return True
    if _is_glob(source):
        return True
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source:
        return True
    # Hub ids have at most one slash ("owner/name"); file names end in a data extension.
    if source.count("/") > 1:
        return True
    return source.lower().endswith((".parquet", ".jsonl", ".json", ".arrow"))


def ensure_hub_reachable(repo_id: str, repo_type: str = "model", timeout: float = 5.0) -> None:
    """Fail within seconds, with a clear message, if `repo_id` cannot be fetched from the hub.

    Returns without any network access when `repo_id` is a local path or is already in the local
    Hugging Face cache. Otherwise asks the hub for the repo's metadata with `timeout` seconds and
    turns any failure (offline mode, no connection, unknown or gated repo) into a ChartVLMError.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    if os.path.exists(os.path.expanduser(repo_id)):
        return
    if _is_in_local_cache(repo_id, repo_type):
        logger.debug("%s %s found in the local cache", repo_type, repo_id)
        return

    what = f"{repo_type} '{repo_id}'"
    if _hub_offline(repo_type):
        raise ChartVLMError(
            f"HF_HUB_OFFLINE is set and the {what} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}). Pass a local path instead, unset HF_HUB_OFFLINE to download it, "
            f"or {QUICKSTART_HINT}."
        )
    endpoint = constants.ENDPOINT
    try:
        HfApi(endpoint=endpoint).repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except HFValidationError as error:
        raise ChartVLMError(
            f"'{repo_id}' is neither an existing local path nor a valid hub {repo_type} id ({error})."
        ) from None
    except GatedRepoError:
        raise ChartVLMError(
            f"The {what} on {endpoint} is gated: accept its terms on the hub page and log in "
            f"(`hf auth login`), or pass a local path."
        ) from None
    except RepositoryNotFoundError:
        raise ChartVLMError(
            f"The {what} was not found on {endpoint} (check the id; private repos need `hf auth login`), "
            f"and no local path of that name exists."
        ) from None
    except Exception as error:  # noqa: BLE001 - transport errors differ by huggingface_hub version
        raise ChartVLMError(
            f"Cannot reach the Hugging Face Hub at {endpoint} to fetch the {what} "
            f"({type(error).__name__}: {error}), and it is not in the local cache ({constants.HF_HUB_CACHE}). "
            f"Check the connection (or set HF_ENDPOINT to a mirror), pass a local path, or {QUICKSTART_HINT}."
        ) from None


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
    dataset = _select_subset(dataset, subset, seed, f"{where} ({split})")
    logger.info("loaded %d rows from %s (split %s)", len(dataset), where, split)
    return dataset


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
            check_user_text(_normalise_query(row["query"], where), "question", where, control_tokens)
            if row["label"] is None:
                raise BadSampleError(where, "no answer")
            for label in _normalise_label(row["label"], where):
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


# --------------------------------------------------------------------------------------------
# Per-row validation (JSON / JSONL sources)
# --------------------------------------------------------------------------------------------


def _normalise_row(raw: Any, where: str, base_dir: str, allow_outside_images: bool = False) -> dict[str, Any]:
    """Check one raw JSON row and return it normalised: image as an absolute path, query str,
    label list[str], human_or_machine int, source_location (file:line or file[index]), other keys unchanged.

    The single place where a JSON row is accepted or rejected (the caller applies on_bad_sample). An image
    path that leaves the data's folder (`../`, an absolute path) is refused unless `allow_outside_images`:
    a data file from elsewhere must not make chartvlm read (and show in reports) arbitrary files.
    """
    if not isinstance(raw, Mapping):
        raise BadSampleError(where, f"expected a JSON object, got {type(raw).__name__}")
    image = raw.get("image")
    if not isinstance(image, str) or not image.strip():
        raise BadSampleError(where, "no 'image' path (a chart image path, relative to the file's folder or absolute)")
    image_path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(image)))
    folder = os.path.abspath(base_dir)
    if not allow_outside_images and os.path.commonpath([folder, image_path]) != folder:
        raise BadSampleError(where, f"the image path {image!r} leaves the data folder {folder}; move the image "
                                    "inside it, or set allow_outside_images=true if you trust the file")
    if not os.path.isfile(image_path):
        raise BadSampleError(where, f"image file not found: {image_path}")

    query_key = next((key for key in _QUERY_KEYS if raw.get(key) is not None), None)
    if query_key is None:
        raise BadSampleError(where, "no question (key 'query' or 'question')")
    label_key = next((key for key in _LABEL_KEYS if raw.get(key) is not None), None)
    if label_key is None:
        raise BadSampleError(where, "no answer (key 'label', 'answer' or 'answers')")

    row = {
        "image": image_path,
        "query": _normalise_query(raw[query_key], where),
        "label": _normalise_label(raw[label_key], where),
        "human_or_machine": _normalise_origin(raw.get("human_or_machine", 0), where),
    }
    used = {"image", query_key, label_key, "human_or_machine"}
    row.update((key, value) for key, value in raw.items() if key not in used)
    row.setdefault(LOCATION_COLUMN, where)
    return row


def _normalise_query(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadSampleError(where, f"the question must be a non-empty string, got {value!r}")
    return value


def _normalise_label(value: Any, where: str) -> list[str]:
    """One answer or a list of accepted answers -> list of ChartQA-style strings."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise BadSampleError(where, "the answer list is empty")
    labels = []
    for item in values:
        if isinstance(item, str):
            # Kept verbatim: the standard metric compares targets unstripped.
            if not item.strip():
                raise BadSampleError(where, f"empty answer in {value!r}")
            labels.append(item)
        elif isinstance(item, (bool, numbers.Real)):
            labels.append(_format_answer_number(item, where))
        else:
            raise BadSampleError(where, f"an answer must be a string or a number, got {item!r}")
    return labels


def _format_answer_number(value: bool | numbers.Real, where: str) -> str:
    """Print a number the way ChartQA labels are written: 12.0 -> "12", 6.80 -> "6.8", True -> "Yes"."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    number = float(value)
    if not math.isfinite(number):
        raise BadSampleError(where, f"the answer {value!r} is not a finite number")
    if number.is_integer():
        return str(int(number))
    text = repr(number)  # shortest round-trip form: 6.8, 0.123
    if "e" in text:
        text = format(Decimal(text), "f")  # 1e-07 -> 0.0000001 (labels never use exponents)
    return text


def _normalise_origin(value: Any, where: str) -> int:
    """human_or_machine as 0 (human-written) or 1 (augmented); also accepts lmms-lab's type names."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ("0", "1"):
            return int(name)
        if name.startswith("human"):
            return 0
        if name.startswith(("augmented", "machine")):
            return 1
    elif isinstance(value, (bool, numbers.Real)) and float(value) in (0.0, 1.0):
        return int(value)
    raise BadSampleError(where, f"human_or_machine must be 0 (human) or 1 (augmented), got {value!r}")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _load_local(source: str, split: str, cache_dir: str | None, skipped: SkippedRows,
                allow_outside_images: bool = False) -> tuple["datasets.Dataset", str]:
    path = os.path.expanduser(source)
    if _is_glob(path) and not os.path.exists(path):
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
    return _normalise_columns(dataset, source, split, skipped)


def _load_saved(folder: str, split: str, skipped: SkippedRows) -> "datasets.Dataset":
    import datasets

    loaded = datasets.load_from_disk(folder)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ChartVLMError(
                f"{folder}: no '{split}' split in this DatasetDict; available splits: {', '.join(loaded)}."
            )
        return _normalise_columns(loaded[split], f"{folder} ({split})", split, skipped)
    logger.info("%s holds a single Dataset; using it as the %s split", folder, split)
    return _normalise_columns(loaded, folder, split, skipped)


def _load_parquet(files: list[str], cache_dir: str | None, where: str, split: str,
                  skipped: SkippedRows) -> "datasets.Dataset":
    import datasets

    try:
        dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise ChartVLMError(f"{where}: could not read the parquet data ({error}).") from None
    return _normalise_columns(dataset, where, split, skipped)


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
            row = _normalise_row(raw, where, base_dir, allow_outside_images)
        except BadSampleError as error:
            skipped.bad(error, f"{split}-{index}")
            continue
        row.setdefault("row_id", f"{split}-{index}")
        yield row


# --------------------------------------------------------------------------------------------
# Building and normalising Datasets
# --------------------------------------------------------------------------------------------


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
                _note_type(extra_types.setdefault(key, {}), value)
    if not count:
        if len(skipped) > skipped_before:
            raise ChartVLMError(f"{source}: every row is bad ({len(skipped) - skipped_before} rows, each listed with "
                                f"its reason in {SKIPPED_FILENAME})")
        raise ChartVLMError(f"{source}: no rows found")
    extra_features, json_keys = _extra_features(extra_types, source)
    features = datasets.Features(
        {
            "image": datasets.Image(mode=IMAGE_MODE),
            "query": datasets.Value("string"),
            "label": datasets.List(datasets.Value("string")),
            "human_or_machine": datasets.Value("int64"),
            **extra_features,
        }
    )
    # Our own fingerprint (rows + schema): a changed file gives a new cache, an unchanged one reuses it.
    digest.update(json.dumps(features.to_dict(), sort_keys=True).encode())
    # Tuples, not lists: from_generator would treat a list in gen_kwargs as one shard per item.
    return datasets.Dataset.from_generator(
        _generate_rows,
        features=features,
        cache_dir=cache_dir,
        gen_kwargs={"kind": kind, "source": source, "split": split, "extra_keys": tuple(extra_features),
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


_SCALAR_TYPES = {str: "string", bool: "bool", float: "double", type(None): "null"}


def _note_type(seen: dict[str, Any], value: Any) -> None:
    """Keep one value per distinct Arrow type of an extra column; the column's type is inferred from those."""
    import pyarrow as pa

    name = _SCALAR_TYPES.get(type(value))
    if name is None and type(value) is int:
        name = "int64" if -(2**63) <= value < 2**63 else "unconvertible"
    if name is None:
        try:
            name = str(pa.array([value]).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            name = "unconvertible"
    seen.setdefault(name, value)


def _extra_features(types: dict[str, dict[str, Any]], where: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Features of the extra columns, and the columns stored as JSON text because their types mix."""
    import datasets
    import pyarrow as pa

    fields, json_keys = [], []
    for key, seen in types.items():
        try:
            if "unconvertible" in seen:
                raise pa.ArrowInvalid(key)
            arrow_type = pa.array(list(seen.values())).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            # Mixed types across rows (e.g. 3 and "3"): keep the column as JSON text.
            logger.warning("%s: column %r has mixed types; storing it as JSON text", where, key)
            json_keys.append(key)
            arrow_type = pa.string()
        fields.append((key, arrow_type))
    return dict(datasets.Features.from_arrow_schema(pa.schema(fields))), tuple(json_keys)


def _normalise_columns(dataset: "datasets.Dataset", where: str, split: str,
                       skipped: SkippedRows) -> "datasets.Dataset":
    """Bring an Arrow-backed dataset (hub, save_to_disk, parquet) to the normalised schema.

    Accepts the ChartQA schema and the lmms-lab one (`question`, `answer` str, `type`). Only the
    small text columns are read into Python; the image column is re-typed, never rewritten. Bad
    rows go to `skipped`; the kept rows' `row_id`s still count them.
    """
    import datasets

    columns = dataset.column_names
    for target, aliases in (("query", _QUERY_KEYS[1:]), ("label", _LABEL_KEYS[1:])):
        if target not in columns:
            alias = next((name for name in aliases if name in columns), None)
            if alias is not None:
                dataset = dataset.rename_column(alias, target)
                columns = dataset.column_names
    missing = [name for name in ("image", "query", "label") if name not in columns]
    if missing:
        raise ChartVLMError(
            f"{where}: missing column(s) {missing}; found {columns}. Expected the ChartQA schema "
            f"(image, query, label, human_or_machine) or lmms-lab's (image, question, answer, type)."
        )

    origin_column = "human_or_machine" if "human_or_machine" in columns else "type" if "type" in columns else None
    read = ["query", "label"] + ([origin_column] if origin_column else [])
    table = dataset.select_columns(read).with_format("arrow")[:]
    queries = table.column("query").to_pylist()
    raw_labels = table.column("label").to_pylist()
    raw_origins = table.column(origin_column).to_pylist() if origin_column else [0] * len(queries)
    origin_feature = dataset.features.get(origin_column) if origin_column else None
    if isinstance(origin_feature, datasets.ClassLabel):
        # Go through the class names: index 0 need not mean "human" in every export.
        raw_origins = [origin_feature.int2str(value) if value is not None else None for value in raw_origins]

    # The underlying table, not a formatted copy (that would pull every image's bytes into memory);
    # freshly loaded datasets have no indices mapping, so positions match rows.
    image_column = dataset.data.column("image")
    no_image = image_column.is_null().to_pylist() if image_column.null_count else [False] * len(queries)
    labels, origins, bad = [], [], []
    for index, (query, label, origin) in enumerate(zip(queries, raw_labels, raw_origins)):
        row_where = f"{where}[{index}]"
        try:
            if no_image[index]:
                raise BadSampleError(row_where, "no image")
            _normalise_query(query, row_where)
            if label is None:
                raise BadSampleError(row_where, "no answer")
            labels.append(_normalise_label(label, row_where))
            origins.append(_normalise_origin(origin, row_where))
        except BadSampleError as error:
            skipped.bad(error, f"{split}-{index}")
            bad.append(index)
            labels.append(label if isinstance(label, list) and all(isinstance(x, str) for x in label) else [])
            origins.append(0)

    string_list = datasets.List(datasets.Value("string"))
    if labels != raw_labels or dataset.features["label"] != string_list:
        dataset = dataset.remove_columns("label").add_column("label", labels, feature=string_list)
    if origin_column is None:
        logger.warning("%s: no human_or_machine column; treating every row as human-written (0)", where)
    if origin_column != "human_or_machine" or dataset.features["human_or_machine"] != datasets.Value("int64"):
        if "human_or_machine" in dataset.column_names:
            dataset = dataset.remove_columns("human_or_machine")
        dataset = dataset.add_column("human_or_machine", origins, feature=datasets.Value("int64"))

    wanted_image = datasets.Image(mode=IMAGE_MODE)
    if dataset.features["image"] != wanted_image:
        try:
            dataset = dataset.cast_column("image", wanted_image)
        except (TypeError, ValueError) as error:
            raise ChartVLMError(f"{where}: the image column cannot be read as images ({error}).") from None
    if bad:
        if "row_id" not in dataset.column_names:
            dataset = dataset.add_column("row_id", [f"{split}-{index}" for index in range(len(dataset))])
        dropped = set(bad)
        dataset = dataset.select([index for index in range(len(dataset)) if index not in dropped])
    extras = [name for name in dataset.column_names if name not in CORE_COLUMNS]
    return dataset.select_columns(list(CORE_COLUMNS) + extras)


def _select_subset(
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
# Helpers: layout detection, cache lookups
# --------------------------------------------------------------------------------------------


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


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


def _hub_offline(repo_type: str) -> bool:
    """Offline flags, read now (the libraries read them once at import)."""
    from huggingface_hub import constants

    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if repo_type == "dataset" else [])
    flags = [os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in names]
    return constants.HF_HUB_OFFLINE or any(flags)


def _is_in_local_cache(repo_id: str, repo_type: str) -> bool:
    """Whether a usable copy of the repo is cached, without touching the network."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False  # the hub lookup that follows reports the bad id
    if repo_type == "model":
        return isinstance(try_to_load_from_cache(repo_id, "config.json", repo_type="model"), str)
    folder = repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    snapshots = os.path.join(constants.HF_HUB_CACHE, folder, "snapshots")
    if os.path.isdir(snapshots) and any(os.scandir(snapshots)):
        return True
    if repo_type == "dataset":
        # datasets also falls back to its own prepared Arrow cache: {cache}/{owner}___{snake_name}/...
        import datasets
        from datasets.naming import camelcase_to_snakecase

        parts = repo_id.split("/")
        parts[-1] = camelcase_to_snakecase(parts[-1])
        root = os.path.join(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)), "___".join(parts))
        return any(os.path.isdir(path) for path in glob.glob(os.path.join(glob.escape(root), "*", "*", "*")))
    return False
