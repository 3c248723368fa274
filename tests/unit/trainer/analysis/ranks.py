"""Start one worker process per rank and wait for all of them, failing instead of hanging."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    module: str, world: int, args_of: Callable[[int, int], list[str]], timeout: float, what: str
) -> list[tuple[int, str]]:
    """Run ``python -m module *args_of(rank, port)`` for every rank from the repository root;
    ``(return code, output)`` per rank. A run past ``timeout`` seconds is killed and fails the
    test with ``what`` in the message (a deadlock fails instead of stalling CI)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-m", module, *args_of(rank, port)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(world)
    ]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{what} timed out (deadlock?)")
    return [(p.returncode, log) for p, log in zip(procs, logs, strict=True)]
