"""Agreement across ranks: the votes behind every decision of the manager that leads to a
collective.

In a process group no rank may take a branch that issues a collective alone, so every such
decision is put to a vote (:func:`~.core.distributed.agree`, one small integer all-reduce each):

* every call (:func:`vote_step`): the step (ranks that pass different ``step=`` values follow
  rank 0, with one warning) and a hash of the config and the computers (:func:`layout_hash`;
  ranks that differ measure nothing, with one warning); on calls that are not measurement steps
  this is the only work done;
* before a measurement (in the manager, one :func:`~.core.distributed.agree`): whether the
  analysis failed locally, whether the parameters are readable, whether any rank must re-baseline
  (no snapshot yet, parameters changed, or the ranks hold different parameter names, global
  shapes or dtypes - :func:`spec_hash` - then every rank re-baselines) and, per computer, whether
  it can run (inputs, model, optimizer): a computer runs on every rank or on none;
* after the computers (:func:`vote_results`): per computer, whether it failed anywhere (then its
  keys are dropped on every rank) and a hash of its key set; on a mismatch the key sets are
  exchanged and only the keys every rank has are kept, with one warning. The same vote carries
  one bit checksum per replicated parameter (see :func:`~.core.distributed.bit_checksums`), from
  which ``param_change/replicas_diverged`` is reported.

In one process every vote is the local value and nothing extra is computed. Warnings go through
the manager's :class:`~.core.logonce.LogOnce`.

Example:
    >>> import logging
    >>> vote_step(7, 0, LogOnce(logging.getLogger("demo")))  # one process: the local values
    (7, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import AnalysisConfig
from .core.distributed import (
    agree,
    all_gather_objects,
    bit_checksums,
    from_rank0,
    is_distributed,
    stable_hash,
)
from .core.logonce import LogOnce
from .core.snapshot import ParameterSnapshot
from .metrics.base import MetricComputer

__all__ = ["layout_hash", "spec_hash", "vote_results", "vote_step"]


def vote_step(wanted: int, layout: int, once: LogOnce) -> tuple[int, bool]:
    """``(step, same_layout)``: rank 0's step, and whether every rank's :func:`layout_hash`
    is the same (one collective in a process group)."""
    high, low = agree([wanted, from_rank0(wanted), layout])
    if high[0] != low[0]:
        once.warning(
            ("warn", "step-disagree"),
            "ranks passed different steps to on_optimizer_step (from %d to %d; this rank %d); "
            "every rank follows rank 0's step %d",
            low[0],
            high[0],
            wanted,
            high[1],
        )
    same_layout = high[2] == low[2]
    if not same_layout:
        once.warning(
            ("warn", "layout"),
            "ranks run the analysis with different configs or computers; nothing is measured "
            "until every rank passes the same AnalysisConfig and add_metric calls",
        )
    return high[1], same_layout


def layout_hash(config: AnalysisConfig, computers: Sequence[MetricComputer]) -> int:
    """What every rank must share for the measurements' collectives to line up: the config
    (but the snapshot device, which may be each rank's own GPU) and the computers."""
    cfg = {k: v for k, v in config.to_dict().items() if k != "snapshot_device"}
    kinds = [(type(c).__module__, type(c).__qualname__, c.name) for c in computers]
    return stable_hash([cfg, kinds])


def spec_hash(snapshot: ParameterSnapshot) -> int:
    """A hash of what every rank's parameters must share: names, global shapes, dtypes and
    whether each is sharded (local shapes and offsets differ between ranks by design)."""
    return stable_hash(
        [
            (name, list(info.global_shape), str(snapshot.param_dtypes[name]), info.sharded)
            for name, info in snapshot.shards.items()
        ]
    )


def vote_results(
    results: list[dict[str, float] | None],
    skipped: list[bool],
    names: list[str],
    live: ParameterSnapshot,
    replicated: list[str],
    once: LogOnce,
) -> int | None:
    """Drop, on every rank, the results of computers that failed on any rank and the keys that
    not every rank returned (``results`` is changed in place; ``names`` are the computers');
    returns the number of replicated tensors whose bits differ between ranks (None when there
    are none to compare, or in one process)."""
    if not is_distributed():
        return None
    n = len(results)
    failed = [r is None and not s for r, s in zip(results, skipped, strict=True)]
    keys = [stable_hash(sorted(r)) if r is not None else 0 for r in results]
    sums = bit_checksums([live.data[name] for name in replicated])
    high, low = agree([*failed, *keys, *sums])
    for i in range(n):
        if high[i]:
            results[i] = None
    mismatched = [i for i in range(n) if results[i] is not None and high[n + i] != low[n + i]]
    if mismatched:
        local = {i: sorted(results[i] or {}) for i in mismatched}
        every: list[Any] = all_gather_objects(local)
        for i in mismatched:
            common = set.intersection(*(set(keysets[i]) for keysets in every))
            dropped = sorted(set().union(*(keysets[i] for keysets in every)) - common)
            once.warning(
                ("warn", "keys", names[i]),
                "computer %r returns different keys on different ranks; %d keys that not every "
                "rank has are dropped (e.g. %s)",
                names[i],
                len(dropped),
                ", ".join(dropped[:3]),
            )
            results[i] = {k: v for k, v in (results[i] or {}).items() if k in common}
    if not replicated:
        return None
    return sum(h != lo for h, lo in zip(high[2 * n :], low[2 * n :], strict=True))
