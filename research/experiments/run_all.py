"""Run every experiment, write JSON results and figures, check the claims, write RESULTS.md.

    python research/experiments/run_all.py --quick    # about a minute on one CPU core (CI)
    python research/experiments/run_all.py            # full mode: the committed figures

Results go to ``--out`` (default ``research/experiments/results/``; quick mode
``research/experiments/results/quick/``): ``precision.json`` (experiments 1 and 3),
``masks.json`` (experiment 2), ``checks.json`` (every claim with the numbers it compared),
``run.json`` (settings, versions, runtime), the figures ``precision.png``, ``masks.png``,
``overlap.png``, one JSON file and one figure per experiment of :data:`EXTRA` (experiment 4:
``principal.json``, ``principal.png``; experiment 5: ``overlap_runs.json``,
``overlap_runs.png``) and ``RESULTS.md`` (full mode:
``research/experiments/RESULTS.md``, linking the figures). Exits with status 1 when a claim
fails. ``--from-results`` re-checks the claims and redraws figures and report from the JSON files
already in ``--out``, without training. Seeds are fixed and torch uses one thread, so a rerun on
the same machine reproduces every number.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import exp_checks  # noqa: E402
import exp_common  # noqa: E402
import exp_figures  # noqa: E402
import exp_masks  # noqa: E402
import exp_overlap  # noqa: E402
import exp_precision  # noqa: E402
import exp_principal  # noqa: E402
import exp_report  # noqa: E402

logger = logging.getLogger("experiments")

#: Experiments that bring their own ``NAME``, ``QUICK``/``FULL`` settings, ``run``, ``claims``,
#: ``figure`` and RESULTS.md ``section``; results in ``{NAME}.json`` and ``{NAME}.png``.
EXTRA = (exp_principal, exp_overlap)

QUICK = {
    "pretrain_steps": 200,
    "precision": exp_precision.PrecisionSettings(
        lrs=(1e-6, 1e-5, 1e-4, 1e-3), interval=10, intervals=3, overlap_lr=1e-5
    ),
    "masks": exp_masks.MaskSettings(sft_steps=60, sft_lr=3e-4, rl_steps=60, rl_lr=1e-4),
}
FULL = {
    "pretrain_steps": 400,
    "precision": exp_precision.PrecisionSettings(
        lrs=(1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3),
        interval=20,
        intervals=5,
        overlap_lr=1e-5,
    ),
    "masks": exp_masks.MaskSettings(sft_steps=150, sft_lr=3e-4, rl_steps=150, rl_lr=1e-4),
}


def _dump(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def experiment(
    settings: dict[str, Any], seed: int, mode: str
) -> tuple[dict, dict, dict, dict[str, Any]]:
    """Pre-train, run every experiment; ``(precision, masks, run_info, extras)``, JSON-ready."""
    torch.set_num_threads(1)  # reproducible reductions, and no stalls on a loaded machine
    start = time.perf_counter()
    pre_chain = exp_common.markov_chain(seed)
    sft_chain = exp_common.shifted_chain(pre_chain, seed + 1)
    base, losses = exp_common.pretrain(pre_chain, settings["pretrain_steps"], seed)
    logger.info("pre-trained %d parameters: loss %.3f -> %.3f (chain entropy %.3f)",
                exp_common.num_params(base), losses[0], losses[-1],
                exp_common.chain_entropy(pre_chain))
    t0 = time.perf_counter()
    precision = exp_precision.run(base, sft_chain, settings["precision"], seed + 2)
    t1 = time.perf_counter()
    masks = exp_masks.run(base, pre_chain, sft_chain, settings["masks"], seed + 3)
    t2 = time.perf_counter()
    extras, extra_seconds = {}, {}
    for mod in EXTRA:  # independent experiments: each draws from seed + 4
        t = time.perf_counter()
        mod_settings = mod.QUICK if mode == "quick" else mod.FULL
        extras[mod.NAME] = mod.run(base, pre_chain, sft_chain, mod_settings, seed + 4)
        extra_seconds[mod.NAME] = time.perf_counter() - t
    run_info = {
        "mode": mode,
        "seed": seed,
        "model": {**vars(exp_common.SETTINGS), "parameters": exp_common.num_params(base)},
        "pretrain": {
            "steps": settings["pretrain_steps"],
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "chain_entropy": exp_common.chain_entropy(pre_chain),
        },
        "seconds": {"pretrain": t0 - start, "precision": t1 - t0, "masks": t2 - t1,
                    **extra_seconds, "total": time.perf_counter() - start},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    return precision, masks, run_info, extras


def publish(out: str, report: str, precision: dict, masks: dict, run_info: dict,
            extras: dict[str, Any]) -> int:
    """Check the claims, write JSON, figures and the report; the number of failed claims."""
    claims = {
        "precision": exp_checks.precision_claims(precision),
        "overlap": exp_checks.overlap_claims(precision),
        "masks": exp_checks.mask_claims(masks),
    }
    for mod in EXTRA:
        claims[mod.NAME] = mod.claims(extras[mod.NAME])
        _dump(extras[mod.NAME], os.path.join(out, f"{mod.NAME}.json"))
        mod.figure(extras[mod.NAME], os.path.join(out, f"{mod.NAME}.png"))
    _dump(precision, os.path.join(out, "precision.json"))
    _dump(masks, os.path.join(out, "masks.json"))
    _dump(run_info, os.path.join(out, "run.json"))
    _dump({k: [c.as_dict() for c in v] for k, v in claims.items()},
          os.path.join(out, "checks.json"))
    exp_figures.precision_figure(precision, os.path.join(out, "precision.png"))
    exp_figures.masks_figure(masks, os.path.join(out, "masks.png"))
    exp_figures.overlap_figure(precision, os.path.join(out, "overlap.png"))
    exp_report.write(report, out, run_info, precision, masks, claims,
                     [(mod, extras[mod.NAME]) for mod in EXTRA])
    failed = 0
    print("\nClaims:")
    for group in claims.values():
        for c in group:
            failed += not c.passed
            print(f"  [{'PASS' if c.passed else 'FAIL'}] {c.text} ({c.detail})")
    print(f"\n{sum(map(len, claims.values())) - failed} passed, {failed} failed; experiments "
          f"took {run_info['seconds']['total']:.0f} s; results in {out}, report {report}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (CI smoke test)")
    parser.add_argument("--out", default=None, help="directory for JSON results and figures")
    parser.add_argument("--report", default=None, help="path of the generated RESULTS.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-results", action="store_true",
                        help="re-check and redraw from the JSON files in --out without training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("grail").setLevel(logging.WARNING)
    for name in ("exp_precision", "exp_masks", *(mod.__name__ for mod in EXTRA)):
        logging.getLogger(name).setLevel(logging.INFO)

    out = args.out or os.path.join(HERE, "results", "quick" if args.quick else "")
    os.makedirs(out, exist_ok=True)
    report = args.report or (
        os.path.join(out, "RESULTS.md") if args.quick else os.path.join(HERE, "RESULTS.md")
    )
    if args.from_results:
        loaded = []
        for name in ("precision", "masks", "run"):
            with open(os.path.join(out, f"{name}.json")) as f:
                loaded.append(json.load(f))
        precision, masks, run_info = loaded
        extras = {}
        for mod in EXTRA:
            with open(os.path.join(out, f"{mod.NAME}.json")) as f:
                extras[mod.NAME] = json.load(f)
    else:
        settings = QUICK if args.quick else FULL
        mode = "quick" if args.quick else "full"
        precision, masks, run_info, extras = experiment(settings, args.seed, mode)
    return 1 if publish(out, report, precision, masks, run_info, extras) else 0


if __name__ == "__main__":
    sys.exit(main())
