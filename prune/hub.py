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


def push_to_hub(pruned_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, allow_pickle: bool = False) -> str:
    """Verify a pruned checkpoint and upload exactly its recorded files and its record to the model
    repository ``repo_id`` (created if missing), each file checked against its sha256 as it is read
    for the upload; return the commit's URL. Raises ProvenanceError for a checkpoint that is not
    intact, ChipTuningError for a pickle without ``allow_pickle`` or a hub that cannot be reached."""
    pruned_dir = Path(pruned_dir)
    record = load_record(pruned_dir)
    if pickles := sorted(rel for rel in record.checksums if is_pickle(rel)):
        if not allow_pickle:
            raise ChipTuningError(f"{pruned_dir} holds a pickle ({', '.join(pickles)}), which runs code on whoever "
                                  "loads it; re-train the chips and re-prune to publish it without one, or pass "
                                  "--allow-pickle")
        log.warning("publishing a pickle (%s): its model card warns that loading it runs code", ", ".join(pickles))
    message = commit_message or f"Upload chip-tuning checkpoint (layer {record.layer} of {record.num_blocks})"
    try:
        with contextlib.ExitStack() as files:
            operations = [CommitOperationAdd(rel, files.enter_context(checked_file(pruned_dir, rel, digest)))
                          for rel, digest in sorted(record.checksums.items())]
            operations.append(CommitOperationAdd(PROVENANCE_FILE, str(pruned_dir / PROVENANCE_FILE)))
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.create_commit(repo_id=repo_id, repo_type="model", operations=operations, revision=revision,
                                     commit_message=message)
    except Exception as err:
        if not (isinstance(err, OSError) or is_hub_error(err)):
            raise
        detail = f": {str(err).splitlines()[0]}" if str(err) else ""
        raise ChipTuningError(
            f"cannot push to the Hugging Face Hub ({type(err).__name__}{detail}); check the network "
            "(HF_HUB_OFFLINE must be unset) and the token (`hf auth login`, --token or HF_TOKEN)") from None
    url = str(getattr(info, "commit_url", info))
    log.info("pushed %s to %s", pruned_dir, url)
    return url


@contextlib.contextmanager
def checked_file(root: Path, rel: str, digest: str):
    """``root / rel`` opened for the upload once its bytes, read through that handle, hash to ``digest``."""
    with open(root / rel, "rb") as f:
        sha = hashlib.sha256()
        while block := f.read(1 << 20):
            sha.update(block)
        if sha.hexdigest() != digest:
            raise ProvenanceError(f"{root}: file {rel} changed since it was verified; nothing was pushed")
        f.seek(0)
        yield f
