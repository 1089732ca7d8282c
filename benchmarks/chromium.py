"""Headless Chromium for the search report: a PNG of a page for the docs (benchmarks/search.py
--screenshot) and the flags the report's browser test starts Chromium with. Outside the
library: torchslim itself never starts a browser."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from torchslim.core.files import write_atomic
from torchslim.errors import TorchslimError

CHROMIUM = "/usr/bin/chromium"
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
    "--disable-dev-shm-usage",
)


def find_chromium() -> str | None:
    """The Chromium binary: ``chromium`` on the PATH, else ``/usr/bin/chromium``, else None."""
    found = shutil.which("chromium")
    return found or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)


def screenshot(html_path: str | Path, png_path: str | Path, size: tuple[int, int] = (1280, 2400)) -> Path:
    """Render ``html_path`` in headless Chromium and write a ``size`` PNG of it to ``png_path``.

    Chromium runs with a throwaway profile and HOME, so it writes nothing outside a temp dir.

    Example:
        >>> screenshot("runs/lenet5_search/report.html", "docs/search_report.png")  # doctest: +SKIP
    """
    exe = find_chromium()
    if exe is None:
        raise TorchslimError("screenshot: chromium is not installed; run `apt-get install chromium`")
    with tempfile.TemporaryDirectory(prefix="torchslim-chromium-") as tmp:
        shot = Path(tmp) / "shot.png"
        cmd = [
            exe,
            *HEADLESS_FLAGS,
            f"--user-data-dir={tmp}/profile",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={shot}",
            Path(html_path).resolve().as_uri(),
        ]
        done = subprocess.run(cmd, env={**os.environ, "HOME": tmp}, capture_output=True, timeout=60, check=False)
        if done.returncode != 0 or not shot.is_file():
            tail = done.stderr.decode(errors="replace")[-800:]
            raise TorchslimError(f"screenshot: chromium exited with {done.returncode} without writing {shot}: {tail}")
        return write_atomic(png_path, shot.read_bytes())
