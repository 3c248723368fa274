"""The analysis state inside Hugging Face checkpoints, for :class:`ModelAnalysisCallback`.

``on_save`` writes ``analyzer.state_dict()`` - the step, the config and the computers' carried
state (``mask_overlap``'s previous changed set, for one); not the snapshot, which the loaded
weights give back at a measurement step - next to the weights, as
``grail_analysis_state_rank<r>.pt``: one file per rank, because each rank carries only its own
local part under DDP/FSDP2. The file holds plain containers and tensors, written with
``torch.save`` and read with ``weights_only=True``.

On resume, the first candidate file that exists and was saved at the resumed step by the same
number of processes is loaded with ``analyzer.load_state_dict(state, model=model)``. Anything
else (a missing, foreign or damaged file, another config) is logged and the analysis resumes as
without a saved state. Nothing here raises into training: the caller catches what a save
raises.

Example:
    >>> STATE_FILE.format(rank=0)
    'grail_analysis_state_rank0.pt'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..manager import ModelAnalysisManager

__all__ = ["STATE_FILE", "rank_and_world", "restore_state", "save_state", "state_files"]

logger = logging.getLogger(__name__)

#: The analysis state's file in a checkpoint folder, one per rank.
STATE_FILE = "grail_analysis_state_rank{rank}.pt"


def rank_and_world() -> tuple[int, int]:
    """This process' rank and the number of processes (``(0, 1)`` without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def save_state(analyzer: ModelAnalysisManager, folder: str, step: int) -> str | None:
    """Write this rank's state file into ``folder``; ``None`` if the folder does not exist.

    Written to a temporary name first and renamed, so a crash never leaves half a file under
    the real name.
    """
    if not os.path.isdir(folder):
        return None
    rank, world = rank_and_world()
    path = os.path.join(folder, STATE_FILE.format(rank=rank))
    payload = {"global_step": step, "world_size": world, "manager": analyzer.state_dict()}
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def state_files(folders: Sequence[Any]) -> list[str]:
    """This rank's state file in each of ``folders`` (``None`` and duplicates left out)."""
    rank, _ = rank_and_world()
    return [
        os.path.join(os.fspath(f), STATE_FILE.format(rank=rank))
        for f in dict.fromkeys(folders)
        if isinstance(f, (str, os.PathLike))
    ]


def restore_state(
    analyzer: ModelAnalysisManager, model: nn.Module, step: int, paths: Sequence[str]
) -> str | None:
    """Load the state saved at ``step`` from the first of ``paths`` that has it; its path.

    ``analyzer`` should already be reset to ``step``; after a file that fails to load it is
    reset to ``step`` again, so a failure leaves it as if no file had been found.
    """
    _, world = rank_and_world()
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            found = saved.get("global_step") if isinstance(saved, dict) else None
            if found != step:
                raise ValueError(f"it was saved at step {found}, not {step}")
            if saved.get("world_size") != world:
                saved_by = saved.get("world_size")
                raise ValueError(f"it was saved by {saved_by} processes, not {world}")
            analyzer.load_state_dict(saved["manager"], model=model)
        except Exception as err:  # a bad or foreign file: resume as without one
            analyzer.reset()
            analyzer.step_count = step
            logger.warning("analysis state %s not restored (%s); the analysis re-baselines",
                           path, err)
            continue
        return path
    return None
