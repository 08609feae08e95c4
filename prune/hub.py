"""Publish a pruned checkpoint on the Hugging Face Hub (``chiptuning push``)."""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi

from chiptuning.prune.provenance import load_record

log = logging.getLogger(__name__)


def push_to_hub(pruned_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Verify a pruned checkpoint and upload the whole directory to a model repository.

    Args:
        pruned_dir: checkpoint written by ``chiptuning prune`` (checked before anything is sent).
        repo_id: ``user/name`` of the model repository (created if missing).
        private: create the repository private.
        token: Hugging Face token (default: the logged-in one).
        revision: branch to push to.
        commit_message: default "Upload chip-tuning checkpoint (layer l of L)".

    Returns:
        The URL of the commit.

    Raises:
        ProvenanceError: the directory is not an intact pruned checkpoint.
    """
    pruned_dir = Path(pruned_dir)
    record = load_record(pruned_dir)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    message = commit_message or f"Upload chip-tuning checkpoint (layer {record.layer} of {record.num_blocks})"
    info = api.upload_folder(folder_path=str(pruned_dir), repo_id=repo_id, repo_type="model",
                             revision=revision, commit_message=message)
    url = str(getattr(info, "commit_url", info))
    log.info("pushed %s to %s", pruned_dir, url)
    return url
