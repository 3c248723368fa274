"""Peak resident memory of analysis code, measured in a fresh subprocess on one ~19M-parameter
Qwen2 (hidden 256, 4 layers, vocab 32000, untied head) and a 2 x 32 token batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

#: Script text defining ``rss()`` and ``measure(fn, every=0.0002)``: the peak growth of
#: resident memory while ``fn()`` runs, sampled from a thread every ``every`` seconds.
SAMPLER = textwrap.dedent(
    """
    import os, threading, time

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def measure(fn, every=0.0002):
        peak, stop = [rss()], threading.Event()
        base = peak[0]
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(every)
        t = threading.Thread(target=sample); t.start()
        fn()
        stop.set(); t.join()
        return max(peak[0], rss()) - base
    """
)

#: What every probe starts with: ``model``, ``ids`` and the :data:`SAMPLER`.
PRELUDE = textwrap.dedent(
    """
    import json, torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=32000,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 32000, (2, 32))
    """
) + SAMPLER


def run_probe(body: str, timeout: float = 600) -> dict:
    """Run :data:`PRELUDE` and then ``body`` (which prints one JSON line last) in a fresh
    process; the printed object. A fixed mmap threshold stops glibc from keeping freed blocks
    in the heap, so RSS tracks live allocations instead of allocator history."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
