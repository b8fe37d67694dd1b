"""`hf://org/repo@revision`: a snapshot of a Hugging Face Hub repository.

The Hub has its own content-addressed cache (HF_HOME), with atomic downloads
and revisions, so Kiln uses `huggingface_hub.snapshot_download` as is rather
than copying into its own cache. HF_TOKEN, HF_HOME and HF_HUB_OFFLINE=1 are
respected. Offline, a snapshot already in the Hub cache is used; anything
else fails with a message saying the path needs the network or a local copy.
"""

from __future__ import annotations

from pathlib import Path

from kiln.errors import install_hint
from kiln.storage.errors import MissingStorageExtra, ModelNotFound, StorageUnreachable
from kiln.storage.uri import ModelUri

# Configs, tokenizers and weights in safe formats. Pickled weights (*.bin, *.pt, *.pkl)
# are not fetched: loading them runs code (see `trusted` in the docs).
_PATTERNS = ["*.json", "*.safetensors", "*.onnx", "*.txt", "*.model", "*.md"]


def snapshot(uri: ModelUri) -> Path:
    """The local folder holding `uri`'s files, fetched into (or found in) the Hub cache."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise MissingStorageExtra(
            f"reading hf:// model paths needs the 'huggingface_hub' package (model path: {uri})",
            fix=f"install Kiln's hf extra: {install_hint('hf')}",
        ) from None
    try:
        folder = snapshot_download(uri.path, revision=uri.revision, allow_patterns=_PATTERNS)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelNotFound(
            f"the Hugging Face Hub has no repository or revision for {uri} ({type(exc).__name__})",
            fix="check the org/repo name and the @revision; set HF_TOKEN for a private repository",
        ) from None
    except LocalEntryNotFoundError:
        raise StorageUnreachable(
            f"the model at {uri} needs the network: the Hugging Face Hub cannot be reached "
            "(or HF_HUB_OFFLINE=1 is set) and no copy of it is in the local Hub cache (HF_HOME)",
            fix="connect this machine to the network once so it is cached, or download the "
            "repository (huggingface-cli download ...) and point `model` at that local folder",
        ) from None
    except OSError as exc:
        raise StorageUnreachable(
            f"the model at {uri} needs the network, and the Hugging Face Hub cannot be "
            f"reached ({exc})",
            fix="connect to the network, or point `model` at a local copy of the repository",
        ) from None
    return Path(folder)
