"""Pure tensor functions: masks, exact budget selection, divergences of logits, spectra, and
the geometry of an update against the principal directions of the weights.

No module here holds state across calls or touches a model; each takes tensors (or a
``ParameterDelta`` to read) and returns tensors or numbers (a container kept across calls, such
as the principal factor cache, is owned and passed in by its caller). Where a result is a sum
over ranks (exact top-k selection, ``Comparisons``, sharded spectra) the function issues the
collective through :mod:`..core.distributed`, the same on every rank. May import :mod:`..core`
and the compiled fast paths of :mod:`..kernels`.
"""
