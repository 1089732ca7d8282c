"""The search report: HTML and Markdown from a synthetic report, and the page in headless Chromium.

The browser checks drive Chromium over its DevTools protocol on ``--remote-debugging-pipe`` (JSON
messages ending in NUL; the browser reads commands on its fd 3 and writes replies and events on its
fd 4) with the standard library only. Uncaught exceptions, ``console.error`` calls and error log
entries (a resource that failed to load) all count as console errors; a page with a deliberate
error proves the check can fail.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import random
import re
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import pytest

from torchslim.errors import ReportError
from torchslim.report import plots
from torchslim.report.html import to_html, to_search_markdown, write_search_report
from torchslim.search.result import Choice, SearchResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from chromium import HEADLESS_FLAGS, find_chromium, screenshot  # noqa: E402  (benchmarks/ owns the browser)

EVIL = "fc<script>undefinedFunction()</script>"
LAYERS = ("conv1", "conv2", "fc1", "fc2", EVIL)
CHOSEN = 7
needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed: run `apt-get install chromium`"
)


def _curve(rng: random.Random, settings: list[float], scale: float) -> list[list[float]]:
    """A rising accuracy-drop curve with a little noise: ``[[setting, drop], ...]``."""
    return [[s, round(scale * (i + 1) ** 2 * rng.uniform(0.5, 1.5) / 100, 5)] for i, s in enumerate(settings)]


def _trial(rng: random.Random, number: int, drop: float | None, base: float) -> dict[str, Any]:
    origin = {0: "seed: uniform", 1: "seed: sensitivity"}.get(number, "sampler")
    state = "FAIL" if number == 5 else "PRUNED" if number == 9 else "COMPLETE"
    plan = {name: {"sparsity": round(rng.uniform(0.3, 0.95), 2), "bits": rng.choice([3, 4, 5, 6])} for name in LAYERS}
    done = state == "COMPLETE"
    return {
        "number": number,
        "state": state,
        "origin": origin,
        "plan": plan,
        "accuracy": round(base - drop, 4) if done else None,
        "drop": drop if done else None,
        "bytes": rng.randint(20_000, 400_000) if done else None,
        "latency_ms": round(rng.uniform(1.0, 5.0), 3) if done else None,
        "feasible": done and drop <= 0.01,
        "pareto": False,
        "seconds": round(rng.uniform(10, 30), 1),
    }


def _sensitivity(rng: random.Random) -> dict[str, Any]:
    settings = {
        "sparsity": [0.5, 0.7, 0.8, 0.9, 0.95],
        "channels": [0.125, 0.25, 0.5, 0.75],
        "bits": [8, 6, 5, 4, 3, 2],
    }
    curves = {tech: {name: _curve(rng, s, rng.uniform(0.05, 0.4)) for name in LAYERS} for tech, s in settings.items()}
    curves["int8"] = {name: [[8, round(rng.uniform(0, 0.004), 5)]] for name in LAYERS}
    return {"split": "search", "curves": curves}


def make_report() -> dict[str, Any]:
    """A search report of schema version 1 (no version, no layer facts): twelve trials, some over
    budget, one failed."""
    rng = random.Random(0)
    base = 0.921
    drops = [0.004, 0.008, 0.015, 0.002, 0.021, None, 0.006, 0.009, 0.012, None, 0.003, 0.030]
    trials = [_trial(rng, i, d, base) for i, d in enumerate(drops)]
    trials[CHOSEN]["bytes"] = 15_000  # the smallest feasible file: the chosen plan
    front = plots.pareto_front([(t["bytes"], t["accuracy"]) for t in trials if t["feasible"]])
    for t in trials:
        t["pareto"] = (t["bytes"], t["accuracy"]) in front
    return {
        "kind": "search",
        "recipe": "lenet5_search",
        "model": {"name": "lenet5", "kwargs": {}},
        "data": {"name": "fashion_mnist"},
        "threads": 2,
        "budget": {"kind": "absolute", "value": 0.01, "max_drop": 0.01, "text": "1 point (absolute)"},
        "objective": "size",
        "latency_setting": {"backend": "onnxruntime", "batch": 64, "threads": 2},
        "baseline": {
            "accuracy_search": base,
            "accuracy_holdout": 0.919,
            "accuracy_test": 0.920,
            "bytes": 1_722_000,
            "params": 431_080,
            "latency_ms": {"batch1": 0.31, "batch64": 4.2},
        },
        "trials": trials,
        "chosen": {
            "trial": CHOSEN,
            "met_budget": True,
            "message": "trial 7: 114.8x smaller, within the 1-point budget",
        },
        "final": {
            "accuracy_search": 0.912,
            "accuracy_holdout": 0.911,
            "accuracy_test": 0.912,
            "drop_holdout": 0.008,
            "within_budget": True,
            "bytes": 15_000,
            "ratio": 114.8,
            "latency_ms": {"batch1": 0.2, "batch64": 1.9},
            "artifact": "runs/x/x.tslim",
        },
        "sensitivity": _sensitivity(rng),
        "plan_table": [
            {
                "layer": n,
                "channels": 0.25 if n == "conv2" else None,
                "sparsity": 0.8,
                "bits": 5,
                "int8": n != "fc2",
                "skip": "too sensitive" if n == "fc2" else None,
            }
            for n in LAYERS
        ],
        "search": {
            "sampler": "tpe",
            "trials_done": 10,
            "trials_failed": 1,
            "wall_s": 812.0,
            "workers": 1,
            "trials_per_hour": 177.3,
            "study": "lenet5_search",
            "storage": "runs/x/study.sqlite3",
            "resumed": False,
        },
        "timings": {"sensitivity_s": 30.1, "search_s": 700.2, "final_s": 80.0, "total_s": 812.0},
    }


@pytest.fixture
def report() -> SearchResult:
    return SearchResult.from_dict(make_report())


def test_a_version_1_report_reads_with_defaults_and_round_trips(report):
    assert report.schema_version == 2 and report.layers.weights == [] and report.trials[5].state == "FAIL"
    assert report.final.ratio == 114.8 and report.plan_table[1].channels == 0.25
    assert SearchResult.from_dict(json.loads(json.dumps(report.to_dict()))) == report


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": 3}, "schema version 3, but this torchslim reads 1 to 2; upgrade torchslim"),
        ({"kind": "compress"}, "not a search report"),
        ({"budget": {"kind": "absolute"}}, r"report.json.budget: not a BudgetFacts \(unknown keys \[\], missing"),
        ({"trials": [{"number": 0}]}, r"report.json.trials\[0\]: not a TrialRow .* missing \['state'\]"),
        ({"final": [1]}, r"report.json.final: expected an object \(Delivered\), found list"),
        ({"surprise": 1}, r"unknown keys \['surprise'\]"),
        ({"chosen": None}, r"report.json.chosen: null where a Choice belongs"),
        ({"trials": None}, r"report.json.trials: null where a list"),
    ],
)
def test_a_report_of_another_version_or_shape_is_refused_with_what_to_do(change, message):
    with pytest.raises(ReportError, match=message) as err:
        SearchResult.from_dict(make_report() | change)
    assert "rerun `torchslim search`" in str(err.value) or "upgrade torchslim" in str(err.value)


def test_pareto_front_keeps_only_non_dominated_points():
    points = [(3, 0.93), (1, 0.90), (2, 0.80), (2, 0.95), (4, 0.97), (5, 0.97)]
    assert plots.pareto_front(points) == [(1, 0.90), (2, 0.95), (4, 0.97)]


def test_html_has_one_svg_per_plot_and_unique_ids(report):
    page = to_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2 + 4
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) > 100 and len(ids) == len(set(ids))
    report.sensitivity.curves["int8"] = None
    page = to_html(report)
    assert page.count("<svg") == 2 + 3 and "Not measured (technique not searched): int8." in page


def test_svg_is_deterministic_and_marks_baseline_and_chosen(report):
    svg = plots.pareto_svg(report, "bytes")
    assert svg == plots.pareto_svg(report, "bytes") and svg.startswith("<svg") and "<?xml" not in svg
    # text is drawn as paths; matplotlib keeps each label as a comment beside them
    assert f"chosen: trial {CHOSEN}" in svg and "baseline (uncompressed)" in svg and "Pareto front" in svg
    assert "file size (KB, log scale)" in svg
    assert "latency per batch of 64 (ms, onnxruntime, 2 threads)" in plots.pareto_svg(report, "latency_ms")


def test_chosen_trial_is_marked(report):
    page = to_html(report)
    rows = re.findall(r'<tr class="chosen"><td[^>]*>([^<]*)</td>', page)
    assert rows == [f"{CHOSEN} (chosen)"]
    assert f"The chosen plan (trial {CHOSEN}) met the budget." in page
    assert "at most 1.00 points of accuracy lost (absolute)" in page
    md = to_search_markdown(report)
    assert f"| {CHOSEN} (chosen) | sampler | COMPLETE |" in md and "<svg" not in md


def test_all_text_is_escaped_and_nothing_is_external(report):
    page = to_html(report)
    assert "<script" not in page.lower() and escape(EVIL) in page
    assert not re.search(r'\b(?:src|href)="(?!#|data:)', page)  # only in-page and data: references
    assert "\\<script>" not in to_search_markdown(report) and EVIL in to_search_markdown(report)


def test_relative_budget_and_nothing_feasible(report):
    report.budget.kind, report.budget.value, report.budget.max_drop = "relative", 0.02, 0.01842
    report.chosen = Choice(None, False, "no trial within the budget")
    report.final, report.plan_table, report.sensitivity = None, [], None
    page = to_html(report)
    assert "at most 2.00 % of the baseline accuracy lost (relative), i.e. 1.84 points" in page
    assert "No trial met the budget, so no plan was chosen." in page and 'class="chosen"' not in page
    assert "No compressed file was delivered" in page and "This report has no sensitivity analysis." in page
    assert page.count("<svg") == 2 and "No plan was chosen." in to_search_markdown(report)


def test_write_search_report_writes_three_files_and_a_failure_keeps_them(report, tmp_path):
    paths = write_search_report(report, tmp_path / "run")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert json.loads(paths[0].read_text())["chosen"]["trial"] == CHOSEN
    before = [p.read_bytes() for p in paths]
    broken = copy.deepcopy(report)
    broken.search.resumed = object()
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_search_report(broken, tmp_path / "run")
    assert [p.read_bytes() for p in paths] == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.html", "report.json", "report.md"]


def test_import_torchslim_does_not_import_matplotlib():
    code = "import sys, torchslim, torchslim.report.html; assert 'matplotlib' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@dataclass
class Page:
    """What a page did in the browser: console errors, URLs it requested, SVGs laid out on screen."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    svgs: int = -1


