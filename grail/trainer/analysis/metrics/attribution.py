r"""Which module's update matters? Output attribution per component and per layer: ``attrib/*``.

Parameter statistics say where the weights moved, not where the behaviour changed. For each group
:math:`g` of analysed parameters - a component (``q_proj``, GPT-2's ``c_attn``, merged by
``component_map``) or a transformer block (``layer_3``), named as in
:mod:`~grail.trainer.analysis.core.naming` - the update of the measurement
:math:`\Delta = W_{now} - W_{old}`, :math:`1_g` selecting g's entries and :math:`P_W` the
next-token distributions of weights :math:`W` on the probe batch:

=============================  =====================================================================
``attrib/{g}/kl_only``         :math:`\overline{KL}(P_{now} \| P_{W_{old} + \Delta 1_g})`: how far
                               "only g updated" is from the full update (0: g alone carries it)
``attrib/{g}/kl_without``      :math:`\overline{KL}(P_{now} \| P_{W_{now} - \Delta 1_g})`: what is
                               lost when g's update is dropped
``attrib/{g}/update_share``    :math:`\lVert\Delta_g\rVert^2 / \lVert\Delta\rVert^2`
``attrib/{g}/param_share``     g's entries / all analysed entries
``attrib/kl_total``            :math:`\overline{KL}(P_{now} \| P_{old})`, the scale of the above
``attrib/tokens``              token positions compared (all ranks together)
``attrib/nonfinite``           positions dropped because some logits were NaN/Inf
=============================  =====================================================================

:math:`\overline{KL}` is the mean over compared tokens of the accurate KL of
:mod:`~grail.trainer.analysis.ops.divergence`. ``{g}`` is ``component/{c}`` or ``layer_{i}``:
``attrib/component/o_proj/kl_without``, ``attrib/layer_3/kl_only``.

Reading it: ``kl_only`` near 0 with ``kl_without`` near ``kl_total`` means g carries the change
by itself; ``kl_without`` near 0 means g's update does not matter to the outputs, whatever its
``update_share``. The KLs of several groups need not add up: the model is not linear in its weights.

How: a group is a set of whole tensors, so every variant is reached by exchanging whole tensors
with the snapshot (:class:`~grail.trainer.analysis.patching.exchange.TensorExchange`; no mask, and
on a CPU model with a CPU snapshot no copy at all). First every tensor reads ``W_old`` (one
forward: ``kl_total``), then each measured group's tensors go to ``W_now`` and back (``kl_only``);
then everything reads ``W_now`` again and each group's tensors go to ``W_old`` and back
(``kl_without``). Forwards: two per measured group and one for ``kl_total``, plus the full update's
reference forward, shared with the sparse and low-rank families
(:func:`~grail.trainer.analysis.metrics.sparse_quality.shared_reference`). Inputs, token cap
(``sparse_quality_max_tokens``), padding and invariants are those of sparse quality; the KLs are
token-weighted over every rank's batch.

Decisions where the specification is silent:

* A group whose update is exactly zero (every float32 entry of :math:`\Delta_g` is 0) gets its
  exact values without forwards: ``kl_only = kl_total``, ``kl_without = 0``. It does not count
  towards ``max_groups``.
* ``max_groups`` bounds the measured groups of all kinds together: the largest by
  ``update_share`` (ties in group order). The others keep their keys with NaN KLs, so keys are
  stable across steps; one INFO line says so the first time.
* ``update_share`` sums the squares of the finite entries of :math:`\Delta` in float64 (as
  ``param_change/norm_l2`` does); NaN when :math:`\Delta` is zero everywhere. Component groups
  partition the analysed parameters (their shares sum to 1); layer groups leave out embeddings,
  final norm and head.
* ``attrib/nonfinite`` is reported as ``sparse/nonfinite`` is.

Whole fine-tune: :func:`attribution_metrics` takes the delta, the reference and the key family as
arguments; ``drift/attrib/*`` is the same call with :math:`\Delta = W_{now} - W_{base}` (the base
snapshot as ``delta.old``) and ``family="drift/attrib"``.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed, self.proj = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8)
    ...         self.head = torch.nn.Linear(8, 10)
    ...     def forward(self, x):
    ...         return self.head(torch.tanh(self.proj(self.embed(x))))
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = Net()
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     _ = model.proj.weight.add_(0.5)
    >>> delta = old.compute_delta(ParameterSnapshot.live(model))
    >>> ctx = AnalysisContext(model=model, inputs=torch.randint(0, 10, (2, 5)), step=1)
    >>> m = AttributionMetrics().compute(delta, context=ctx)
    >>> m["attrib/component/proj/kl_only"], m["attrib/component/proj/update_share"]
    (0.0, 1.0)
    >>> m["attrib/component/proj/kl_without"] == m["attrib/kl_total"] > 0
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..config import ATTRIBUTION_GROUP_KINDS, AnalysisConfig
from ..core.distributed import all_reduce_
from ..core.engines import unwrap_model
from ..core.naming import ParameterNaming, group_prefix
from ..core.snapshot import ParameterDelta
from ..ops.comparisons import Comparisons
from ..ops.divergence import LogitsReference
from ..patching.exchange import TensorExchange
from ..patching.forward import agree_across_ranks, prepare_inputs, run_forward
from ..patching.swaps import analysis_mode
from .base import AnalysisContext, MetricComputer
from .sparse_quality import shared_reference

__all__ = [
    "GROUP_KINDS",
    "AttributionMetrics",
    "attribution_groups",
    "attribution_metrics",
    "attribution_table",
    "update_sums",
]

#: Group kinds of ``attribution_groups``, in the order their groups are listed.
GROUP_KINDS = ATTRIBUTION_GROUP_KINDS
_GROUP_STATS = ("kl_only", "kl_without", "update_share", "param_share")
_BLOCK = 1 << 18  # float64 scratch entries for the sums of squares


class AttributionMetrics(MetricComputer):
    """Output attribution per component and per layer (see module docstring).

    Args:
        groups: group kinds, ``"component"`` and/or ``"layer"``.
        max_groups: at most this many groups are measured (two forwards each).
        component_map: renames derived components into coarser groups.
        max_tokens: token positions compared (sparse quality's cap, so the reference is shared).
        output_fn: picks the logits from the model output.
        fused: the compiled reference rows: True, False or "auto" (the compile policy,
            :mod:`~grail.trainer.analysis.kernels.policy`, family ``rows``).
        skip_unchanged: exact values without forwards for groups with a zero update.
        rebind: whole-tensor exchange by rebinding storage where possible (see
            :class:`~grail.trainer.analysis.patching.exchange.TensorExchange`).
    """

    name = "attrib"

    def __init__(
        self,
        groups: Sequence[str] = ("component",),
        max_groups: int = 16,
        component_map: Mapping[str, str] | None = None,
        max_tokens: int = 4096,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        fused: bool | str = True,
        skip_unchanged: bool = True,
        rebind: bool = True,
    ) -> None:
        unknown = sorted(set(groups) - set(GROUP_KINDS))
        if unknown or not groups:
            raise ValueError(f"groups must be a non-empty subset of {list(GROUP_KINDS)}, got "
                             f"{list(groups)!r}")
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups!r}")
        self.groups = [k for k in GROUP_KINDS if k in groups]
        self.max_groups = max_groups
        self.component_map = dict(component_map or {})
        self.max_tokens = max_tokens
        self.output_fn = output_fn
        self.fused = fused
        self.skip_unchanged = skip_unchanged
        self.rebind = rebind

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> AttributionMetrics:
        return cls(
            groups=config.attribution_groups,
            max_groups=config.attribution_max_groups,
            component_map=config.component_map,
            max_tokens=config.sparse_quality_max_tokens,
            output_fn=output_fn,
            fused=config.fused_kernels,
        )

    def requires_model(self) -> bool:
        return True

    def requires_inputs(self) -> bool:
        return True

    def compute(
        self,
        delta: ParameterDelta | None = None,
        context: AnalysisContext | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        if delta is None or len(delta) == 0:
            return self.skip("no parameter delta")
        if context is None or context.model is None:
            return self.skip("no model in the context")
        if not delta.new.is_live:
            return self.skip("the newer snapshot is not the live model (ParameterSnapshot.live)")
        model = unwrap_model(context.model)
        prepared = agree_across_ranks(prepare_inputs(model, context.inputs, self.max_tokens))
        if isinstance(prepared, str):
            return self.skip_inputs(prepared)
        # the compile policy decides, as for the other forward-pass families ("rows")
        fused = kernels.use("rows", delta.numel(), self.fused, context.step)

        def forward() -> torch.Tensor:
            return run_forward(model, prepared, self.output_fn)

        groups = attribution_groups(delta.names, self.groups, self.component_map)
        with analysis_mode(model):
            reference = shared_reference(
                context, delta, self.max_tokens, self.output_fn, forward, fused=fused
            )
            return attribution_metrics(
                model,
                delta,
                reference,
                groups,
                forward,
                max_groups=self.max_groups,
                skip_unchanged=self.skip_unchanged,
                rebind=self.rebind,
                log=self.log_once,
            )


def attribution_groups(
    names: Sequence[str],
    kinds: Sequence[str] = ("component",),
    component_map: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """``group -> parameter names`` with groups ``component/{c}`` and ``layer/{layer}`` (in the
    order of :data:`GROUP_KINDS`, then of first appearance); parameters outside any block belong
    to no layer group.

    >>> groups = attribution_groups(["model.layers.0.mlp.up_proj.weight", "lm_head.weight"],
    ...                             ["component", "layer"])
    >>> {g: len(names) for g, names in groups.items()}
    {'component/up_proj': 1, 'component/lm_head': 1, 'layer/layer_0': 1}
    """
    naming = ParameterNaming(names, component_map)
    groups: dict[str, list[str]] = {}
    for kind in GROUP_KINDS:
        if kind not in kinds:
            continue
        for name in names:
            label = naming.component(name) if kind == "component" else naming.layer(name)
            if label is not None:
                groups.setdefault(f"{kind}/{label}", []).append(name)
    return groups


def update_sums(delta: ParameterDelta) -> dict[str, tuple[float, int]]:
    """``name -> (sum of squares of the finite entries of the update in float64, number of
    non-finite entries)``, over every rank (one all-reduce; each entry counted once)."""
    names = list(delta.names)
    index = {n: i for i, n in enumerate(names)}
    device = delta.new.data[names[0]].device if names else torch.device("cpu")
    sums = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    scratch = torch.empty(_BLOCK, dtype=torch.float64, device=device)
    for c in delta.stream():
        row = sums[index[c.name], 0]
        for s in range(0, c.delta.numel(), _BLOCK):
            block = scratch[: min(_BLOCK, c.delta.numel() - s)].copy_(c.delta[s : s + _BLOCK])
            row += torch.dot(block, block)  # float64 squares of float32 values: exact
    # only a non-finite entry makes a float64 sum of float32 squares non-finite: redo those
    redo = [names[i] for i in (~torch.isfinite(sums[:, 0])).nonzero().flatten().tolist()]
    for name in redo:
        sums[index[name]] = 0.0
    for c in delta.stream(redo):
        finite = torch.isfinite(c.delta)
        d = torch.where(finite, c.delta, 0.0).double()
        sums[index[c.name], 0] += torch.dot(d, d)
        sums[index[c.name], 1] += (~finite).sum()
    values = all_reduce_(sums, "sum").tolist()
    return {n: (v[0], int(v[1])) for n, v in zip(names, values, strict=True)}


def attribution_metrics(
    model: nn.Module,
    delta: ParameterDelta,
    reference: LogitsReference,
    groups: Mapping[str, Sequence[str]],
    forward: Callable[[], torch.Tensor],
    *,
    max_groups: int = 16,
    family: str = "attrib",
    skip_unchanged: bool = True,
    rebind: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """The family's keys for ``delta`` (``delta.old`` -> the live model) and ``groups``
    (:func:`attribution_groups`), compared with ``reference`` (the live model's logits).

    Runs inside :func:`~grail.trainer.analysis.patching.swaps.analysis_mode`; ``forward()`` runs
    the model on the prepared batch. Every rank must call it with the same groups: the choice
    of groups to measure rests on reduced sums only, so all ranks run the same forwards.
    """
    sums = update_sums(delta)
    total_sq = sum(sq for sq, _ in sums.values())
    numel = {n: delta.shard(n).global_numel for n in delta.names}
    total_numel = sum(numel.values())
    group_sq = {g: sum(sums[n][0] for n in members) for g, members in groups.items()}
    changed = {g: group_sq[g] > 0 or any(sums[n][1] for n in members)
               for g, members in groups.items()}
    candidates = [g for g in groups if changed[g] or not skip_unchanged]
    chosen = set(sorted(candidates, key=lambda g: -group_sq[g])[:max_groups])  # stable: ties
    if len(candidates) > max_groups and log is not None:
        log(f"{len(candidates)} groups with an update exceed max_groups={max_groups} "
            "(AnalysisConfig.attribution_max_groups); each measurement measures the "
            f"{max_groups} largest by update_share and reports NaN KLs for the others")
    measured = [g for g in groups if g in chosen]
    comparisons = Comparisons(reference, kl_only=True)  # every key here is a KL
    with TensorExchange(model, delta, rebind=rebind) as exchange:
        exchange.toggle(delta.names)  # W_old everywhere
        comparisons.add("total", forward())
        for g in measured:  # only g updated
            exchange.toggle(groups[g])
            comparisons.add(f"only/{g}", forward())
            exchange.toggle(groups[g])
        exchange.restore()  # W_now everywhere
        for g in measured:  # g's update dropped
            exchange.toggle(groups[g])
            comparisons.add(f"without/{g}", forward())
            exchange.toggle(groups[g])
    results = comparisons.results()  # token-weighted over every rank's batch
    kl_total = results["total"]["kl"]
    nonfinite = max(comparisons.reference_nonfinite,
                    *(int(r["nonfinite_rows"]) for r in results.values()))
    out: dict[str, float] = {}
    for g, members in groups.items():
        prefix = group_prefix(family, g)
        if g in chosen:
            kl_only, kl_without = results[f"only/{g}"]["kl"], results[f"without/{g}"]["kl"]
        elif not changed[g]:  # W_old + 0 is W_old, W_now - 0 is W_now: exact without forwards
            kl_only, kl_without = kl_total, 0.0
        else:
            kl_only = kl_without = math.nan
        out[f"{prefix}kl_only"] = kl_only
        out[f"{prefix}kl_without"] = kl_without
        out[f"{prefix}update_share"] = group_sq[g] / total_sq if total_sq > 0 else math.nan
        out[f"{prefix}param_share"] = sum(numel[n] for n in members) / total_numel
    out[f"{family}/kl_total"] = kl_total
    out[f"{family}/tokens"] = float(comparisons.reference_rows)
    out[f"{family}/nonfinite"] = float(nonfinite)
    return out


def attribution_table(
    metrics: Mapping[str, float | None], family: str = "attrib"
) -> dict[str, Any] | None:
    """The family's keys as a table: ``{"kl_total", "tokens", "groups": [{"group", "kind",
    "kl_only", "kl_without", "update_share", "param_share"}, ...]}``, components first (by
    name), then layers (by index); None without any group key.

    >>> t = attribution_table({"attrib/kl_total": 0.5, "attrib/layer_10/kl_only": 0.1,
    ...                        "attrib/layer_2/kl_only": 0.2,
    ...                        "attrib/component/q_proj/kl_only": 0.3})
    >>> [(r["group"], r["kind"], r["kl_only"]) for r in t["groups"]], t["kl_total"]
    ([('q_proj', 'component', 0.3), ('layer_2', 'layer', 0.2), ('layer_10', 'layer', 0.1)], 0.5)
    """
    start = f"{family}/"
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        if not key.startswith(start) or key.count("/") < start.count("/") + 1:
            continue
        label, stat = key[len(start):].rsplit("/", 1)
        if stat not in _GROUP_STATS:
            continue
        kind, group = ("component", label[len("component/"):]) if label.startswith(
            "component/") else ("layer", label)
        row = rows.setdefault(label, {"group": group, "kind": kind})
        row[stat] = value
    if not rows:
        return None
    for row in rows.values():
        for stat in _GROUP_STATS:
            row.setdefault(stat, None)
    ordered = sorted(rows.values(), key=lambda r: (r["kind"] != "component", _natural(r["group"])))
    return {
        "kl_total": metrics.get(f"{family}/kl_total"),
        "tokens": metrics.get(f"{family}/tokens"),
        "groups": ordered,
    }


def _natural(text: str) -> list[Any]:
    """Sort key that orders ``layer_2`` before ``layer_10``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text)]
