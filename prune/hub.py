"""Publish a pruned checkpoint on the Hugging Face Hub (``chiptuning push``)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from chiptuning.errors import ChipTuningError, ProvenanceError, is_hub_error
from chiptuning.probe import is_pickle
from chiptuning.prune.provenance import PROVENANCE_FILE, load_record

log = logging.getLogger(__name__)


def pickled_files(record) -> list[str]:
    """Files of a checkpoint (as its record lists them) that are pickles."""
    return sorted(rel for rel in record.checksums if is_pickle(rel))


def push_to_hub(pruned_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, allow_pickle: bool = False) -> str:
    """Verify a pruned checkpoint and upload exactly its recorded files (and its record) to a model
    repository, each checked against its recorded sha256 as it is read for the upload.

    Args:
        pruned_dir: checkpoint written by ``chiptuning prune`` (checked before anything is sent).
        repo_id: ``user/name`` of the model repository (created if missing).
        private: create the repository private.
        token: Hugging Face token (default: the logged-in one).
        revision: branch to push to.
        commit_message: default "Upload chip-tuning checkpoint (layer l of L)".
        allow_pickle: publish a checkpoint whose chip is a pickle (saved with ``--allow-pickle``);
            refused otherwise: whoever loads it with ``allow_pickle=True`` runs code from it.

    Returns:
        The URL of the commit.

    Raises:
        ProvenanceError: the directory is not an intact pruned checkpoint.
        ChipTuningError: a pickle without ``allow_pickle``; the hub cannot be reached, or refuses
            (offline, no or a wrong token, no rights on the repository).
    """
    pruned_dir = Path(pruned_dir)
    record = load_record(pruned_dir)
    pickles = pickled_files(record)
    if pickles and not allow_pickle:
        raise ChipTuningError(f"{pruned_dir} holds a pickle ({', '.join(pickles)}), which runs code on whoever loads "
                              "it; re-train the chips and re-prune to publish it without one, or pass --allow-pickle")
    if pickles:
        log.warning("publishing a pickle (%s): its model card warns that loading it runs code", ", ".join(pickles))
    message = commit_message or f"Upload chip-tuning checkpoint (layer {record.layer} of {record.num_blocks})"
    try:
        with contextlib.ExitStack() as files:
            operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=files.enter_context(
                checked_file(pruned_dir, rel, digest))) for rel, digest in sorted(record.checksums.items())]
            operations.append(CommitOperationAdd(path_in_repo=PROVENANCE_FILE,
                                                 path_or_fileobj=str(pruned_dir / PROVENANCE_FILE)))
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.create_commit(repo_id=repo_id, repo_type="model", operations=operations, revision=revision,
                                     commit_message=message)
    except Exception as err:
        if not (isinstance(err, OSError) or is_hub_error(err)):
            raise
        detail = str(err).splitlines()[0] if str(err) else ""
        raise ChipTuningError(
            f"cannot push to the Hugging Face Hub ({type(err).__name__}{': ' + detail if detail else ''}); "
            "check the network (HF_HUB_OFFLINE must be unset) and the token (`hf auth login`, --token or HF_TOKEN)"
        ) from None
    url = str(getattr(info, "commit_url", info))
    log.info("pushed %s to %s", pruned_dir, url)
    return url


@contextlib.contextmanager
def checked_file(root: Path, rel: str, digest: str):
    """``root / rel`` opened for the upload, after its bytes were hashed through the same handle and
    found to be the recorded ``digest``.

    Raises:
        ProvenanceError: the file changed since the checkpoint was verified.
    """
    with open(root / rel, "rb") as f:
        sha = hashlib.sha256()
        while block := f.read(1 << 20):
            sha.update(block)
        if sha.hexdigest() != digest:
            raise ProvenanceError(f"{root}: file {rel} changed since it was verified; nothing was pushed")
        f.seek(0)
        yield f
