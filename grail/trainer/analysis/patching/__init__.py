"""The live model during the analysis' own forward passes.

* :mod:`.forward` turns whatever the user passed into one forward pass and its output into logits.
* :mod:`.swaps` patches weights in place (masked updates) and undoes every patch bit for bit,
  also when a forward raises, from the per-chunk steps of :mod:`.swap_steps` (masks, XOR swaps,
  compiled slices, the records the undo reads); :mod:`.module_patch` writes arbitrary values
  per module (DARE, low-rank truncations); :mod:`.exchange` exchanges whole tensors with the
  snapshot (attribution).

May import :mod:`..core`, :mod:`..ops` and :mod:`..kernels`; never a metric.
"""
