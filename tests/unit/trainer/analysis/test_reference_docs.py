"""The metric reference in ``grail/trainer/analysis/README.md`` cannot drift from the code.

The README's tables are the data; this module knows no key of its own:

* the **placeholder** table maps ``{T}``, ``{c}``, ... to regular expressions;
* every table whose first column is headed **key** lists key patterns, one backticked span each,
  a ``†`` right after a span marking a key that appears only in special situations;
* the **histogram** table names the entries of ``analyzer.last_histograms``;
* the **metrics.json field** table names the top-level fields of ``grail-analysis diff``'s output.

A run with every option of :class:`AnalysisConfig` switched on (every boolean field ``True``,
threshold 0 added, keep ratios and histograms on) must emit exactly the documented keys: each key
matches a pattern, each pattern without ``†`` matches a key. A family added later is covered as
soon as its switch is a boolean field and its table is in the README.

Decisions: the run uses the manager, as a training loop does, so a computer that fails is caught
there; the test then fails on that warning instead of on the keys the computer did not emit.
Keys marked ``†`` cannot be produced here, so their fixed part must at least appear in the
package's source. The offline ``diff`` document is checked in one direction for its metrics
(they are a subset of the online keys) and both ways for its top-level fields. Links into the
reference (from both READMEs) must name existing headings and files.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

ROOT = Path(__file__).resolve().parents[4]
PACKAGE = ROOT / "grail" / "trainer" / "analysis"
REFERENCE = PACKAGE / "README.md"
DAGGER = "†"
SHOWN = 20  # keys listed in a failure message


# --- reading the README --------------------------------------------------------------------------
def split_row(line: str) -> list[str]:
    """Cells of a Markdown table row; ``\\|`` is a literal bar inside a cell."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """``(header, rows)`` of every table outside fenced code blocks."""
    out: list[tuple[list[str], list[list[str]]]] = []
    block: list[str] = []
    fenced = False
    for line in [*text.splitlines(), ""]:
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            out.append((split_row(block[0]), [split_row(r) for r in block[2:]]))
        block = []
    return out


def tables_headed(text: str, first: str) -> list[list[list[str]]]:
    """Rows of the tables whose first header cell is ``first`` (bold or not, any case)."""
    return [rows for header, rows in tables(text) if header[0].strip("*").lower() == first]


def placeholders(text: str) -> dict[str, str]:
    """``{"T": regex, ...}`` from the placeholder table (the column headed "... expression")."""
    found = tables_headed(text, "placeholder")
    assert len(found) == 1, "the reference needs exactly one table headed 'placeholder'"
    header = next(h for h, _ in tables(text) if h[0].strip("*").lower() == "placeholder")
    col = next(i for i, h in enumerate(header) if "expression" in h)
    out = {}
    for row in found[0]:
        name = re.fullmatch(r"`\{(\w+)\}`", row[0])
        assert name, f"placeholder cell {row[0]!r} is not of the form `{{X}}`"
        out[name.group(1)] = row[col].strip("`")
    return out


@dataclass(frozen=True)
class Pattern:
    """One documented key: its text, its compiled form, and whether it is situational."""

    text: str
    regex: re.Pattern[str]
    situational: bool

    def literal(self) -> str:
        """The longest fixed part of the pattern (``replicas_diverged`` of
        ``param_change/replicas_diverged``), for the source check of situational keys."""
        parts = re.split(r"\{\w+\}|/", self.text)
        return max(parts, key=len)


def compile_pattern(text: str, where: dict[str, str]) -> re.Pattern[str]:
    out = []
    for i, part in enumerate(re.split(r"\{(\w+)\}", text)):
        if i % 2 == 0:
            out.append(re.escape(part))
        elif part in where:
            out.append(f"(?:{where[part]})")
        else:
            raise AssertionError(
                f"key pattern {text!r} uses {{{part}}}, which the placeholder table does not "
                f"define (known: {', '.join('{' + k + '}' for k in where)}); add a row there"
            )
    return re.compile("".join(out))


def patterns(text: str, first: str = "key") -> list[Pattern]:
    """Every backticked span in the first column of the tables headed ``first``."""
    where = placeholders(text)
    out = []
    for rows in tables_headed(text, first):
        for row in rows:
            spans = list(re.finditer(r"`([^`]+)`(\s*" + DAGGER + ")?", row[0]))
            assert spans, f"a {first!r} row names no key: {row[0]!r}"
            for m in spans:
                key = m.group(1)
                assert "/" in key, f"{key!r} is not a full key (expected '<family>/<name>')"
                out.append(Pattern(key, compile_pattern(key, where), m.group(2) is not None))
    texts = [p.text for p in out]
    dups = sorted({t for t in texts if texts.count(t) > 1})
    assert not dups, f"documented twice: {dups}"
    return out


def undocumented(keys: set[str], documented: list[Pattern]) -> list[str]:
    return sorted(k for k in keys if not any(p.regex.fullmatch(k) for p in documented))


def never_emitted(documented: list[Pattern], keys: set[str]) -> list[str]:
    return [
        p.text
        for p in documented
        if not p.situational and not any(p.regex.fullmatch(k) for k in keys)
    ]


def _listing(items: list[str]) -> str:
    more = f" ... ({len(items)} in all)" if len(items) > SHOWN else ""
    return "\n  ".join(items[:SHOWN]) + more


def assert_documented(keys: set[str], documented: list[Pattern], what: str) -> None:
    missing = undocumented(keys, documented)
    assert not missing, (
        f"{what} emits keys that {REFERENCE.relative_to(ROOT)} does not document (add them to "
        f"the family's key table):\n  {_listing(missing)}"
    )


def assert_emitted(documented: list[Pattern], keys: set[str], what: str) -> None:
    stale = never_emitted(documented, keys)
    assert not stale, (
        f"{REFERENCE.relative_to(ROOT)} documents keys that {what} never emits (remove them, or "
        f"mark a key that needs a special situation with {DAGGER}):\n  {_listing(stale)}"
    )


# --- the checks themselves can fail ------------------------------------------------------------
SAMPLE = """
| placeholder | stands for | matches (regular expression) | example |
|---|---|---|---|
| `{T}` | threshold | `[0-9]e[+-][0-9]+` | `1e-06` |
| `{c}` | component | `[^/]+` | `q_proj` |

