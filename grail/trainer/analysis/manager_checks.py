"""What the manager takes from its caller as given: a step number and a snapshot device.

* :func:`integer_step` reads ``on_optimizer_step(..., step=N)``: an integer (Python, numpy or a
  one-element integer torch tensor), or None for anything else, which the manager ignores with
  one warning;
* :func:`check_device_exists` checks, when the manager is built, that
  ``AnalysisConfig.snapshot_device`` exists on this machine (the config itself does not, as it
  may be written elsewhere), with an error that says what to change.

Example:
    >>> integer_step(12), integer_step(12.0)
    (12, None)
    >>> check_device_exists("cpu")  # a device this machine lacks raises a ValueError
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

__all__ = ["check_device_exists", "integer_step"]


def integer_step(step: Any) -> int | None:
    """``step`` as an int if it is an integer (Python, numpy, or a one-element integer tensor),
    else None; booleans are not steps.

    >>> [integer_step(s) for s in (7, np.int64(7), torch.tensor(7), 7.0, "7", True)]
    [7, 7, 7, None, None, None]
    """
    if isinstance(step, (bool, np.bool_)):
        return None
    if isinstance(step, torch.Tensor):
        real_or_bool = step.is_floating_point() or step.is_complex() or step.dtype == torch.bool
        return int(step.item()) if step.numel() == 1 and not real_or_bool else None
    try:
        return operator.index(step)
    except TypeError:
        return None


def check_device_exists(device: str) -> None:
    """Raise a ValueError that says what to change when ``device`` is not on this machine."""
    dev = torch.device(device)
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None),
               "mps": getattr(torch.backends, "mps", None)}.get(dev.type)
    if backend is None:  # cpu (or a type the config already rejected)
        return
    count = 1
    if not backend.is_available():
        count = 0
    elif hasattr(backend, "device_count"):
        count = backend.device_count()
    if count == 0 or (dev.index is not None and dev.index >= count):
        found = f"{count} {dev.type} device(s)" if count else f"no {dev.type} device"
        raise ValueError(
            f"AnalysisConfig.snapshot_device={device!r}, but this machine has {found}; set "
            "AnalysisConfig.snapshot_device='cpu' (the default: snapshots in host memory) or a "
            "device that exists here"
        )
