"""The live model during the analysis' own forward passes.

* :mod:`.forward` turns whatever the user passed into one forward pass and its output into logits.
* :mod:`.swaps` patches weights in place (masked updates, whole modules) and undoes every patch
  bit for bit, also when a forward raises.

May import :mod:`..core`, :mod:`..ops` and :mod:`..kernels`; never a metric.
"""
