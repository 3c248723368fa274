"""Start one worker process per rank and wait for all of them, failing instead of hanging."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import random
import runpy
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[4]


def join_group(rank: int, world: int, port: int) -> None:
    """Start a worker rank: one thread, and a gloo group on ``port`` when ``world > 1``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)


def parallelize(model: nn.Module, mode: str) -> nn.Module:
    """The module to train: ``model`` sharded in place with FSDP2 (each decoder layer, then the
    root) for ``"fsdp"``, wrapped in DDP for ``"ddp"``, itself otherwise."""
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    return model


def leave_group(world: int) -> None:
    """End a worker rank: meet the others, close the group, then leave the process without
    interpreter teardown. On gloo, torch 2.13 now and then aborts a DDP rank at exit ("terminate
    called without an active exception", about one exit in ten with the Adam family) after the
    group closed cleanly; every result is on disk by then, so the abort would fail a correct run."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A free port for a group's rendezvous, drawn below Linux's default ephemeral range
    (32768-60999): the port is closed again before rank 0 binds it, and a port the kernel
    hands out for outgoing connections (gloo makes many, also in a test running beside this
    one on another worker) could otherwise take it in between."""
    draw = random.Random(os.urandom(8))
    for _ in range(200):
        port = draw.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-32767")


#: What every rank imports anyway: loaded once in the fork server, so a rank starts in well
#: under a second instead of paying ~4 s of imports (most of a distributed test's time here).
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.nn.parallel",
    "transformers",
    "transformers.models.qwen2.modeling_qwen2",
    "grail.trainer.analysis",
    "tests.conftest",
    "tests.unit.trainer.analysis.ranks",
]


def _rank_main(target: str, args: list[Any], log: str) -> None:
    """A forked rank: output to ``log``, from the repository root, one OpenMP thread; then run
    ``target`` - ``"package.module"`` as ``python -m`` would with ``args`` as its command line,
    ``"package.module:function"`` as ``function(*args)``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(ROOT)
    os.environ["OMP_NUM_THREADS"] = "1"
    module, _, function = target.partition(":")
    if function:
        getattr(importlib.import_module(module), function)(*args)
        return
    sys.argv = [module, *map(str, args)]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_ranks(
    target: str, world: int, args_of: Callable[[int, int], list[Any]], timeout: float, what: str
) -> list[tuple[int, str]]:
    """Run ``target`` (see :func:`_rank_main`) with ``args_of(rank, port)`` in one process per
    rank; ``(exit code, output)`` per rank. The ranks are forked from a server that has already
    imported :data:`PRELOAD` (fresh interpreters otherwise, no state of the test process). A run
    past ``timeout`` seconds is killed and fails the test with ``what`` in the message (a
    deadlock fails instead of stalling CI)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp, f"rank{rank}.log") for rank in range(world)]
        for log in logs:
            log.touch()  # read back even if a rank dies before it writes
        procs = [ctx.Process(target=_rank_main, args=(target, args_of(rank, port), str(log)))
                 for rank, log in enumerate(logs)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):
            for p in procs:
                p.kill()
                p.join()
            pytest.fail(f"{what} timed out (deadlock?)")
        return [(p.exitcode, log.read_text()) for p, log in zip(procs, logs, strict=True)]
