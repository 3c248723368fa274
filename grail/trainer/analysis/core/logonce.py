"""Say something once: the one "log only the first time" helper of the package.

The analysis runs every few hundred steps for days; a condition that holds at one measurement
(no batch, a failing backend, a computer that raises) usually holds at every one. Each holder
(the manager, a computer, a sink, a callback) keeps one :class:`LogOnce` and logs through it,
keyed by what the message is about: the first occurrence of a key is logged at the level asked
for, later ones are dropped (or, with ``repeat_level``, logged at that level, e.g. DEBUG, so
they can still be seen when asked for).

Decisions where the design is silent:

* Keys are any hashable value; a tuple such as ``("collision", "a", "b")`` keeps unrelated
  messages of one holder apart. The key, not the text, decides: the same key with other
  arguments is not logged again.
* ``suffix`` is appended to the first (and only) message, e.g. " (not logged again)", so
  the reader knows why it will not see it repeated.
* The seen keys live as long as the holder; :meth:`LogOnce.forget` starts over.

Example:
    >>> import logging
    >>> once = LogOnce(logging.getLogger("demo"), suffix=" (not logged again)")
    >>> once.warning("disk", "cannot write %s", "run.jsonl")  # logged
    True
    >>> once.warning("disk", "cannot write %s", "run.jsonl")  # dropped
    False
    >>> "disk" in once, "other" in once
    (True, False)
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

__all__ = ["LogOnce"]


class LogOnce:
    """Log each key's first message through ``logger`` (see module docstring).

    Args:
        logger: where messages go (the holder's ``logging.getLogger(__name__)``).
        suffix: appended to every message that is logged at its first occurrence.
        repeat_level: the level of later occurrences of a key; ``None`` drops them.
    """

    def __init__(
        self, logger: logging.Logger, *, suffix: str = "", repeat_level: int | None = None
    ) -> None:
        self.logger = logger
        self.suffix = suffix
        self.repeat_level = repeat_level
        self._seen: set[Hashable] = set()

    def log(self, level: int, key: Hashable, message: str, *args: Any) -> bool:
        """Log ``message % args`` at ``level`` if ``key`` is new; ``True`` when it was logged
        at ``level`` (``False``: seen before, dropped or logged at ``repeat_level``)."""
        if key in self._seen:
            if self.repeat_level is not None:
                self.logger.log(self.repeat_level, message, *args)
            return False
        self._seen.add(key)
        self.logger.log(level, message + self.suffix, *args)
        return True

    def warning(self, key: Hashable, message: str, *args: Any) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, key, message, *args)

    def info(self, key: Hashable, message: str, *args: Any) -> bool:
        """:meth:`log` at INFO."""
        return self.log(logging.INFO, key, message, *args)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def forget(self) -> None:
        """Log every key again at its next occurrence."""
        self._seen.clear()

    def __repr__(self) -> str:
        return f"LogOnce({self.logger.name!r}, {len(self._seen)} keys seen)"
