"""Small file helpers: outputs are written under a temporary name and renamed into place, so a
killed process never leaves a half-written file where a complete one is expected."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

# A save that fails with less free space than this on its disk failed because the disk is full: torch.save and
# safetensors report a full disk as RuntimeError / SafetensorError, not as OSError(ENOSPC).
NEARLY_FULL_BYTES = 1 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: str | Path, option: str) -> Path:
    """Create the folder `path` (given as `option`) or fail with one clear message: it is a file, or it cannot
    be written (permissions, a read-only or full disk). Checked before any model is loaded."""
    from chartvlm.errors import ChartVLMError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".chartvlm-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        raise ChartVLMError(f"{option} {path} is a file, not a folder; choose another path") from None
    except OSError as error:
        raise ChartVLMError(f"{option} {path} cannot be written: {error.strerror}") from None
    return path


def make_readable(path: str | Path) -> None:
    """Give files (and folders) under `path` the permissions a plain open() would: safetensors and mkstemp
    create 0600 files, which another account serving or evaluating the model could not read."""
    path = Path(path)
    mask = _current_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_failure(error: BaseException, path: str | Path) -> str | None:
    """What went wrong, in one line naming the path, when `error` (raised while writing under `path`) comes
    from the disk or the permissions rather than from a bug; else None."""
    if isinstance(error, OSError) and error.errno is not None:
        return f"{error.filename or path}: {os.strerror(error.errno)}"
    if "No space left on device" in str(error) or "os error 28" in str(error):
        return f"{path}: {os.strerror(errno.ENOSPC)}"
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < NEARLY_FULL_BYTES:
        return f"{path}: {os.strerror(errno.ENOSPC)} ({free:,} bytes free)"
    return None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read complete JSON lines; a torn last line (the writer was killed mid-line) is ignored."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows
