"""Layer index and component of a parameter, derived from its dotted name alone.

No table of one model family: the rules use only the module tree that a parameter name spells
out, so the same code groups Llama/Qwen, GPT-2, T5, MoE models, PEFT wrappers, ``nn.Sequential``
stacks - and checkpoints read offline, where no module object exists.

* **Layer.** The first purely numeric component of the name is the index of a block inside a
  container of repeated blocks (``nn.ModuleList``/``nn.Sequential``), the *trunk*; the path before
  it names the trunk. ``model.layers.3.self_attn.q_proj.weight`` is layer 3 of trunk
  ``model.layers``. A model with one trunk (every decoder-only LM) gets groups ``layer_3``; with
  several (encoder-decoder), ``encoder.block.layer_3``. Parameters outside any trunk (embeddings,
  final norm, output head) belong to no layer.
* **Component.** The owning module's path relative to its block (or the full path outside
  trunks), with numeric parts such as expert indices removed, shortened to its shortest dotted
  suffix that is still unambiguous in this model: Qwen's ``self_attn.q_proj`` becomes ``q_proj``,
  while GPT-2's ``attn.c_proj`` and ``mlp.c_proj`` stay apart. A parameter owned directly by the
  block (an ``nn.Sequential`` of ``nn.Linear``) is grouped by its own attribute name (``weight``,
  ``bias``). An optional mapping renames components into coarser groups.

Example:
    >>> n = ParameterNaming(["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
    ...                      "model.layers.1.mlp.down_proj.weight", "lm_head.weight"])
    >>> name = "model.layers.1.mlp.down_proj.weight"
    >>> n.layer(name), n.component(name)
    ('layer_1', 'down_proj')
    >>> n.layer("lm_head.weight") is None, n.component("model.embed_tokens.weight")
    (True, 'embed_tokens')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["ParameterNaming", "group_prefix", "group_rows", "split_name"]


def split_name(name: str) -> tuple[str | None, int | None, str, str]:
    """``(trunk, index, relative_module_path, attribute)`` of a dotted parameter name.

    >>> split_name("transformer.h.3.attn.c_attn.weight")
    ('transformer.h', 3, 'attn.c_attn', 'weight')
    >>> split_name("lm_head.weight")
    (None, None, 'lm_head', 'weight')
    """
    parts = name.split(".")
    attr, mods = parts[-1], parts[:-1]
    for i, part in enumerate(mods):
        if part.isdigit():
            rel = [p for p in mods[i + 1 :] if not p.isdigit()]
            return ".".join(mods[:i]), int(part), ".".join(rel), attr
    return None, None, ".".join(p for p in mods if not p.isdigit()), attr


class ParameterNaming:
    """Layer and component groups for a fixed set of parameter names (see module docstring)."""

    def __init__(self, names: Iterable[str], component_map: Mapping[str, str] | None = None):
        self.names = list(names)
        self.component_map = dict(component_map or {})
        parsed = {n: split_name(n) for n in self.names}
        trunks = {t for t, _, _, _ in parsed.values() if t is not None}
        multi = len(trunks) > 1
        self._layer: dict[str, str | None] = {}
        for n, (trunk, idx, _, _) in parsed.items():
            if trunk is None:
                self._layer[n] = None
            elif multi:
                self._layer[n] = f"{trunk}.layer_{idx}" if trunk else f"layer_{idx}"
            else:
                self._layer[n] = f"layer_{idx}"
        paths = {rel for _, _, rel, _ in parsed.values() if rel}
        short = _shortest_unique_suffixes(paths)
        self._component: dict[str, str] = {}
        for n, (_, _, rel, attr) in parsed.items():
            comp = short[rel] if rel else attr
            self._component[n] = self.component_map.get(comp, comp)

    def layer(self, name: str) -> str | None:
        """``layer_{i}`` (or ``{trunk}.layer_{i}``) of a parameter, None outside any trunk."""
        return self._layer[name]

    def component(self, name: str) -> str:
        """Component group of a parameter, e.g. ``q_proj``, ``embed_tokens``, ``c_attn``."""
        return self._component[name]

    def layers(self) -> list[str]:
        """Distinct layer groups in order of first appearance."""
        return list(dict.fromkeys(v for v in self._layer.values() if v is not None))

    def components(self) -> list[str]:
        """Distinct component groups in order of first appearance."""
        return list(dict.fromkeys(self._component.values()))


def _shortest_unique_suffixes(paths: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    split = {p: p.split(".") for p in paths}
    for p, parts in split.items():
        for k in range(1, len(parts) + 1):
            suffix = parts[-k:]
            clash = any(q != p and len(qp) >= k and qp[-k:] == suffix for q, qp in split.items())
            if not clash:
                out[p] = ".".join(suffix)
                break
        else:  # p is itself a suffix of a longer path: keep it whole
            out[p] = p
    return out


def group_rows(
    naming: ParameterNaming, names: Sequence[str], per_layer: bool, components: bool
) -> tuple[list[str], dict[str, list[int]]]:
    """Accumulator groups (``"all"``, ``"layer/layer_3"``, ``"component/q_proj"``, ...) and, per
    parameter name, the rows of a :class:`~.stats.StreamingStats` it feeds.

    >>> n = ParameterNaming(["model.layers.0.mlp.up_proj.weight", "lm_head.weight"])
    >>> group_rows(n, n.names, per_layer=True, components=True)[0]
    ['all', 'layer/layer_0', 'component/up_proj', 'component/lm_head']
    """
    groups = ["all"]
    index: dict[str, int] = {}

    def row(group: str) -> int:
        if group not in index:
            index[group] = len(groups)
            groups.append(group)
        return index[group]

    rows: dict[str, list[int]] = {}
    for n in names:
        r = [0]
        layer = naming.layer(n)
        if per_layer and layer is not None:
            r.append(row(f"layer/{layer}"))
        if components:
            r.append(row(f"component/{naming.component(n)}"))
        rows[n] = r
    return groups, rows


def group_prefix(family: str, group: str) -> str:
    """Key prefix of a group: ``gradient/layer_3/``, ``gradient/component/q_proj/``."""
    kind, label = group.split("/", 1)
    return f"{family}/{label}/" if kind == "layer" else f"{family}/{group}/"
