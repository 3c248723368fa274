r"""The metric-key grammar: keys are built here and read back here, nowhere else.

A key names one number. Its shape::

    key     := family "/" [scope "/"] leaf
    family  := segment ("/" segment)*        param_change, sparse, drift, drift/sparse, ...
    scope   := layer                         layer_3, encoder.block.layer_3
             | "component/" group            component/q_proj
             | group                         after a family whose last segment is "overlap"
    leaf    := name [label] [variant]
    label   := "_at_" (threshold | "keep_" ratio | "budget_r" rank | "r" rank) | "_top" k
    variant := "_random" | "_dare"

Examples, one per family: ``param_change/sparsity_at_1e-06``,
``param_change/layer_3/mean_abs_delta``, ``gradient/component/q_proj/norm_l2``,
``sparse/kl_at_keep_0.1_random``, ``sparse/kl_at_budget_r8``, ``lowrank/energy_at_r8``,
``drift/sparse/kl_at_keep_0.01_dare``, ``drift/overlap/sft/jaccard``,
``attrib/component/mlp/kl_only``, ``principal/energy_in_top8_random``.

:func:`metric_key` builds a key from its parts and :func:`parse_key` splits one into a
:class:`KeyParts`; ``parse_key(k).key == k`` for every key the package writes. The label
fragments have their own builders (:func:`format_threshold`, :func:`format_keep_ratio`,
:func:`format_rank`, :func:`format_budget`, :func:`format_top`) and are read back by
:attr:`KeyParts.label_kind` and :attr:`KeyParts.label_value`.

Decisions where the design is silent:

* ``family`` is the whole path before the scope: ``drift/sparse/kl_at_keep_0.1`` is family
  ``drift/sparse`` (the sparse question asked of the whole fine-tune), whose :attr:`~KeyParts.root`
  is ``drift``. A scope ends the family; nothing but the leaf follows it.
* A family whose last segment is ``overlap`` takes a free group name next, the reference the
  overlap is measured against: ``drift/overlap/{name}/jaccard`` has scope ``"reference"``.
* The label ``top{k}`` (principal directions) is joined with ``_`` (``energy_in_top8``), every
  other label with ``_at_``.
* Parts that would not read back as themselves (a name containing ``_at_`` or ending in
  ``_random``, a group containing ``/``, a layer group that is not ``layer_{i}``) are rejected
  by :func:`metric_key` with a ``ValueError``: such a key would be misread by every report.
* :func:`parse_key` returns ``None`` for a string outside the grammar (no ``/``, an empty
  segment, ``component`` without a group); reports show such keys as they are.

This module imports nothing beyond the standard library, so the reports read keys without torch.

Example:
    >>> parts = parse_key("sparse/kl_at_keep_0.1_random")
    >>> parts.family, parts.scope, parts.name, parts.label, parts.variant
    ('sparse', 'global', 'kl', 'keep_0.1', 'random')
    >>> parts.label_kind, parts.label_value
    ('keep', 0.1)
    >>> parts.with_(name="kept_ratio", variant=None).key
    'sparse/kept_ratio_at_keep_0.1'
    >>> metric_key("gradient", "sparsity", label=format_threshold(1e-6), layer="layer_3")
    'gradient/layer_3/sparsity_at_1e-06'
    >>> parse_key("attrib/component/mlp/kl_only").group
    'mlp'
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "VARIANTS",
    "KeyParts",
    "Scope",
    "format_budget",
    "format_keep_ratio",
    "format_rank",
    "format_threshold",
    "format_top",
    "metric_key",
    "parse_key",
]

Scope = Literal["global", "layer", "component", "reference"]
#: Suffixes of the baselines of a masked update: a random mask, and the random mask rescaled.
VARIANTS = ("random", "dare")

_LAYER = re.compile(r"^(?:.+\.)?layer_(\d+)$")
_LEAF = re.compile(
    r"^(?P<name>.+?)(?:_at_(?P<at>.+?)|_(?P<top>top\d+))?(?:_(?P<variant>random|dare))?$"
)
_THRESHOLD = re.compile(r"^\d(?:\.\d+)?e[+-]\d+$")
_RANK = re.compile(r"^r(\d+)$")
_BUDGET = re.compile(r"^budget_r(\d+)$")
_TOP = re.compile(r"^top(\d+)$")
_REFERENCE_FAMILY = "overlap"  # last family segment that takes a reference name


# --- label fragments --------------------------------------------------------------------------
def format_threshold(t: float) -> str:
    """The key fragment of a threshold: ``format_threshold(1e-6) == "1e-06"``.

    ``f"{t:.0e}"``; ``-0.0`` is written like ``0.0`` (``"0e+00"``).
    """
    return f"{t + 0.0:.0e}"  # -0.0 + 0.0 == +0.0; no other value changes


def format_keep_ratio(r: float) -> str:
    """Key label of a kept fraction: ``format_keep_ratio(0.01) == "keep_0.01"``."""
    return f"keep_{r:g}"


def format_rank(r: int) -> str:
    """Key label of a rank: ``format_rank(8) == "r8"`` (``lowrank/energy_at_r8``)."""
    return f"r{int(r)}"


def format_budget(r: int) -> str:
    """Key label of the parameter budget of rank ``r``: ``format_budget(8) == "budget_r8"``."""
    return f"budget_r{int(r)}"


def format_top(k: int) -> str:
    """Key label of the top-``k`` directions: ``format_top(8) == "top8"``."""
    return f"top{int(k)}"


# --- parts ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class KeyParts:
    """One key split into its parts (see the module docstring for the grammar).

    ``scope`` is ``"global"`` (the whole model), ``"layer"`` (``group`` = ``layer_3``),
    ``"component"`` (``group`` = ``q_proj``) or ``"reference"`` (``group`` = the reference of an
    ``overlap`` family). ``label`` is the fragment after ``_at_`` (or ``top{k}``); ``variant``
    is ``"random"``, ``"dare"`` or None (the magnitude mask, or no mask at all).
    """

    family: str
    scope: Scope = "global"
    group: str | None = None
    name: str
    label: str | None = None
    variant: str | None = None

    @property
    def key(self) -> str:
        """The key these parts spell."""
        if self.scope == "global":
            prefix = f"{self.family}/"
        elif self.scope == "component":
            prefix = f"{self.family}/component/{self.group}/"
        else:
            prefix = f"{self.family}/{self.group}/"
        leaf = self.name
        if self.label is not None:
            leaf += f"_{self.label}" if _TOP.match(self.label) else f"_at_{self.label}"
        if self.variant is not None:
            leaf += f"_{self.variant}"
        return prefix + leaf

    @property
    def root(self) -> str:
        """The first segment of the family: ``drift`` for ``drift/sparse``."""
        return self.family.split("/", 1)[0]

    @property
    def label_kind(self) -> str | None:
        """``threshold``, ``keep``, ``budget``, ``rank``, ``top``, ``other`` or None."""
        label = self.label
        if label is None:
            return None
        if _THRESHOLD.match(label):
            return "threshold"
        if label.startswith("keep_") and _float(label[5:]) is not None:
            return "keep"
        for kind, pattern in (("budget", _BUDGET), ("rank", _RANK), ("top", _TOP)):
            if pattern.match(label):
                return kind
        return "other"

    @property
    def label_value(self) -> float | None:
        """The number in the label: the threshold, kept fraction, rank or k (None if none)."""
        kind, label = self.label_kind, self.label or ""
        if kind == "threshold":
            return float(label)
        if kind == "keep":
            return _float(label[5:])
        if kind in ("budget", "rank", "top"):
            return float(re.sub(r"\D", "", label))
        return None

    @property
    def layer_index(self) -> int | None:
        """``i`` of a layer group ``layer_{i}`` (or ``{trunk}.layer_{i}``), else None."""
        hit = _LAYER.match(self.group or "") if self.scope == "layer" else None
        return int(hit[1]) if hit else None

    def with_(self, **changes: str | None) -> KeyParts:
        """A copy with some parts replaced: ``parts.with_(variant="random")``."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def metric_key(
    family: str,
    name: str,
    *,
    label: str | None = None,
    variant: str | None = None,
    layer: str | None = None,
    component: str | None = None,
    reference: str | None = None,
) -> str:
    """The key of ``name`` in ``family``, optionally in one layer, component or reference group.

    ``label`` is a fragment from the ``format_*`` builders; ``variant`` is ``"random"`` or
    ``"dare"``. Parts that would not read back as themselves raise ``ValueError``.

    >>> metric_key("sparse", "kl", label=format_keep_ratio(0.1), variant="random")
    'sparse/kl_at_keep_0.1_random'
    >>> metric_key("lowrank", "energy", label=format_rank(8), component="q_proj")
    'lowrank/component/q_proj/energy_at_r8'
    >>> metric_key("principal", "energy_in", label=format_top(8))
    'principal/energy_in_top8'
    """
    groups = [(s, g) for s, g in (("layer", layer), ("component", component),
                                  ("reference", reference)) if g is not None]
    if len(groups) > 1:
        raise ValueError(f"a key has one scope; got {', '.join(s for s, _ in groups)}")
    scope, group = groups[0] if groups else ("global", None)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    parts = KeyParts(family=family, scope=scope, group=group, name=name,  # type: ignore[arg-type]
                     label=label, variant=variant)
    key = parts.key
    if parse_key(key) != parts:
        raise ValueError(f"the parts {parts} do not read back as themselves from {key!r}; "
                         "rename the part that holds '/', '_at_', a '_random'/'_dare' suffix, "
                         "or a layer group that is not 'layer_<i>'")
    return key


