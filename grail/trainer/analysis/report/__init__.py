"""What a person reads: run logs read back, text summaries, plots and self-contained HTML.

* :mod:`.runlog` reads a JSONL run log; :mod:`.text` writes the summaries in words;
  :mod:`.plots` draws the figures (matplotlib, imported lazily); :mod:`.html` assembles the
  reports of ``grail-analysis plot`` and ``grail-analysis diff``.

Reads dictionaries of metrics only: imports nothing from the computers or the model code
(the one exception is the error type of :mod:`..offline.checkpoint`, for one-line CLI errors).
"""
