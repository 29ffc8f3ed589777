"""The one schema every data source is normalised to (the ChartQA one), and the checks of one row against it.

`image` (`datasets.Image`, decoded lazily; `chartvlm.images.to_rgb` makes it RGB where it is used), `query` (str),
`label` (list of str), `human_or_machine` (int: 0 human-written, 1 augmented), `row_id` (str), `source_location`
(file:line or file[index] for JSON sources), plus any extra columns. Accepted aliases: `question` for query,
`answer`/`answers` for label, lmms-lab's `type` (human_test / augmented_test) for human_or_machine.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from chartvlm.errors import BadSampleError, ChartVLMError

if TYPE_CHECKING:
    import datasets

    from chartvlm.validate import SkippedRows

logger = logging.getLogger(__name__)

# Images keep their stored mode here; every consumer (collate, generate, report) converts with
# chartvlm.images.to_rgb, which draws transparent pixels on white as viewers and transformers do.
# datasets' Image(mode="RGB") would drop alpha and show whatever colour hides under transparency.
IMAGE_MODE = None

CORE_COLUMNS = ("image", "query", "label", "human_or_machine")
QUERY_KEYS = ("query", "question")
LABEL_KEYS = ("label", "answer", "answers")
# Where a JSON/JSONL row came from (file:line, file[index]), so a bad image found later is named by it.
LOCATION_COLUMN = "source_location"


def normalise_row(raw: Any, where: str, base_dir: str, allow_outside_images: bool = False) -> dict[str, Any]:
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

    query_key = next((key for key in QUERY_KEYS if raw.get(key) is not None), None)
    if query_key is None:
        raise BadSampleError(where, "no question (key 'query' or 'question')")
    label_key = next((key for key in LABEL_KEYS if raw.get(key) is not None), None)
    if label_key is None:
        raise BadSampleError(where, "no answer (key 'label', 'answer' or 'answers')")

    row = {
        "image": image_path,
        "query": normalise_query(raw[query_key], where),
        "label": normalise_label(raw[label_key], where),
        "human_or_machine": normalise_origin(raw.get("human_or_machine", 0), where),
    }
    used = {"image", query_key, label_key, "human_or_machine"}
    row.update((key, value) for key, value in raw.items() if key not in used)
    row.setdefault(LOCATION_COLUMN, where)
    return row


def normalise_query(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadSampleError(where, f"the question must be a non-empty string, got {value!r}")
    return value


def normalise_label(value: Any, where: str) -> list[str]:
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
            labels.append(format_answer_number(item, where))
        else:
            raise BadSampleError(where, f"an answer must be a string or a number, got {item!r}")
    return labels


def format_answer_number(value: bool | numbers.Real, where: str) -> str:
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


def normalise_origin(value: Any, where: str) -> int:
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


_SCALAR_TYPES = {str: "string", bool: "bool", float: "double", type(None): "null"}


def note_type(seen: dict[str, Any], value: Any) -> None:
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


def extra_features(types: dict[str, dict[str, Any]], where: str) -> tuple[dict[str, Any], tuple[str, ...]]:
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


def normalise_columns(dataset: "datasets.Dataset", where: str, split: str,
                       skipped: SkippedRows) -> "datasets.Dataset":
    """Bring an Arrow-backed dataset (hub, save_to_disk, parquet) to the normalised schema.

    Accepts the ChartQA schema and the lmms-lab one (`question`, `answer` str, `type`). Only the
    small text columns are read into Python; the image column is re-typed, never rewritten. Bad
    rows go to `skipped`; the kept rows' `row_id`s still count them.
    """
    import datasets

    columns = dataset.column_names
    for target, aliases in (("query", QUERY_KEYS[1:]), ("label", LABEL_KEYS[1:])):
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
            normalise_query(query, row_where)
            if label is None:
                raise BadSampleError(row_where, "no answer")
            labels.append(normalise_label(label, row_where))
            origins.append(normalise_origin(origin, row_where))
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
