"""What a person reads: run logs read back, text summaries, plots and self-contained HTML.

* :mod:`.runlog` reads a JSONL run log and names the runs; :mod:`.series` turns runs into the
  series, panels and folded constants of the run report; :mod:`.headline` picks the headline
  numbers both reports open with; :mod:`.text` writes the summaries and captions in words;
  :mod:`.plots` draws the figures (matplotlib, imported lazily); :mod:`.page` holds the HTML
  blocks; :mod:`.runs` assembles the report of ``grail-analysis plot`` (one run or several) and
  :mod:`.html` the one of ``grail-analysis diff``, :mod:`.overlap` the one of ``grail-analysis
  overlap``.

Reads dictionaries of metrics only, and reads their keys only through :mod:`..keys`: imports
nothing from the computers or the model code (the one exception is the error type of
:mod:`..offline.checkpoint`, for one-line CLI errors).
"""
