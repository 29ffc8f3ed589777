"""Content digests: what a model folder, an adapter or a dataset holds, not where it lives.

An evaluation may resume from earlier predictions only when the answers would be the same: same weights,
adapter, prompt, pixels, generation settings and questions. A path is not enough (a model retrained into
the same folder has the same path), so weights and images are hashed. Hashes of local files are cached by
(device, inode, size, modification time), so a 7 GB model is read once, not at every evaluation; a file
rewritten in place gets a new modification time and is read again. Hub models are identified by their
cached files' blob names, which the hub derives from the content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Besides the weights, the files of a model folder that change its answers.
MODEL_FILES = ("config.json", "adapter_config.json")
_CHUNK = 1 << 22


def cache_dir() -> Path:
    base = os.environ.get("CHARTVLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chartvlm")
    return Path(base) / "digests"


def file_digest(path: str | os.PathLike) -> str:
    """blake2b of a file's bytes, cached by the file's identity and modification time."""
    from chartvlm.io import atomic_write_text

    stat = os.stat(path)
    key = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{os.path.realpath(path)}"
    entry = cache_dir() / hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    try:
        return entry.read_text().strip()
    except OSError:
        pass
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        atomic_write_text(entry, value)
    except OSError as error:  # a read-only home only costs a re-read next time
        logger.debug("digest cache not written (%s)", error)
    return value


def folder_digest(folder: str | os.PathLike, names: Iterable[str] = MODEL_FILES) -> str:
    """Digest of a model or adapter folder: its weight files and the `names` that exist, each with its
    relative name. A hub snapshot's files are symlinks to blobs named after their content: the names are used."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in names))
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        blob = os.path.realpath(path)
        is_hub_blob = path.is_symlink() and f"{os.sep}blobs{os.sep}" in blob
        digest.update(path.name.encode() + b"\0")
        digest.update((os.path.basename(blob) if is_hub_blob else file_digest(path)).encode() + b"\0")
    return digest.hexdigest()


def model_digest(path_or_id: str) -> str | None:
    """Digest of a local model/adapter folder, or of a hub model's cached snapshot; None if neither exists."""
    if os.path.isdir(path_or_id):
        return folder_digest(path_or_id)
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(path_or_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a cached hub repo (or not a repo id at all)
        return None
    return folder_digest(snapshot)


def dataset_digest(dataset) -> str:
    """Digest of a normalised split's questions: every row's id, question, labels, split and image bytes."""
    import datasets

    rows = dataset
    if isinstance(dataset, datasets.Dataset) and isinstance(dataset.features.get("image"), datasets.Image):
        rows = dataset.cast_column("image", datasets.Image(decode=False))
    digest = hashlib.blake2b(digest_size=16)
    for row in rows:
        image = row["image"]
        if isinstance(image, dict):
            data = image.get("bytes")
            image_id = hashlib.blake2b(data, digest_size=16).hexdigest() if data else file_digest(image["path"])
        else:  # a decoded image (an in-memory dataset)
            image_id = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + repr(image.size)
        text = json.dumps([row.get("row_id"), row["query"], row["label"], row.get("human_or_machine")],
                          ensure_ascii=False, default=str)
        digest.update(text.encode() + b"\0" + image_id.encode() + b"\0")
    return digest.hexdigest()
