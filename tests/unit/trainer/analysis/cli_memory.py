"""Peak resident memory of one command-line run, measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from .memory_probe import SAMPLER

_PROBE = SAMPLER + textwrap.dedent(
    """
    import json, sys
    spec = json.loads(sys.argv[1])
    if spec["threads"]:
        import torch
        torch.set_num_threads(spec["threads"])
    from grail.trainer.analysis.cli import main

    assert main(spec["warm"]) == 0  # imports, allocators
    rc = []
    extra = measure(lambda: rc.append(main(spec["measured"])), every=0.001)
    print(json.dumps({"rc": rc[0], "extra": extra}))
    """
)

def cli_peak_rss(
    warm: list[str], measured: list[str], threads: int | None = None, timeout: float = 600
) -> dict[str, int]:
    """``{"rc", "extra"}``: ``main(measured)``'s return code and the growth of resident memory
    while it ran, in bytes, in a fresh process that ran ``main(warm)`` first (imports and
    allocators; a small input). ``threads`` sets torch's thread count first: memory does not
    depend on it, and one thread keeps an oversubscribed machine from stalling."""
    spec = json.dumps({"warm": warm, "measured": measured, "threads": threads})
    proc = subprocess.run([sys.executable, "-c", _PROBE, spec], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
