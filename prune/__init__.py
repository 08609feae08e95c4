"""The prune stage: truncate a model after the chip's layer and ship it as a checkpoint.

* :func:`truncate_` - in-place model surgery (blocks, config depth, per-layer config, layer ids);
* :func:`prune` - chips directory + model -> pruned checkpoint directory (``chiptuning prune``);
* :class:`ChipModel` - load a pruned checkpoint and predict from raw text;
* :func:`evaluate` - run a checkpoint end to end on a labelled file (``chiptuning eval``).
"""

from chiptuning.prune.checkpoint import TaskChip, load_task_chips, prune, save_pruned
from chiptuning.prune.chip_model import ChipModel
from chiptuning.prune.evaluate import evaluate
from chiptuning.prune.hub import push_to_hub
from chiptuning.prune.provenance import PROVENANCE_FILE, read_provenance, verify_checksums
from chiptuning.prune.truncate import truncate_

__all__ = [
    "PROVENANCE_FILE",
    "ChipModel",
    "TaskChip",
    "evaluate",
    "load_task_chips",
    "prune",
    "push_to_hub",
    "read_provenance",
    "save_pruned",
    "truncate_",
    "verify_checksums",
]
