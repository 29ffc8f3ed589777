"""Is a data source local or a hub id, and can a hub id be fetched: probed in seconds, so an offline machine fails
fast with a clear message instead of hanging in a download."""

from __future__ import annotations

import glob
import logging
import os

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

QUICKSTART_HINT = "for an offline run use the quick start: `make quickstart` (synthetic charts + a tiny model)"


def is_local_source(source: str) -> bool:
    """True if `source` names local data (an existing path, a glob, or something path-shaped).

    Anything else is treated as a hub id ("owner/name"). A path-shaped string that does not exist
    (e.g. "./data/train.jsonl") still counts as local, so the user gets "not found" rather than a
    network lookup.
    """
    source = str(source)
    if os.path.exists(os.path.expanduser(source)):
        return True
    if is_glob(source):
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


def is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


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
