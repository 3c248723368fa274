"""Pure tensor functions: masks, exact budget selection, divergences of logits, spectra.

No module here holds state across calls or touches a model; each takes tensors (or a
``ParameterDelta`` to read) and returns tensors or numbers. May import :mod:`..core` and the
compiled fast paths of :mod:`..kernels`.
"""
