"""Start one worker process per rank and wait for all of them, failing instead of hanging."""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
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


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections (Linux; 32768 when the
    range cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port for a group's rendezvous, drawn below the kernel's ephemeral range: the port
    is closed again before rank 0 binds it, and a port the kernel hands out for outgoing
    connections (gloo makes many, also in a test running beside this one on another worker)
    could otherwise take it in between. A system whose ephemeral range starts low gets a port
    from the kernel (the race stays possible there)."""
    low = _ephemeral_low()
    if low < 12000:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    draw = random.Random(os.urandom(8))
    for _ in range(200):
        port = draw.randrange(low - 10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low - 10000}-{low - 1}")


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

#: Seconds the other ranks get to finish once one rank has failed (they are usually blocked in a
#: collective the failed rank will never join) before they are killed.
GRACE = 20.0


def _rank_main(target: str, args: list[Any], env: dict[str, str], log: str) -> None:
    """A forked rank: the test process's environment as of this call (``env``), output to
    ``log``, the repository root as working directory, one torch thread; then ``target`` -
    ``"package.module"`` run as ``python -m`` would with ``args`` as its command line,
    ``"package.module:function"`` called as ``function(*args)``."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(ROOT)
    torch.set_num_threads(1)  # OMP_NUM_THREADS in env reaches only processes a rank starts
    module, _, function = target.partition(":")
    if function:
        sys.argv = [target]
        getattr(importlib.import_module(module), function)(*args)
        return
    sys.argv = [module, *map(str, args)]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_ranks(
    target: str, world: int, args_of: Callable[[int, int], list[Any]], timeout: float, what: str
) -> list[tuple[int, str]]:
    """Run ``target`` (see :func:`_rank_main`) with ``args_of(rank, port)`` in one process per
    rank; ``(exit code, output)`` per rank. The ranks are forked from a server that has already
    imported :data:`PRELOAD` (fresh interpreters otherwise: no state of the test process but its
    environment). The test fails, with every rank's last output, when a run passes ``timeout``
    seconds (a deadlock fails instead of stalling CI) or when a rank fails and the others do not
    end within :data:`GRACE` seconds (they wait for it in a collective)."""
    if str(ROOT) not in sys.path:  # the server and the ranks import the tests package
        sys.path.insert(0, str(ROOT))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp, f"rank{rank}.log") for rank in range(world)]
        for log in logs:
            log.touch()  # read back even if a rank dies before it writes
        procs = [ctx.Process(target=_rank_main, args=(target, args_of(rank, port), env, str(log)))
                 for rank, log in enumerate(logs)]
        for p in procs:
            p.start()
        stuck = _wait(procs, time.monotonic() + timeout)
        outputs = [log.read_text() for log in logs]
    if stuck:
        tails = "\n".join(f"--- rank {r} (exit {p.exitcode}):\n{out[-2000:]}"
                          for r, (p, out) in enumerate(zip(procs, outputs, strict=True)))
        pytest.fail(f"{what}: {stuck}\n{tails}")
    return [(p.exitcode, out) for p, out in zip(procs, outputs, strict=True)]


def _wait(procs: list[Any], deadline: float) -> str:
    """Wait for every process; kill all at ``deadline``, or the rest :data:`GRACE` seconds
    after one exits with an error. ``""`` when all ended by themselves, else why they did not."""
    failed_at = None
    while True:
        alive = [p for p in procs if p.exitcode is None]
        if not alive:
            return ""
        now = time.monotonic()
        if failed_at is None and any(p.exitcode for p in procs):
            failed_at = now
        end = deadline if failed_at is None else min(deadline, failed_at + GRACE)
        if now >= end:
            for p in alive:
                p.kill()
                p.join()
            if failed_at is None:
                return "timed out (deadlock?)"
            return f"a rank failed and the others did not end within {GRACE:.0f} s (killed)"
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=end - now)