class DevTools:
    """Chromium's DevTools protocol over a pair of pipes: send commands, collect the page's events."""

    def __init__(self, send_fd: int, recv_fd: int, deadline: float) -> None:
        self.send_fd, self.recv_fd, self.deadline = send_fd, recv_fd, deadline
        self.buf, self.next_id, self.page = b"", 0, Page()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.recv_fd], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.recv_fd, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        msg = json.loads(raw)
        if "method" in msg:
            self.events.append((msg["method"], msg.get("params", {})))
            _record(self.page, *self.events[-1])
        return msg

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.send_fd, json.dumps(msg).encode() + b"\0")
        while (reply := self._message()).get("id") != self.next_id:
            pass
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_load(self, loader: str) -> None:
        """Wait for the load event of the navigation whose loader id is ``loader``."""

        def loaded(method: str, params: dict[str, Any]) -> bool:
            return method == "Page.lifecycleEvent" and params["name"] == "load" and params["loaderId"] == loader

        while not any(loaded(*event) for event in self.events):
            self._message()


def _record(page: Page, method: str, params: dict[str, Any]) -> None:
    """Note a console error or a request from one DevTools event."""
    if method == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        page.errors.append((details.get("exception") or {}).get("description") or details["text"])
    elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
        args = (str(a.get("value", a.get("description"))) for a in params["args"])
        page.errors.append("console.error: " + " ".join(args))
    elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
        page.errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
    elif method == "Network.requestWillBeSent":
        page.requests.append(params["request"]["url"])