```
| key | ignored: inside a code block |
|---|---|
| `fam/not_a_key` | |
```

| key | definition |
|---|---|
| `fam/a`, `fam/b_at_{T}` | two keys, \\|x\\| in a cell |
| `fam/component/{c}/n` | per component |
| `fam/only_when_sharded` {dagger} | under a process group |
""".replace("{dagger}", DAGGER)


def test_sample_reference_is_parsed_with_placeholders_and_markers():
    pats = patterns(SAMPLE)
    assert [(p.text, p.situational) for p in pats] == [
        ("fam/a", False),
        ("fam/b_at_{T}", False),
        ("fam/component/{c}/n", False),
        ("fam/only_when_sharded", True),
    ]
    assert pats[1].regex.fullmatch("fam/b_at_1e-06")
    assert not pats[1].regex.fullmatch("fam/b_at_0.000001")  # {T} is strict
    assert pats[2].regex.fullmatch("fam/component/attn.c_proj/n")
    assert not pats[2].regex.fullmatch("fam/component/a/b/n")  # {c} is one path fragment
    assert pats[3].literal() == "only_when_sharded"


def test_comparison_fails_both_ways():
    pats = patterns(SAMPLE)
    keys = {"fam/a", "fam/b_at_1e-06", "fam/component/q_proj/n"}
    assert undocumented(keys, pats) == [] and never_emitted(pats, keys) == []
    assert undocumented(keys | {"fam/new"}, pats) == ["fam/new"]
    assert never_emitted(pats, keys - {"fam/a"}) == ["fam/a"]
    with pytest.raises(AssertionError, match="does not document"):
        assert_documented(keys | {"fam/new"}, pats, "the sample")
    with pytest.raises(AssertionError, match="never emits"):
        assert_emitted(pats, keys - {"fam/a"}, "the sample")


def test_unknown_placeholders_and_relative_keys_are_rejected():
    with pytest.raises(AssertionError, match=r"uses \{q\}"):
        patterns(SAMPLE + "| `fam/x_{q}` | |\n")
    with pytest.raises(AssertionError, match="not a full key"):
        patterns(SAMPLE + "| `norm_l2` | |\n")


# --- the real reference against a run with every option on -------------------------------------
def _everything_on() -> AnalysisConfig:
    switches = {
        f.name: True
        for f in dataclasses.fields(AnalysisConfig)
        if f.type in ("bool", bool) and f.name != "fused_kernels"  # execution, not keys
    }
    base = AnalysisConfig.comprehensive()
    return AnalysisConfig.comprehensive(
        **switches,
        interval=1,
        sparse_quality_thresholds=[0.0, *base.sparse_quality_thresholds],
        low_rank_ranks=[1, 4],
        histogram_samples=64,
    )


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def run():
    """Keys of two measurements, the histogram names, and the manager's warnings."""
    from tests.conftest import tiny_qwen2

    model = tiny_qwen2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    analyzer = ModelAnalysisManager.create(_everything_on())
    failures = _Failures()
    manager_log = logging.getLogger("grail.trainer.analysis.manager")
    manager_log.addHandler(failures)
    gen = torch.Generator().manual_seed(0)
    measurements = []
    try:
        for _ in range(3):  # snapshot at step 1, measurements at steps 2 and 3
            batch = {"input_ids": torch.randint(0, 128, (2, 12), generator=gen)}
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            metrics = analyzer.on_optimizer_step(model, inputs=batch, optimizer=optimizer)
            optimizer.zero_grad()
            if metrics:
                measurements.append(set(metrics))
    finally:
        manager_log.removeHandler(failures)
    return measurements, set(analyzer.last_histograms), failures.messages


