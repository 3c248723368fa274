"""The foundation: parameter snapshots and deltas, streaming statistics, naming, collectives.

* :mod:`.snapshot` is the only place parameters are copied (``ParameterSnapshot``); :mod:`.delta`
  diffs two snapshots (``ParameterDelta``, streamed tensor by tensor).
* :mod:`.stats` accumulates sums, counts and extremes in float64 and reduces them once.
* :mod:`.layout` names the columns of those rows (and of the compiled kernels' raw rows): the
  only place column indices are known.
* :mod:`.scratch` is the one cache of reused temporary buffers (per device, dtype and slot).
* :mod:`.naming` derives layer and component groups from parameter names.
* :mod:`.distributed` is the only module that issues collectives (DDP, FSDP2, DeepSpeed).
* :mod:`.engines` recognises the wrappers and sharding engines around a model (the module to
  run forwards through, FSDP2's units and resharding, setups that cannot be analysed).
* :mod:`.zero` reads DeepSpeed ZeRO's partitions of parameters, gradients and optimizer state
  from the attributes DeepSpeed sets (no ``deepspeed`` import at module level, no collective).
* :mod:`.logonce` is the one "log only the first time" helper (:class:`~.logonce.LogOnce`).
* :mod:`.bits` stores sets of entries one bit each; :mod:`.mask_file` saves changed sets to disk
  (the criterion, the format, a streaming writer, a lazy reader).

Knows no metric. Imports nothing from the rest of the package except ``ops.masks`` (the hashed
masks of ``ParameterDelta.apply_sparse_mask``), imported where it is used.
"""
