"""Saved checkpoints compared without training: reading, pairing, the streaming diff and
the forward-pass quality of the tuned model.

* :mod:`.checkpoint` reads safetensors (single or sharded) and ``.pt`` files lazily.
* :mod:`.pair` checks that two checkpoints match and presents them as snapshot sides.
* :mod:`.stream` accumulates the per-cell statistics of the diff.
* :mod:`.diff` runs ``grail-analysis diff``; :mod:`.quality` its forward passes.
* :mod:`.overlap` runs ``grail-analysis overlap`` (several runs of one base, pair by pair), with
  the counts of :mod:`.overlap_counts`; :mod:`.mask` runs ``grail-analysis mask``;
  :mod:`.inputs` records the input files and their hashes.

May import :mod:`..core`, :mod:`..ops`, :mod:`..config` and :mod:`..metrics` (the same computers
as online).
"""