@pytest.fixture(scope="module")
def reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


@pytest.mark.slow
def test_every_emitted_key_is_documented_and_every_documented_key_is_emitted(run, reference):
    measurements, _, failures = run
    assert not failures, f"the analysis logged warnings: {failures}"
    assert len(measurements) == 2
    assert measurements[0] == measurements[1], "keys changed from one measurement to the next"
    documented = patterns(reference)
    assert_documented(measurements[0], documented, "a run with every option on")
    assert_emitted(documented, measurements[0], "a run with every option on")


@pytest.mark.slow
def test_histogram_names_match_the_reference(run, reference):
    _, histograms, _ = run
    documented = patterns(reference, "histogram")
    assert histograms, "no histograms were recorded"
    assert_documented(histograms, documented, "analyzer.last_histograms")
    assert_emitted(documented, histograms, "analyzer.last_histograms")


def test_situational_keys_are_named_in_the_source(reference):
    source = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    for p in patterns(reference):
        if p.situational:
            assert p.literal() in source, (
                f"{p.text!r} is marked {DAGGER} but {p.literal()!r} appears nowhere in the package"
            )


@pytest.mark.slow
def test_offline_diff_document_matches_the_reference(tmp_path, reference):
    pytest.importorskip("tokenizers")
    from grail.trainer.analysis.offline.diff import DiffOptions, run_diff
    from tests.unit.trainer.analysis.checkpoints import save_pair

    _, _, base_dir, tuned_dir = save_pair(tmp_path, with_tokenizer=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the mat\na big red dog\n")
    doc = run_diff(DiffOptions(str(base_dir), str(tuned_dir), out=str(tmp_path / "out"),
                               prompts=str(prompts), ranks=[1, 4], hash_files=False,
                               progress=False))
    keys = set(doc["metrics"])
    assert {k.split("/")[0] for k in keys} >= {"param_change", "sparse", "lowrank"}
    assert_documented(keys, patterns(reference), "grail-analysis diff (metrics.json)")

    rows = [row for table in tables_headed(reference, "metrics.json field") for row in table]
    fields = [re.fullmatch(r"`([^`]+)`", row[0]) for row in rows]
    assert fields and all(fields), "the metrics.json table lists one backticked field per row"
    assert sorted(m.group(1) for m in fields) == sorted(doc), (
        "the metrics.json table of the reference and the fields of run_diff's document differ"
    )


# --- links into the reference -------------------------------------------------------------------
def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    out: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            name, n = base, 0
            while name in out:
                n += 1
                name = f"{base}-{n}"
            out.add(name)
    return out


@pytest.mark.parametrize("doc", ["README.md", "grail/trainer/analysis/README.md"])
def test_relative_links_name_existing_files_and_headings(doc):
    path = ROOT / doc
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{doc}: link {link!r} names a missing file"
        if anchor:
            assert anchor in anchors(file.read_text(encoding="utf-8")), (
                f"{doc}: link {link!r} names no heading of {file.relative_to(ROOT)}"
            )
