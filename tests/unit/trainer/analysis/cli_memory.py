"""Peak resident memory of one command-line run, measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent(
    """
    import json, os, sys, threading, time
    spec = json.loads(sys.argv[1])
    if spec["threads"]:
        import torch
        torch.set_num_threads(spec["threads"])
    from grail.trainer.analysis.cli import main

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    assert main(spec["warm"]) == 0  # imports, allocators
    peak, stop = [rss()], threading.Event()
    start = peak[0]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    rc = main(spec["measured"])
    stop.set()
    t.join()
    print(json.dumps({"rc": rc, "extra": max(peak[0], rss()) - start}))
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
