"""Headless Chromium for the report tests: load a page, collect console errors, dump the DOM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHECKER = """<script>
window.addEventListener('error', e => console.error('load error: ' +
  ((e.target && (e.target.src || '').slice(0, 40)) || e.message)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = 'decoded ' + ok + ' of ' + imgs.length;
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(
    chromium() is None,
    reason="chromium is not installed (CI installs it with apt-get install chromium; locally: "
    "the same, as root)",
)


def load(html: str, tmp_path: Path, name: str) -> tuple[str, list[str]]:
    """``(dumped DOM, console lines)`` of ``html`` loaded from a file in ``tmp_path``."""
    path = tmp_path / name
    path.write_text(html)
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]


def check_renders(html: str, tmp_path: Path) -> str:
    """Load ``html`` as it is and with :data:`CHECKER`: no console message, every image
    decodes. Returns the DOM of the unmodified page."""
    dom, console = load(html, tmp_path, "report.html")
    assert console == [], console
    checked, console = load(html.replace("<head>", "<head>" + CHECKER, 1), tmp_path,
                            "checked.html")
    assert console == [], console
    images = html.count("<img")
    assert f"<title>decoded {images} of {images}</title>" in checked, checked[:300]
    return dom