def _launch(tmp: Path) -> tuple[subprocess.Popen, int, int]:
    """Start headless Chromium with a throwaway profile and HOME; return it and our ends of its pipes."""
    cmd_r, cmd_w = os.pipe()
    msg_r, msg_w = os.pipe()
    # The browser's ends must be its fds 3 and 4: lift them above 9, and let bash move them there.
    child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, msg_w))
    move = f'exec "$0" "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-'
    args = [
        find_chromium(),
        *HEADLESS_FLAGS,
        f"--user-data-dir={tmp}/profile",
        "--remote-debugging-pipe",
        "--window-size=1280,2400",
        "about:blank",
    ]
    proc = subprocess.Popen(
        ["bash", "-c", move, *args],
        pass_fds=(child_in, child_out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(tmp)},
    )
    for fd in (cmd_r, msg_w, child_in, child_out):
        os.close(fd)
    return proc, cmd_w, msg_r


SVG_COUNT = "[...document.querySelectorAll('svg')].filter(s => s.getBoundingClientRect().width > 100).length"


def load_page(html_path: Path, tmp: Path, timeout: float = 15.0) -> Page:
    """Open ``html_path`` in headless Chromium, wait for its load event, and report what happened."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc, send_fd, recv_fd = _launch(tmp)
    try:
        cdp = DevTools(send_fd, recv_fd, time.monotonic() + timeout)
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable", session=session)
        cdp.call("Page.setLifecycleEventsEnabled", {"enabled": True}, session)
        cdp.wait_load(cdp.call("Page.navigate", {"url": html_path.resolve().as_uri()}, session)["loaderId"])
        count = cdp.call("Runtime.evaluate", {"expression": SVG_COUNT, "returnByValue": True}, session)
        cdp.page.svgs = count["result"]["value"]
        with contextlib.suppress(EOFError):  # the browser may exit before it answers
            cdp.call("Browser.close")
        return cdp.page
    finally:
        os.close(send_fd)
        os.close(recv_fd)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@needs_chromium
def test_page_loads_in_chromium_without_console_errors(report, tmp_path):
    page_path = write_search_report(report, tmp_path / "run")[2]
    t0 = time.monotonic()
    page = load_page(page_path, tmp_path / "browser")
    assert page.errors == [] and page.svgs == 2 + 4
    assert page.requests == [page_path.resolve().as_uri()]  # nothing but the page itself is fetched
    assert time.monotonic() - t0 < 15


@needs_chromium
def test_the_layer_name_would_run_if_it_were_not_escaped(report, tmp_path, monkeypatch):
    import torchslim.report.html

    monkeypatch.setattr(torchslim.report.html, "escape", lambda text: text)
    page = load_page(write_search_report(report, tmp_path / "run")[2], tmp_path / "browser")
    assert page.errors and all("undefinedFunction is not defined" in e for e in page.errors)


BROKEN = {
    "uncaught exception": ("<script>undefinedFunction()</script>", "undefinedFunction is not defined"),
    "console.error": ("<script>console.error('deliberate')</script>", "console.error: deliberate"),
    "missing resource": ('<img src="missing.png" alt="">', "Failed to load resource"),
}


@needs_chromium
@pytest.mark.parametrize("case", list(BROKEN))
def test_console_error_check_flags_a_broken_page(case, tmp_path):
    markup, expected = BROKEN[case]
    path = tmp_path / "broken.html"
    head = '<link rel="icon" href="data:,">'
    path.write_text(f"<!DOCTYPE html><html><head>{head}</head><body><svg></svg>{markup}</body></html>")
    page = load_page(path, tmp_path / "browser")
    assert len(page.errors) == 1 and expected in page.errors[0]


@needs_chromium
def test_screenshot_writes_a_png_of_the_page(report, tmp_path):
    page_path = write_search_report(report, tmp_path / "run")[2]
    png = screenshot(page_path, tmp_path / "shot.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1280, 2400)
    assert len(data) > 50_000  # a blank page of that size compresses to a few KB


def test_the_report_command_rewrites_a_search_report_and_refuses_a_newer_one(tmp_path):
    from typer.testing import CliRunner

    from torchslim.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(make_report()))
    result = CliRunner().invoke(app, ["report", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert json.loads((run / "report.json").read_text())["schema_version"] == 2 and (run / "report.html").is_file()
    before = (run / "report.html").read_bytes()
    (run / "report.json").write_text(json.dumps(make_report() | {"schema_version": 3}))
    result = CliRunner().invoke(app, ["report", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "schema version 3" in result.output and "upgrade torchslim" in result.output
    assert (run / "report.html").read_bytes() == before
