"""Where a model, tokenizer or adapter lives: a local directory, a remote one (`gs://...`, copied
into the local cache by `slim_jax.paths.local_copy`), or a Hugging Face hub snapshot.

A leaf module (imports nothing of slim_jax but errors and paths), shared by `slim_jax.tokenizer`,
`slim_jax.models` and `slim_jax.lorahub`. `huggingface_hub` is imported only when a hub id has to
be fetched (a heavy optional dependency for local use).

>>> import tempfile
>>> d = Path(tempfile.mkdtemp()); _ = (d / "config.json").write_text("{}")
>>> resolve_model_dir(d) == d.resolve()
True
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from slim_jax.errors import CheckpointError
from slim_jax.paths import as_path, is_remote, local_copy, probe

# What a hub download fetches by default: configs, safetensors weights and tokenizer files; never
# pickles (pass `allow_patterns` to `resolve_model_dir` to fetch those deliberately).
DEFAULT_HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

PathLike = str | os.PathLike[str]


def resolve_model_dir(
    name_or_path: PathLike,
    *,
    required: Sequence[str] = ("config.json",),
    allow_patterns: Sequence[str] | None = DEFAULT_HUB_PATTERNS,
    revision: str | None = None,
) -> Path:
    """The local directory of a model: `name_or_path` itself, a local copy of a remote directory,
    or a hub snapshot of that id.

    Args:
      name_or_path: a local directory; a remote one (`gs://bucket/model`: its files that match
        `allow_patterns` are copied into `slim_jax.paths.cache_dir()`, once per host); or a hub id
        (`owner/name`) fetched with `huggingface_hub.snapshot_download` (from the local cache when
        offline).
      required: files that must exist in the directory (checked either way, so a wrong directory is
        reported here, naming what is missing).
      allow_patterns: glob patterns of the files a hub download or remote copy fetches (None:
        all files).
      revision: hub branch, tag or commit.

    Returns:
      The absolute local directory.

    Raises:
      CheckpointError: the directory lacks a required file; the path does not exist and is not a hub
        id; or the hub cannot be reached (offline) and the id is not in the cache, naming the files;
        a remote directory that does not exist or cannot be read (`RemotePathError`, naming the
        URL).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "config.json").write_text("{}")
    >>> resolve_model_dir(d) == d.resolve()
    True
    """
    if is_remote(name_or_path):
        remote = as_path(name_or_path)
        if not probe(remote, "is_dir"):
            raise CheckpointError(f"no model directory at {remote}" + (
                " (it is a file)" if probe(remote) else ""))
        missing = [name for name in required if not probe(remote / name)]
        if missing:
            raise CheckpointError(f"model directory {remote} lacks {', '.join(missing)}")
        return local_copy(remote, allow_patterns)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _check_required(path.resolve(), required, str(name_or_path))
    if path.exists():
        raise CheckpointError(f"{str(name_or_path)!r} is a file; expected a model directory "
                              f"(holding {', '.join(required) or 'the model files'}) or a hub id")
    name = str(name_or_path)
    if not HUB_ID.match(name):
        raise CheckpointError(f"no directory {name!r}: expected an existing local model directory "
                              "or a Hugging Face hub id of the form 'owner/name'")
    snapshot = Path(_download(name, allow_patterns, revision, required))
    return _check_required(snapshot, required, name)


def _download(
    repo_id: str,
    allow_patterns: Sequence[str] | None,
    revision: str | None,
    required: Sequence[str],
) -> str:
    """Fetch a hub snapshot (from the cache when offline); errors name the missing files."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.is_offline_mode()
    needed = ", ".join(required) or "the model files"
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            local_files_only=offline,
        )
    except GatedRepoError as err:
        raise CheckpointError(f"hub repository {repo_id!r} is gated: accept its licence on the hub "
                              "and log in (`hf auth login`), or pass a local directory") from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f"hub repository {repo_id!r} has no revision {revision!r}") from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"{repo_id!r} is neither a local directory nor a hub repository "
                              "(or it is private: log in with `hf auth login`)") from err
    except (LocalEntryNotFoundError, ConnectionError, TimeoutError, OSError) as err:
        if isinstance(err, HfHubHTTPError):
            raise CheckpointError(f"downloading {repo_id!r} from the hub failed: {err}") from err
        why = ("the hub is offline (HF_HUB_OFFLINE is set)" if offline
               else "the hub cannot be reached")
        raise CheckpointError(
            f"cannot find model {repo_id!r}: it is not a local directory, {why}, and the local "
            f"Hugging Face cache has no copy. Missing files: {needed}. Download it where the hub "
            f"is reachable (`hf download {repo_id}`) and pass that directory"
        ) from err


def _check_required(path: Path, required: Sequence[str], shown: str) -> Path:
    missing = [name for name in required if not (path / name).exists()]
    if missing:
        present = sorted(p.name for p in path.iterdir())[:20]
        raise CheckpointError(f"model directory {shown!r} lacks {', '.join(missing)} "
                              f"(it holds: {', '.join(present) or 'nothing'})")
    return path
