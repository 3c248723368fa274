"""Command line: ``grail-analysis`` (also ``python -m grail.trainer.analysis``).

``grail-analysis diff BASE TUNED --out DIR`` compares two checkpoints with the online metric code
(:mod:`.offline.diff`) and writes ``DIR/metrics.json`` and ``DIR/report.html``;
``grail-analysis plot RUN.jsonl [RUN2.jsonl ...] --out DIR [--labels A B ...]`` writes
``DIR/report.html`` for training runs logged with ``JsonlSink``, several overlaid on shared axes
(labels default to the file names, made distinct).
``grail-analysis overlap BASE RUN_A RUN_B [...] --out DIR`` compares the changed sets of several
fine-tunes of one base (:mod:`.offline.overlap`) and writes ``DIR/metrics.json`` and
``DIR/report.html``; ``grail-analysis mask BASE TUNED --out MASK.safetensors (--threshold T |
--keep-ratio R | --bf16-view)`` saves one changed set as a bit-packed mask file
(:mod:`.offline.mask`).

Bad input ends with one line on stderr and exit status 1 (2 for a malformed command line), never
a traceback; ``--debug`` shows the traceback instead. Beyond unreadable inputs this covers an
empty ``--out`` (it would mean the current directory), a run log without any finite metric value
(the report would be empty), ``--labels`` that do not name each log once, and, with
``--prompts``, a tokenizer that encodes the prompts to nothing or to ids beyond the model's
embedding (``--tokenizer DIR`` takes it from elsewhere), ``overlap`` with fewer than two runs or
runs whose names or shapes differ from BASE, and ``mask`` without exactly one criterion.

Example:
    >>> main(["diff", "no/such/dir", "no/such/other", "--out", "unused"])
    1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

logger = logging.getLogger("grail.trainer.analysis.cli")


class _Failure(Exception):
    """An error reported to the user as one line."""


def _common() -> argparse.ArgumentParser:
    # accepted before or after the command; SUPPRESS keeps a later default from overwriting
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")
    return common


def _add_diff(sub: Any) -> None:
    from .offline.diff import DEFAULT_KEEP_RATIOS

    p = sub.add_parser(
        "diff",
        parents=[_common()],
        help="compare a base and a tuned checkpoint",
        description="Compare two checkpoints tensor by tensor (memory: a few tensors, not the "
        "model) and write DIR/metrics.json and DIR/report.html.",
    )
    p.add_argument("base", metavar="BASE", help="model directory or .safetensors/.pt file")
    p.add_argument("tuned", metavar="TUNED", help="model directory or .safetensors/.pt file")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--prompts", metavar="FILE",
                   help="one prompt per line: also measure sparse and low-rank output quality "
                   "(TUNED must be a transformers directory; its tokenizer encodes the prompts "
                   "unless --tokenizer is given)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="directory of the tokenizer for --prompts, when TUNED has none")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 1e-8, 1e-6, 1e-4],
                   metavar="T", help="|dW| thresholds (default: 0 1e-8 1e-6 1e-4)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128],
                   metavar="R", help="ranks of the low-rank and principal analyses (default: "
                   "1 2 4 ... 128)")
    p.add_argument("--keep-ratios", type=float, nargs="+", default=DEFAULT_KEEP_RATIOS,
                   metavar="K", help="kept fractions for sparse quality (default: "
                   + " ".join(f"{k:g}" for k in DEFAULT_KEEP_RATIOS) + ")")
    p.add_argument("--per-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="per-layer and per-component metrics and heatmaps (default: on)")
    p.add_argument("--low-rank", action=argparse.BooleanOptionalAction, default=True,
                   help="singular spectra of the weight-matrix updates (default: on; the "
                   "slowest part on CPU)")
    p.add_argument("--attribution", action=argparse.BooleanOptionalAction, default=True,
                   help="with --prompts: output attribution per component (and per layer with "
                   "--per-layer): KL with one group's update alone or dropped (default: on)")
    p.add_argument("--attribution-max-groups", type=int, default=16, metavar="N",
                   help="groups measured by attribution, the largest updates first; two "
                   "forwards each (default: 16)")
    p.add_argument("--principal", action=argparse.BooleanOptionalAction, default=True,
                   help="the update against the top-r singular directions of BASE, at the "
                   "--ranks (default: on; two decompositions per weight matrix)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="token positions compared in forward passes (default: 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-mask baseline")
    _add_outputs(p)


def _add_outputs(p: argparse.ArgumentParser) -> None:
    """The output switches of the commands that write metrics.json and report.html."""
    p.add_argument("--no-hash", dest="hash_files", action="store_false",
                   help="do not record SHA-256 hashes of the input files")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="write metrics.json only (no matplotlib needed)")


def _add_overlap(sub: Any) -> None:
    from .offline.diff import DEFAULT_KEEP_RATIOS

    p = sub.add_parser(
        "overlap",
        parents=[_common()],
        help="do several fine-tunes of one base change the same weights?",
        description="Compare the changed sets of several fine-tunes of BASE, pair by pair, "
        "against random sets of the same densities, and write DIR/metrics.json and "
        "DIR/report.html. Tensors are read one name at a time across all runs.",
    )
    p.add_argument("base", metavar="BASE", help="model directory or .safetensors/.pt file")
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more fine-tunes of BASE")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="one label per run (default: the file or directory names)")
    crit = p.add_mutually_exclusive_group()
    crit.add_argument("--threshold", type=float, metavar="T",
                      help="changed means |dW| > T (default: the stored value differs)")
    crit.add_argument("--bf16-view", action="store_true",
                      help="changed means the bf16-rounded value differs")
    p.add_argument("--keep-ratios", type=float, nargs="*", default=DEFAULT_KEEP_RATIOS,
                   metavar="R", help="fractions of the exact global top-k |dW| masks compared "
                   "(default: " + " ".join(f"{k:g}" for k in DEFAULT_KEEP_RATIOS)
                   + "; none: give the option without values)")
    p.add_argument("--per-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="per-layer and per-component metrics and heatmaps (default: on)")
    _add_outputs(p)


def _add_mask(sub: Any) -> None:
    p = sub.add_parser(
        "mask",
        parents=[_common()],
        help="save the changed set of a fine-tune as a bit-packed mask file",
        description="Write the entries that changed from BASE to TUNED as one bit-packed uint8 "
        "tensor per parameter (safetensors; the metadata records the criterion, the density, "
        "the shapes and the SHA-256 of the inputs). Read it with "
        "grail.trainer.analysis.load_mask.",
    )
    p.add_argument("base", metavar="BASE", help="model directory or .safetensors/.pt file")
    p.add_argument("tuned", metavar="TUNED", help="model directory or .safetensors/.pt file")
    p.add_argument("--out", required=True, metavar="MASK.safetensors", help="file to write")
    crit = p.add_mutually_exclusive_group()
    crit.add_argument("--threshold", type=float, metavar="T",
                      help="changed means |dW| > T (0: the stored value differs)")
    crit.add_argument("--keep-ratio", type=float, metavar="R",
                      help="the fraction R of entries with the largest |dW| (exact global top-k)")
    crit.add_argument("--bf16-view", action="store_true",
                      help="changed means the bf16-rounded value differs")
    p.add_argument("--no-hash", dest="hash_files", action="store_false",
                   help="do not record SHA-256 hashes of the input files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grail-analysis",
        description="Analyse how fine-tuning changed a model's weights.",
        parents=[_common()],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_diff(sub)
    _add_overlap(sub)
    _add_mask(sub)
    p = sub.add_parser(
        "plot",
        parents=[_common()],
        help="report of one training run, or several overlaid, logged as JSON lines",
        description="Write DIR/report.html for JSONL logs written by JsonlSink; several logs "
        "are overlaid on shared axes, one colour per run.",
    )
    p.add_argument("logs", nargs="+", metavar="RUN.jsonl", help="the log files")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="one legend label per log (default: the file names, made distinct)")
    return parser


def _out_dir(path: str) -> Path:
    if not path:  # Path("") is the current directory: an unset shell variable, most likely
        raise _Failure("--out is empty; give the directory to write to (e.g. --out report)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise _Failure(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _Failure(f"cannot create --out {out}: {err.strerror or err}") from None
    return out


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise _Failure(f"cannot write {path}: {err.strerror or err}") from None


def _diff(args: argparse.Namespace) -> int:
    from .offline.diff import DiffOptions, run_diff

    if args.report:
        from .report.plots import require_matplotlib

        require_matplotlib()  # fail before the work, not after it
    opts = DiffOptions(
        base=args.base, tuned=args.tuned, out=args.out, prompts=args.prompts,
        thresholds=args.thresholds, ranks=args.ranks, keep_ratios=args.keep_ratios,
        per_layer=args.per_layer, device=args.device, max_tokens=args.max_tokens,
        seed=args.seed, low_rank=args.low_rank, principal=args.principal,
        hash_files=args.hash_files, tokenizer=args.tokenizer, attribution=args.attribution,
        attribution_max_groups=args.attribution_max_groups,
    )  # fmt: skip
    out = _out_dir(args.out)
    result = run_diff(opts)
    if args.report:
        from .report.html import render_diff_report

        return _publish(out, result, render_diff_report)
    return _publish(out, result, None)


def _overlap(args: argparse.Namespace) -> int:
    from .offline.overlap import OverlapOptions, run_overlap

    if args.report:
        from .report.plots import require_matplotlib

        require_matplotlib()
    if len(args.runs) < 2:
        raise _Failure(f"overlap needs BASE and at least two runs; got {len(args.runs)} run")
    opts = OverlapOptions(
        base=args.base, runs=list(args.runs), out=args.out, labels=args.labels,
        threshold=args.threshold, bf16_view=args.bf16_view, keep_ratios=list(args.keep_ratios),
        per_layer=args.per_layer, hash_files=args.hash_files,
    )  # fmt: skip
    out = _out_dir(args.out)
    result = run_overlap(opts)
    if args.report:
        from .report.overlap import render_overlap_report

        return _publish(out, result, render_overlap_report)
    return _publish(out, result, None)


def _publish(
    out: Path, result: dict[str, Any], render: Callable[[dict[str, Any]], str] | None
) -> int:
    """Print the result's notes, write ``metrics.json`` (and ``report.html`` rendered by
    ``render``) in ``out``, and say what was written."""
    for note in result["notes"]:
        sys.stderr.write(f"grail-analysis: note: {note}\n")
    _write(out / "metrics.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
    written = [out / "metrics.json"]
    if render is not None:
        _write(out / "report.html", render(result))
        written.append(out / "report.html")
    sys.stdout.write("wrote " + " and ".join(str(p) for p in written) + "\n")
    return 0


def _mask(args: argparse.Namespace) -> int:
    from .offline.mask import MaskOptions, run_mask

    if not args.out:
        raise _Failure("--out is empty; give the file to write (e.g. --out mask.safetensors)")
    info = run_mask(MaskOptions(
        base=args.base, tuned=args.tuned, out=args.out, threshold=args.threshold,
        keep_ratio=args.keep_ratio, bf16_view=args.bf16_view, hash_files=args.hash_files,
    ))  # fmt: skip
    for note in info["notes"]:
        sys.stderr.write(f"grail-analysis: note: {note}\n")
    sys.stdout.write(f"wrote {info['path']}: {info['changed']:,} of {info['num_params']:,} "
                     f"entries changed ({info['density']:.4%}) in {info['tensors']} tensors\n")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .report.html import render_runs_report
    from .report.plots import require_matplotlib
    from .report.runlog import has_values, read_run_log, run_labels
    from .report.series import Run

    require_matplotlib()
    labels = run_labels(args.logs, args.labels)
    runs = []
    for path, label in zip(args.logs, labels, strict=True):
        records = read_run_log(path)
        if not records:
            raise _Failure(f"{path} holds no measurements")
        if not has_values(records):
            raise _Failure(f"{path} holds {len(records)} records but no metric values")
        runs.append(Run(label, str(path), records))
    out = _out_dir(args.out)
    _write(out / "report.html", render_runs_report(runs))
    sys.stdout.write(f"wrote {out / 'report.html'}\n")
    return 0


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"grail-analysis: error: {message}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its one-line usage error (or --help)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    args.verbose = getattr(args, "verbose", False)
    args.debug = getattr(args, "debug", False)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="grail-analysis: %(levelname)s: %(message)s",
                            level=logging.INFO if args.verbose else logging.WARNING)
    from .offline.checkpoint import CheckpointError

    commands = {"diff": _diff, "overlap": _overlap, "mask": _mask, "plot": _plot}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except (_Failure, CheckpointError, ImportError, ValueError, OSError) as err:
        if args.debug:
            raise
        return _fail(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
    except Exception as err:
        if args.debug:
            raise
        return _fail(f"unexpected {type(err).__name__}: {err} (rerun with --debug for the "
                     "traceback)".replace("\n", " "))


if __name__ == "__main__":
    sys.exit(main())
