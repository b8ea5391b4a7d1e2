"""`finetune-trainer report OUTPUT_DIR` on a real run (conftest's `smollm2_lora_run`, shared with
test_train_smollm2.py, so no extra training), rendered by real headless Chromium: the DOM Chromium
builds has the loss curve with one point per logged step, the eval-loss markers, the learning-rate
and tokens/s curves and the before/after tables, and the screenshot shows the curves' colours.

Chromium is required, not optional: scripts/ensure-chromium.sh installs it (`make test-reference`
runs it first). Without it this test fails saying so."""

import json
from collections import Counter
import os
import re
import struct
import subprocess
import tempfile
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import run_json

CHROMIUM = Path("/usr/bin/chromium")
# No network, no first-run or background services: the sandbox's network refuses them.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Stroke colours of the curves (trainer-image/src/report/charts.rs).
TRAIN_COLOR, LR_COLOR, TPS_COLOR = (0x1F, 0x6F, 0xEB), (0x82, 0x50, 0xDF), (0x1A, 0x7F, 0x37)


def chromium(tmp_path, *args):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the report test renders in headless Chromium; install it with "
                    "scripts/ensure-chromium.sh (apt-get install -y chromium)")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)  # fresh for every start
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


class Elements(HTMLParser):
    """Every start tag with its attributes, plus the text inside each element with an id."""

    def __init__(self):
        super().__init__()
        self.tags, self.text_by_id, self._open = [], {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self._open.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for i in filter(None, self._open):
            self.text_by_id[i] = self.text_by_id.get(i, "") + data

    def series(self, tag, key):
        return [a for t, a in self.tags if t == tag and a.get("data-series") == key]


def path_points(d):
    """Points of an SVG path made of M/L commands (what the report draws)."""
    return len(re.findall(r"[ML]-?[\d.]+,-?[\d.]+", d))


def png_pixels(path):
    """(width, height, rows of RGB tuples) of an 8-bit RGB/RGBA non-interlaced PNG, like Chromium's
    screenshots: enough of a decoder to count colours without an imaging library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unsupported PNG {header}"
    bpp = 3 if color == 2 else 4
    raw, stride, prev, rows = zlib.decompress(idat), width * bpp, bytearray(width * bpp), []
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x:x + 3]) for x in range(0, stride, bpp)])
        prev = line
    return width, height, rows


def count_near(histogram, rgb, tolerance=24):
    """Pixels within `tolerance` per channel of `rgb` (anti-aliased edges are lighter)."""
    return sum(n for px, n in histogram.items() if all(abs(p - q) <= tolerance for p, q in zip(px, rgb)))


def test_report_renders_in_chromium(smollm2_lora_run, tmp_path):
    out = smollm2_lora_run.out
    assert "report: " in smollm2_lora_run.stderr and (out / "report.html").exists(), \
        "the run itself writes report.html"
    summary = json.loads((out / "training_summary.json").read_text())
    steps = len(summary["history"])
    evals = len(summary["evals"]) + (summary["initial_eval_loss"] is not None)

    started = time.monotonic()
    written = run_json("report", out)
    seconds = time.monotonic() - started
    report = Path(written["report"])
    print(f"\nreport.html: {written['bytes']} bytes, {written['seconds'] * 1000:.1f} ms to write "
          f"({seconds:.2f}s with process start), {steps} steps")
    assert report == out / "report.html" and report.stat().st_size == written["bytes"]
    html = report.read_text()
    assert not re.search(r"<(script|link|img|iframe)\b", html), "self-contained: no scripts or external resources"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "no network references"

    dom = chromium(tmp_path, "--dump-dom", report.as_uri())
    page = Elements()
    page.feed(dom)
    train = page.series("path", "train-loss")
    assert len(train) == 1 and path_points(train[0]["d"]) == steps, train
    assert len(page.series("circle", "eval-loss")) == evals
    lr = page.series("path", "learning-rate")
    assert len(lr) == 1 and path_points(lr[0]["d"]) == steps
    tps = page.series("path", "tokens-per-second")
    assert len(tps) == 1 and path_points(tps[0]["d"]) == steps
    results = page.text_by_id["results"]
    for row in ("Eval loss", "Retention text loss", "Retention score", "Generation exact match"):
        assert row in results, results
    assert f"{summary['initial_eval_loss']:.4f}" in results and f"{summary['metrics']['evalLoss']:.4f}" in results
    answers = page.text_by_id["retention-answers"]
    assert "Base model (before)" in answers and "Tuned model (after)" in answers
    for changed in summary["retention"]["changed"]:
        assert " ".join(changed["question"].split()) in " ".join(answers.split())
    assert "Train/eval contamination" in page.text_by_id["contamination"]
    assert f"Training report: {summary['job']}" in dom

    shot = tmp_path / "report.png"
    chromium(tmp_path, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri())
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1200, 2000)
    histogram = Counter(px for row in rows for px in row)
    assert len(histogram) > 50, f"the screenshot is blank ({len(histogram)} colours)"
    for name, rgb in [("train loss", TRAIN_COLOR), ("learning rate", LR_COLOR), ("tokens/s", TPS_COLOR)]:
        n = count_near(histogram, rgb)
        print(f"{name} stroke pixels: {n}")
        assert n > 200, f"the {name} curve is not visible in the screenshot ({n} pixels of its colour)"
    keep = os.environ.get("FINETUNE_REPORT_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(shot.read_bytes())
