"""Shared helpers of the benchmark scripts: the model, a simulated update, timing, peak RSS.

Numbers are ratios measured side by side in one process: absolute times on a shared machine
mean little.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from typing import Any

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def qwen2(
    hidden: int = 512,
    layers: int = 8,
    vocab: int = 32000,
    intermediate: int | None = None,
    heads: int = 8,
    kv_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    """A random-init Qwen2-style causal LM (hidden 512, 8 layers, vocab 32000: ~58M params)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


@torch.no_grad()
def simulate_update(model: torch.nn.Module, scale: float = 1e-5, seed: int = 1) -> None:
    """Add N(0, scale^2) noise to every weight (in the weight's dtype: bf16 rounds most away)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen).to(p.device)
        p.add_((noise * scale).to(p.dtype))


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The device, model-size and dtype flags the benchmark scripts share (defaults: 58M)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    return parser


def add_batch_args(parser: argparse.ArgumentParser, repeat: int = 5) -> argparse.ArgumentParser:
    """The probe batch (4 x 128 by default) and the number of timed pairs."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=repeat, help="timed pairs (median ratio)")
    return parser


def print_dtype_rows(run: Callable[[torch.dtype, argparse.Namespace], dict[str, Any]],
                     args: argparse.Namespace) -> None:
    """``run`` once per ``--dtypes`` entry, then the machine line and one table."""
    rows = [run(getattr(torch, d), args) for d in args.dtypes.split(",")]
    print(f"device: {args.device}  threads: {torch.get_num_threads()}")
    print(table(rows))


def model_from_args(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    return qwen2(
        args.hidden,
        args.layers,
        args.vocab,
        args.intermediate,
        args.heads,
        args.kv_heads,
        dtype=dtype,
        device=args.device,
    )


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def best_of(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``repeat`` calls after ``warmup`` calls (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(
    fn: Callable[[], Any], base: Callable[[], Any], repeat: int = 5, warmup: int = 1
) -> tuple[float, float, float]:
    """``(median time of fn, median time of base, median of the per-pair ratios)``, the two
    timed alternately so that drifts in machine speed hit both alike."""
    for _ in range(warmup):
        base()
        fn()
    t_fn, t_base = [], []
    for _ in range(repeat):
        t_base.append(best_of(base, repeat=1, warmup=0))
        t_fn.append(best_of(fn, repeat=1, warmup=0))
    ratios = [a / b for a, b in zip(t_fn, t_base, strict=True)]
    return statistics.median(t_fn), statistics.median(t_base), statistics.median(ratios)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing), so
    that RSS counts live memory: otherwise a block may reuse memory freed before it and look
    free of cost."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


#: glibc's setting that serves every allocation above it from its own mapping, returned to the
#: OS when freed (fixed, so glibc does not raise it as it goes): RSS then follows live memory.
LIVE_HEAP_ENV = ("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))


def reexec_with_live_heap() -> None:
    """Restart this script with :data:`LIVE_HEAP_ENV` set (glibc reads it at process start)
    unless it already is: peak RSS is then the peak of live memory, the analogue of CUDA's
    ``max_memory_allocated``, instead of including freed blocks the allocator kept. Exits with a
    message where the C library is not glibc (the setting would do nothing)."""
    if platform.libc_ver()[0] != "glibc":
        raise SystemExit("live memory needs glibc (MALLOC_MMAP_THRESHOLD_)")
    name, value = LIVE_HEAP_ENV
    if os.environ.get(name) != value:
        os.execve(sys.executable, list(sys.orig_argv), {**os.environ, name: value})


def _reset_peak_rss() -> bool:
    """Reset the kernel's record of this process's peak RSS (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


@contextmanager
def peak_rss(trim: bool = False, exact: bool = False):
    """Yields a dict whose ``"extra"`` is the peak RSS above the RSS at entry, in bytes;
    ``trim``: the RSS at entry after :func:`trim_heap`; ``exact``: the kernel's own peak
    (reset at entry, Linux) instead of sampling every 0.5 ms, which can miss a short peak."""
    out = {"extra": 0}
    if trim:
        trim_heap()
    if exact and _reset_peak_rss():
        base = current_rss()
        try:
            yield out
        finally:
            out["extra"] = max(0, _peak_rss_since_reset() - base)
        return
    base = current_rss()
    stop = threading.Event()
    peak = [base]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], current_rss())
        out["extra"] = peak[0] - base


@contextmanager
def peak_memory(device: str, trim: bool = False, exact: bool = False):
    """Peak extra memory of the block: host RSS on CPU (``trim``, ``exact``: see
    :func:`peak_rss`), allocated GPU memory on CUDA."""
    if not str(device).startswith("cuda"):
        with peak_rss(trim, exact) as out:
            yield out
        return
    out = {"extra": 0}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        torch.cuda.synchronize()
        out["extra"] = torch.cuda.max_memory_allocated() - base


def table(rows: list[dict[str, Any]]) -> str:
    """A small Markdown table."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return "\n".join(lines)
