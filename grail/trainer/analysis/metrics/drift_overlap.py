r"""The live run's changed set against saved masks: ``drift/overlap/{name}/*``.

``AnalysisConfig.drift_reference_masks = {name: path}`` names mask files written by
``grail-analysis mask`` (:mod:`~grail.trainer.analysis.core.mask_file`), e.g. the subnetwork an
earlier RL run changed. At every measurement of ``drift/*`` the live run's changed set since the
base, :math:`C_{now}`, is compared with each mask's set :math:`C_{ref}`, over the :math:`N`
analysed entries:

* ``drift/overlap/{name}/jaccard``: :math:`|C_{now} \cap C_{ref}| / |C_{now} \cup C_{ref}|`;
* ``drift/overlap/{name}/jaccard_random``: :math:`ab / (a + b - ab)` with
  :math:`a = |C_{now}|/N`, :math:`b = |C_{ref}|/N`, the Jaccard of independent random sets of the
  same densities;
* ``drift/overlap/{name}/overlap_now_in_ref``: :math:`|C_{now} \cap C_{ref}| / |C_{now}|` (its
  random value is b);
* ``drift/overlap/{name}/overlap_ref_in_now``: :math:`|C_{now} \cap C_{ref}| / |C_{ref}|` (its
  random value is a).

A ratio whose denominator is zero (nothing changed yet, an empty mask) is NaN.

**The live set uses the mask's own criterion**, read from the file, applied to
:math:`\Delta_{tot} = W_{now} - W_{base}` (:func:`~grail.trainer.analysis.ops.changed.
changed_flags`): ``exact`` (the stored value differs), ``threshold`` T (:math:`|\Delta_{tot}| > T`)
or ``bf16_view`` (the bf16-rounded values differ). For a ``keep_ratio`` r mask the live set is the
run's own exact global top-k of :math:`|\Delta_{tot}|`, :math:`k = \max(1, \mathrm{round}(rN))`,
ties in name then position order (:func:`~grail.trainer.analysis.ops.budget.exact_budget_drops`,
as ``grail-analysis mask --keep-ratio`` selects it): both sets then have the same size, and the
overlap says whether the largest changes fall in the same places. It costs the extra streamed
passes of the exact selection (one selection for all keep-ratio masks).

Cost and memory: one streamed pass over the base and the live weights per measurement (besides
the statistics'), computing each distinct criterion's flags once per chunk and counting them
against every mask of that criterion; four integer counts per mask, summed on the device and
all-reduced once. A mask file is opened lazily: its header when the config is built, a
parameter's packed bits the first time they are compared, then kept packed (one bit per entry,
:meth:`~grail.trainer.analysis.core.mask_file.SavedMask.packed`); only a chunk's bits are ever
unpacked.

Distributed: each rank counts what it owns - under FSDP2 its row shard, whose flat offset
(``shard_info(p).offset``) indexes the mask's bits; under DDP a replicated tensor on its owner
rank only - and the counts are summed over ranks, so every rank reports what one process reports
on the unsharded model.

Decisions where the design is silent:

* The masks must fit the model: when a base is taken, every analysed parameter must be in each
  mask with its global shape (:meth:`ReferenceMasks.check`, one
  :class:`~grail.trainer.analysis.core.mask_file.MaskFileError` naming the references and
  parameters that do not fit, raised to the caller, see
  :meth:`~grail.trainer.analysis.metrics.base.MetricComputer.check_base`). Parameters of the
  mask that the analysis does not cover (frozen ones under ``trainable_only``) are not compared:
  :math:`N` and :math:`|C_{ref}|` count the analysed entries only.
* A mask that does not fit the base at a measurement (the check raised and training went on, or
  the base was re-taken for a changed architecture) gives NaN values, with one warning; the
  other ``drift/*`` keys are unaffected.
* Non-finite entries of :math:`\Delta_{tot}` count as changed under ``exact`` and ``threshold``
  (as in the mask writer).

Example:
    >>> import os, tempfile, torch
    >>> from grail.trainer.analysis.core.mask_file import ChangeCriterion, MaskWriter
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> path = os.path.join(tempfile.mkdtemp(), "ref.safetensors")
    >>> w = MaskWriter(path, {"weight": (1, 4)}, ChangeCriterion("exact"))
    >>> w.write("weight", torch.tensor([True, True, False, False]))
    >>> _ = w.finish()
    >>> model = torch.nn.Linear(4, 1, bias=False)
    >>> base = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     model.weight[0, 1:3] += 1.0
    >>> refs = ReferenceMasks({"ref": path})
    >>> refs.check(base)
    >>> m = refs.compute(base.compute_delta(ParameterSnapshot.live(model)), base)
    >>> m["drift/overlap/ref/jaccard"], m["drift/overlap/ref/overlap_now_in_ref"]
    (0.3333333333333333, 0.5)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch

from ..core.distributed import all_reduce_
from ..core.logonce import LogOnce
from ..core.mask_file import ChangeCriterion, MaskFileError, SavedMask, load_mask
from ..core.snapshot import DeltaChunk, ParameterDelta, ParameterSnapshot
from ..keys import metric_key
from ..ops.budget import exact_budget_drops
from ..ops.changed import REFERENCE_KEYS, changed_flags, reference_counts, reference_overlap
from ..ops.masks import DropFn

__all__ = ["FAMILY", "ReferenceMasks", "overlap_key"]

FAMILY = "drift/overlap"

logger = logging.getLogger(__name__)


def overlap_key(reference: str, value: str) -> str:
    """``drift/overlap/{reference}/{value}`` for a value of
    :data:`~grail.trainer.analysis.ops.changed.REFERENCE_KEYS` (built by the key grammar)."""
    if value.endswith("_random"):
        return metric_key(FAMILY, value.removesuffix("_random"), variant="random",
                          reference=reference)
    return metric_key(FAMILY, value, reference=reference)


def _budget(ratio: float, total: int) -> int:
    """Entries of a top-``ratio`` set among ``total``: as the mask writer counts them."""
    return max(1, min(total, round(ratio * total)))


class ReferenceMasks:
    """Saved masks, opened lazily, and the live run's overlap with them (module docstring).

    Args:
        paths: ``reference name -> mask file`` (``AnalysisConfig.drift_reference_masks``).

    Raises:
        MaskFileError: a file is missing, is not a mask file, or is damaged.
    """

    def __init__(self, paths: Mapping[str, str | os.PathLike]) -> None:
        self.masks: dict[str, SavedMask] = {name: load_mask(p) for name, p in paths.items()}
        self._fit: tuple[tuple[int, float], str] | None = None  # (base key, problem or "")
        self._once = LogOnce(logger)

    def __len__(self) -> int:
        return len(self.masks)

    def keys(self) -> list[str]:
        """Every key :meth:`compute` returns, in order."""
        return [overlap_key(n, v) for n in self.masks for v in REFERENCE_KEYS]

    # --- fit ---------------------------------------------------------------------------------
    def problem(self, base: ParameterSnapshot) -> str:
        """What keeps the masks from fitting ``base``'s parameters (``""``: nothing); one check
        per base, remembered."""
        key = (id(base), base.timestamp)
        if self._fit is None or self._fit[0] != key:
            shapes = {n: base.shards[n].global_shape for n in base.data}
            problems = []
            for name, mask in self.masks.items():
                try:
                    mask.check_shapes(shapes)
                except MaskFileError as err:
                    problems.append(f"reference {name!r}: {err}")
            self._fit = (key, "; ".join(problems))
        return self._fit[1]

    def check(self, base: ParameterSnapshot) -> None:
        """Raise one :class:`MaskFileError` naming every reference whose mask does not fit
        ``base`` (the model's analysed parameters, global shapes)."""
        problem = self.problem(base)
        if problem:
            raise MaskFileError(f"drift_reference_masks do not fit the model: {problem}")

    # --- measurement -------------------------------------------------------------------------
    def compute(self, delta: ParameterDelta, base: ParameterSnapshot) -> dict[str, float]:
        """``drift/overlap/*`` of the base -> now ``delta`` (a collective under
        ``torch.distributed``: every rank calls it, with the same masks)."""
        problem = self.problem(base)
        if problem:
            self._once.warning(("misfit", problem), "drift/overlap/* is NaN: %s", problem)
            return dict.fromkeys(self.keys(), math.nan)
        names = list(self.masks)
        groups: dict[ChangeCriterion, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(self.masks[name].criterion, []).append(i)
        keep = self._keep_functions(delta, list(groups))  # collectives
        device = next(iter(delta.new.data.values())).device
        counts = torch.zeros(len(names), 4, dtype=torch.int64, device=device)
        for c in delta.stream():  # owned pieces only: every entry once over all ranks
            if c.delta.numel() == 0:
                continue
            offset = delta.shard(c.name).offset + c.start
            for criterion, rows in groups.items():
                flags = _flags(criterion, c, offset, keep.get(criterion))
                for i in rows:
                    counts[i] += reference_counts(self.masks[names[i]], c.name, offset, flags)
        all_reduce_(counts, "sum")
        out: dict[str, float] = {}
        for name, row in zip(names, counts.cpu().tolist(), strict=True):
            for value, v in reference_overlap(row).items():
                out[overlap_key(name, value)] = v
        return out

    @staticmethod
    def _keep_functions(
        delta: ParameterDelta, criteria: list[ChangeCriterion]
    ) -> dict[ChangeCriterion, DropFn]:
        """The exact top-k selection of each keep-ratio criterion (one selection for all)."""
        ratios = [c for c in criteria if c.kind == "keep_ratio"]
        if not ratios:
            return {}
        total = sum(delta.shard(n).global_numel for n in delta.names)
        budgets = [_budget(c.value or 1.0, total) for c in ratios]
        return dict(zip(ratios, exact_budget_drops(delta, budgets), strict=True))


def _flags(
    criterion: ChangeCriterion, c: DeltaChunk, offset: int, keep: DropFn | None
) -> torch.Tensor:
    """The live changed flags of one chunk under ``criterion`` (``offset``: global flat)."""
    if keep is not None:
        bits = c.delta.abs().view(torch.int32)
        return keep(c.name, offset, bits, torch.empty_like(bits)) == 0
    return changed_flags(criterion, c.old, c.new, c.delta)
