"""Fetching a format's files from a Hugging Face repo, through huggingface_hub's cache.

The repo id and folder are checked before anything is fetched (a folder may not climb out
of the repo with ``..``), and a file that cannot be had is one :class:`GatedSAELoadError`
saying why (not in the cache with the network off, or not in the repo), not a
huggingface_hub traceback.
"""

from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

from sae_lens_gated.formats.validation import GatedSAELoadError

OFFLINE_NOTE = "the network is off (HF_HUB_OFFLINE=1)"


class HubFileMissingError(GatedSAELoadError):
    """A file that is in neither the local Hugging Face cache nor the repo."""


def check_hub_path(repo_id: str, folder: str | None) -> str:
    """Check a repo id and a folder in it; return the folder without outer slashes.

    Raises:
        GatedSAELoadError: ``repo_id`` is not a valid Hugging Face repo id, or ``folder``
            has a ``..`` segment (it would name a path outside the folder asked for).
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise GatedSAELoadError(
            f"{repo_id!r} is not a valid Hugging Face repo id: {error}"
        ) from error
    folder = (folder or "").strip("/")
    if ".." in folder.replace("\\", "/").split("/"):
        raise GatedSAELoadError(
            f"Hugging Face repo {repo_id!r}: folder {folder!r} has a '..' segment; give "
            "a folder inside the repo."
        )
    return folder


def download_hub_file(
    repo_id: str, folder: str | None, name: str, force_download: bool = False
) -> Path:
    """The local path of ``folder/name`` in Hugging Face repo ``repo_id``.

    Fetched into (or found in) huggingface_hub's cache; ``HF_HUB_OFFLINE=1`` restricts it to
    the cache.

    Args:
        repo_id: The repo, ``"owner/name"``.
        folder: The folder in the repo (None or ``""``: its root).
        name: The file name.
        force_download: Download even if the file is cached.

    Raises:
        HubFileMissingError: The file is not in the cache and cannot be downloaded (offline,
            or not in the repo).
        GatedSAELoadError: A bad repo id or folder, or a repo or revision that does not
            exist.
    """
    folder = check_hub_path(repo_id, folder)
    filename = f"{folder}/{name}" if folder else name
    where = f"Hugging Face repo {repo_id!r}, file {filename!r}"
    try:
        return Path(
            hf_hub_download(
                repo_id=repo_id, filename=filename, force_download=force_download
            )
        )
    except LocalEntryNotFoundError as error:
        why = (
            OFFLINE_NOTE
            if hf_constants.HF_HUB_OFFLINE
            else f"it could not be downloaded ({error})"
        )
        raise HubFileMissingError(
            f"{where} is not in the local Hugging Face cache, and {why}."
        ) from error
    except EntryNotFoundError as error:
        raise HubFileMissingError(f"{where} does not exist.") from error
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise GatedSAELoadError(
            f"Hugging Face repo {repo_id!r} does not exist or is private: {error}"
        ) from error