# --- reading ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8192)  # reports read the same few hundred keys many times
def parse_key(key: str) -> KeyParts | None:
    """The parts of ``key``, or None when it is outside the grammar.

    >>> parse_key("param_change/encoder.block.layer_2/sparsity_at_0e+00").layer_index
    2
    >>> parse_key("drift/overlap/sft/jaccard").scope
    'reference'
    >>> parse_key("loss") is None
    True
    """
    segments = key.split("/")
    if len(segments) < 2 or any(not s for s in segments):
        return None
    family, middle, leaf = [segments[0]], segments[1:-1], segments[-1]
    scope: Scope = "global"
    group: str | None = None
    for i, seg in enumerate(middle):
        left = len(middle) - i  # segments from here to the leaf, exclusive
        if seg == "component":
            if left != 2:
                return None
            scope, group = "component", middle[i + 1]
            break
        if _LAYER.match(seg) or family[-1] == _REFERENCE_FAMILY:
            if left != 1:
                return None
            scope, group = ("layer" if _LAYER.match(seg) else "reference"), seg
            break
        family.append(seg)
    hit = _LEAF.match(leaf)
    assert hit is not None  # the pattern matches every non-empty string
    label = hit["at"] if hit["at"] is not None else hit["top"]
    return KeyParts(family="/".join(family), scope=scope, group=group, name=hit["name"],
                    label=label, variant=hit["variant"])
