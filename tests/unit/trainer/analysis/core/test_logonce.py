"""LogOnce: the one "log only the first time" helper."""

from __future__ import annotations

import logging

from grail.trainer.analysis.core.logonce import LogOnce

LOGGER = "tests.logonce"


def test_each_key_is_logged_once_at_its_level_with_the_suffix(caplog):
    once = LogOnce(logging.getLogger(LOGGER), suffix=" (not again)")
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert once.warning("disk", "cannot write %s", "a.jsonl") is True
        assert once.warning("disk", "cannot write %s", "b.jsonl") is False  # the key decides
        assert once.info(("skip", "x"), "skipping %d", 1) is True
        assert once.info(("skip", "y"), "skipping %d", 2) is True
        assert once.info(("skip", "x"), "skipping %d", 3) is False
    got = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        (logging.WARNING, "cannot write a.jsonl (not again)"),
        (logging.INFO, "skipping 1 (not again)"),
        (logging.INFO, "skipping 2 (not again)"),
    ]
    assert "disk" in once and ("skip", "z") not in once


def test_repeats_go_to_the_repeat_level_and_forget_starts_over(caplog):
    once = LogOnce(logging.getLogger(LOGGER), repeat_level=logging.DEBUG)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        once.warning("k", "first")
        once.warning("k", "again")
        once.forget()
        once.warning("k", "after forget")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "first"),
        (logging.DEBUG, "again"),
        (logging.WARNING, "after forget"),
    ]


def test_holders_do_not_share_what_they_have_said(caplog):
    a, b = LogOnce(logging.getLogger(LOGGER)), LogOnce(logging.getLogger(LOGGER))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        a.info("k", "from a")
        b.info("k", "from b")
    assert [r.getMessage() for r in caplog.records] == ["from a", "from b"]
