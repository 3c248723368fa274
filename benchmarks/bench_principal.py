"""Cost of the principal/* family against the low-rank family's spectra on the same update.

The model is the 58M-parameter Qwen2-style model of ``_common.py`` (fp32), the update dense
Gaussian noise (``simulate_update``). The reference is the low-rank computer without inputs
(spectra only: one decomposition of every 2-D update, ranks 1/8/64). Each case is timed
alternately with it and the ratio is the median of the per-pair ratios (``paired``), so drifts
in machine speed hit both alike.

Cases:

* **interval, first measurement**: an empty factor cache - W_old and W_new are decomposed;
* **interval, steady state**: the cache holds W_old's factors, as it does after every earlier
  measurement (the snapshot advanced to the weights decomposed then); two deltas that swap
  W_old and W_new alternate, so every call hits and leaves the next call's reference behind;
* **fixed base (drift view)**: a ``tracks="reference"`` cache holding the base's factors;
* **no cache** (``principal_cache_factors=False``, the offline diff): both every time;
* **live weights**: one measurement's interval view alone, and the interval and drift views
  together, which share the factors of the live weights (each reference cached): the drift
  view's own cost is the difference.

``--breakdown`` also times the parts of one steady-state call (decomposition of W_new,
fingerprints, geometry and the assembly copies).

    python benchmarks/bench_principal.py [--device cuda] [--repeat 5] [--threads 2] [--breakdown]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import paired, qwen2, simulate_update, table

from grail.trainer.analysis.config import AnalysisConfig
from grail.trainer.analysis.core.snapshot import ParameterDelta, ParameterSnapshot
from grail.trainer.analysis.metrics import principal as principal_module
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.low_rank import LowRankMetrics
from grail.trainer.analysis.metrics.principal import PrincipalMetrics
from grail.trainer.analysis.ops import sharded_principal
from grail.trainer.analysis.ops.principal import FactorCache


def _timed(module: object, name: str, totals: dict[str, float]) -> None:
    real = getattr(module, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = real(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        totals[name] += time.perf_counter() - start
        return out

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)

    model = qwen2(device=dev)
    n_params = sum(p.numel() for p in model.parameters())
    old = ParameterSnapshot(model, device=dev)
    simulate_update(model)
    new = ParameterSnapshot(model, device=dev)  # a copy, so W_old and W_new can swap roles
    forward, backward = ParameterDelta(old, new), ParameterDelta(new, old)
    context = AnalysisContext(model=model, step=1)
    cfg = AnalysisConfig.comprehensive(low_rank_track_components=False,
                                       principal_track_components=False)
    low_rank = LowRankMetrics.from_config(cfg)

    def spectra() -> None:  # the reference: the low-rank family without inputs
        low_rank.compute(forward, context=context)

    def first() -> None:
        PrincipalMetrics.from_config(cfg).compute(forward, context=context)

    steady_computer = PrincipalMetrics.from_config(cfg)
    steady_computer.compute(backward, context=context)  # leaves W_old's factors in the cache
    turn = [0]

    def steady() -> None:
        delta = forward if turn[0] % 2 == 0 else backward
        turn[0] += 1
        steady_computer.compute(delta, context=context)

    drift_computer = PrincipalMetrics.from_config(cfg)
    base_cache = FactorCache("cpu", tracks="reference")
    drift_computer.measure(forward, model, cache=base_cache)  # the base's factors, once

    def drift() -> None:
        drift_computer.measure(forward, model, cache=base_cache, prefix="drift/principal")

    # both views of one measurement on the live weights (interval from `prev`, drift from the
    # base `old`), each reference cached: W_now is decomposed once and shared through the context
    prev = ParameterSnapshot(model, device=dev)  # the steady case's W_new: the interval's W_old
    simulate_update(model, seed=2)
    live = ParameterSnapshot.live(model)
    interval_delta, base_delta = ParameterDelta(prev, live), ParameterDelta(old, live)
    interval_cache = FactorCache("cpu", tracks="reference")
    both_computer = PrincipalMetrics.from_config(cfg)
    both_computer.measure(interval_delta, model, cache=interval_cache)
    both_computer.measure(base_delta, model, cache=base_cache)

    def interval_only() -> None:
        both_computer.measure(interval_delta, model, cache=interval_cache,
                              context=AnalysisContext(model=model, step=2))

    def both_views() -> None:
        ctx = AnalysisContext(model=model, step=2)
        both_computer.measure(interval_delta, model, cache=interval_cache, context=ctx)
        both_computer.measure(base_delta, model, cache=base_cache, prefix="drift/principal",
                              context=ctx)

    uncached = PrincipalMetrics.from_config(dataclasses.replace(cfg, principal_cache_factors=False))

    def no_cache() -> None:
        uncached.compute(forward, context=context)

    cases = {
        "principal, interval view, first measurement (empty cache)": first,
        "principal, interval view, steady state (cache hit)": steady,
        "principal, fixed base / drift view (base cached)": drift,
        "principal, no cache (offline diff)": no_cache,
        "live weights: interval view alone (reference cached)": interval_only,
        "live weights: interval + drift views, W_now shared": both_views,
    }
    rows = []
    t_ref = None
    for name, fn in cases.items():
        t, t_ref, ratio = paired(fn, spectra, repeat=args.repeat)
        rows.append({"what": name, "seconds": f"{t:.3f}", "vs low-rank spectra": f"{ratio:.2f}x"})
    rows.insert(0, {"what": "low-rank spectra (reference)", "seconds": f"{t_ref:.3f}",
                    "vs low-rank spectra": "1.00x"})
    if dev.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    matrices = int(low_rank.compute(forward, context=context)["lowrank/num_matrices"])
    print(f"Qwen2-style model, {n_params / 1e6:.1f}M parameters, fp32, {matrices} matrices, "
          f"ranks 1/8/64, {name}; factor cache {steady_computer.cache.nbytes() / 2**20:.1f} MiB")
    print(table(rows))

    if args.breakdown:
        totals: dict[str, float] = defaultdict(float)
        _timed(principal_module, "top_factors", totals)
        _timed(sharded_principal, "fingerprint", totals)
        _timed(sharded_principal, "principal_geometry", totals)
        _timed(sharded_principal, "_assemble", totals)
        runs = args.repeat
        start = time.perf_counter()
        for _ in range(runs):
            steady()
        total = (time.perf_counter() - start) / runs
        parts = [{"part": k, "seconds": f"{v / runs:.3f}", "share": f"{v / runs / total:.0%}"}
                 for k, v in totals.items()]
        parts.append({"part": "whole steady-state call", "seconds": f"{total:.3f}",
                      "share": "100%"})
        print()
        print(table(parts))


if __name__ == "__main__":
    main()
