"""report.html of a real small run (portraits, the bad-input corpus, a photo without a face, a hostile file name),
checked against the output read independently with pyarrow, then opened in a real browser (Debian's Chromium driven
by Playwright): images load, failures and histograms show the right numbers, sorting works, no console errors."""

import csv
import html
import io
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import IN_CI, read_parts
from corpus import face_corpus
from ops.summaries import metric_direction
from pipelines import report
from pipelines.cli import main

HOSTILE = "<img src=x onerror=alert(1)>.jpg"  # a file name that would run script if the page did not escape it
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def run(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("report")
    photos = root / "photos"
    photos.mkdir()
    corpus = face_corpus()
    corpus.pop("bomb.png")  # its decode guard is tested in test_ingest; here it would only cost time
    expected = {name: (status, code) for name, (_, status, code) in corpus.items()}
    for name, (data, _, _) in corpus.items():
        (photos / name).write_bytes(data)
    (photos / HOSTILE).write_bytes(b"not an image")
    expected[HOSTILE] = ("failed", "decode_error")
    out = root / "out"
    assert main(["invert", "--input", str(photos), "--output", str(out), "--align", "ffhq", "--steps", "2",
                 "--spaces", "wplus,fwplus", "--base-level", "8", "--lpips-net", "alex", "--lpips-backbone",
                 "random", "--batch-size", "4"]) == 0
    return out, expected


def test_run_writes_a_report_whose_figures_match_the_output(run, capsys):
    out, expected = run
    table = read_parts(out)
    keys, statuses = table.column("key").to_pylist(), table.column("status").to_pylist()
    assert sorted(keys) == sorted(expected)
    facts = report.collect(str(out))
    assert facts.by_status == dict(Counter(s for s, _ in expected.values()))
    codes = Counter(code for status, code in expected.values() if status != "ok")
    assert {f["code"]: f["count"] for f in facts.failures} == dict(codes)
    rows = list(csv.DictReader(io.StringIO((out / report.FAILURES_CSV).read_text())))
    assert sorted((r["key"], r["error_code"]) for r in rows) == \
        sorted((k, c) for k, (s, c) in expected.items() if s != "ok")
    ok = np.array([s == "ok" for s in statuses])
    metric_columns = [c for c in table.column_names if metric_direction(c) is not None]
    assert {m["column"] for m in facts.metrics} == set(metric_columns) and "wplus_psnr" in metric_columns
    for m in facts.metrics:
        values = table.column(m["column"]).to_numpy()[ok].astype(np.float64)
        counts, edges = np.histogram(values, bins=report.BINS)
        assert m["counts"] == counts.tolist() and np.allclose(m["edges"], edges)
        pairs = list(zip(values.tolist(), np.array(keys, dtype=object)[ok].tolist()))
        ascending = sorted(pairs, key=lambda r: (r[0], r[1]))[:report.GALLERY]
        descending = sorted(pairs, key=lambda r: (-r[0], r[1]))[:report.GALLERY]
        best, worst = (descending, ascending) if m["higher_is_better"] else (ascending, descending)
        assert [k for _, k in m["best"]] == [k for _, k in best]
        assert [k for _, k in m["worst"]] == [k for _, k in worst]
    # every gallery row has its preview: original | aligned | reconstruction per space
    assert set(facts.previews_of_rows) == {k for m in facts.metrics for _, k in m["worst"] + m["best"]}
    assert facts.preview_columns == ["original", "image", "recon_wplus", "recon_fwplus"]
    page = (out / report.REPORT).read_text()
    assert HOSTILE not in page and html.escape(HOSTILE) in page  # escaped, never markup
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network


def test_terminal_is_quiet_and_says_it_in_words(tmp_path):
    """The command as a user runs it (its own process, a cold Ray): progress and one summary line, no Ray lines."""
    from corpus import bad_input_corpus

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ok.jpg", "text.jpg"):
        (photos / name).write_bytes(bad_input_corpus()[name][0])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "invert", "--input", str(photos), "--output",
                           str(out), "--align", "none", "--steps", "1", "--lpips-net", "alex", "--lpips-backbone",
                           "random"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"invert: 1 ok, 1 failed \(decode_error: 1\) in \d+ s — report: "
                        rf"{re.escape(str(out / 'report.html'))}\n", done.stdout), done.stdout
    lines = done.stderr.splitlines()
    assert lines and all(re.fullmatch(r"invert: \d/2 rows, [\d.]+ rows/s, (ETA|in) .*", line) for line in lines), \
        done.stderr
    assert (out / "report.html").exists()


def test_a_rerun_with_nothing_to_do_says_so(run, capsys, tmp_path):
    out, expected = run
    shutil.copytree(out, tmp_path / "again")
    assert main(["invert", "--input", str(Path(out).parent / "photos"), "--output", str(tmp_path / "again"),
                 "--align", "ffhq", "--steps", "2", "--spaces", "wplus,fwplus", "--base-level", "8", "--lpips-net",
                 "alex", "--lpips-backbone", "random", "--batch-size", "4"]) == 0
    assert re.fullmatch(rf"invert: no new rows; {len(expected)} inputs already done in \d+ s — report: "
                        rf"{re.escape(str(tmp_path / 'again' / 'report.html'))}\n", capsys.readouterr().out)


def test_summary_line_in_plain_words():
    from pipelines.cli import summary_line

    stats = {"by_status": {"failed": 1, "ok": 2}, "by_error": {"no_face": 1}, "already_done": 0, "redone": 0}
    assert summary_line(stats) == "2 ok, 1 failed (no_face: 1)"


def test_preview_files_are_named_for_people(run):
    out, _ = run
    names = sorted(p.name for p in (out / "previews").iterdir())
    assert names and all(n.startswith("invert_wplus-fwplus_") for n in names), names
    assert any("face.png" in n or "two_faces" in n for n in names)


def test_report_command_writes_elsewhere_and_refuses_non_outputs(run, tmp_path, capsys):
    out, _ = run
    assert main(["report", str(out), "--to", str(tmp_path / "r"), "--gallery", "3"]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert (tmp_path / "r" / report.FAILURES_CSV).exists() and page.count('gallery worst"') == 6  # one per metric
    assert main(["report", str(tmp_path / "nothing")]) == 2  # EXIT_ERROR
    assert "not a latentray output" in capsys.readouterr().err


def test_streamed_statistics_equal_whole_table_ones_over_many_parts(tmp_path):
    """Many parts, a key in two parts (only the winner counts), NaN metrics: the streamed figures equal numpy's."""
    from pipelines import driver, index, io as lio
    from pipelines.lock import OutputLock

    rng = np.random.default_rng(3)
    out = tmp_path / "out"
    lio.write_json(str(out), "run.json", {"stage": "invert", "runs": []})
    truth = {}
    with OutputLock(str(out)) as lock:
        for p in range(7):
            n = 50
            keys = [f"k{(p * 40 + i):04d}" for i in range(n)]  # 10 keys overlap the next part: newer copy wins
            status = np.where(rng.random(n) < 0.1, "failed", "ok").astype(object)
            psnr = rng.normal(25, 3, n).astype(np.float32)
            psnr[status != "ok"] = np.nan
            batch = {"key": np.array(keys, dtype=object), "status": status,
                     "error_code": np.where(status == "ok", "", "no_face").astype(object),
                     "error": np.where(status == "ok", "", "no face").astype(object), "wplus_psnr": psnr,
                     "input_id": np.array(keys, dtype=object)}
            driver.write_batch(batch, str(out), {"fingerprint": "f", "stage": "invert"}, (), lock.ticket, "key")
            for k, s, v in zip(keys, status, psnr):
                truth[k] = (s, float(v))
    facts = report.collect(str(out))
    whole = index.read_dataset(str(out), ["key", "status", "wplus_psnr"])  # the one-table reader every stage uses
    assert len(whole) == len(truth) == 7 * 40 + 10
    status = np.array(whole.column("status").to_pylist())
    ok = whole.column("wplus_psnr").to_numpy()[status == "ok"].astype(np.float64)
    counts, _ = np.histogram(ok, bins=report.BINS)
    m = facts.metrics[0]
    assert m["counts"] == counts.tolist() and m["n"] == len(ok) == np.isfinite(ok).sum()
    assert facts.by_status == dict(Counter(status.tolist()))
    assert np.isclose(m["mean"], np.mean(ok))


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright (never a browser Playwright downloads); a failure in CI when absent."""
    executable = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        if IN_CI:
            pytest.fail("the browser test needs Debian's chromium and the playwright package (.ci/run installs both)")
        pytest.skip("no chromium or playwright here")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        yield b
        b.close()


def test_report_in_a_real_browser(run, browser):
    out, expected = run
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    requests = []
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto((out / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"))  # the top of the page, as a person first sees it

    widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : -1)")
    assert widths and min(widths) > 0, widths  # every image decoded (previews and every gallery row)
    failures = page.eval_on_selector_all(
        "table.failures tbody tr", "rows => rows.map(r => [r.cells[1].textContent, Number(r.cells[2].textContent)])")
    assert dict(failures) == dict(Counter(c for s, c in expected.values() if s != "ok"))
    n_ok = sum(s == "ok" for s, _ in expected.values())
    for svg in page.query_selector_all("svg.histogram"):
        counts = svg.eval_on_selector_all("rect.bar", "rs => rs.map(r => Number(r.dataset.count))")
        assert len(counts) == report.BINS and sum(counts) == int(svg.get_attribute("data-n")) == n_ok

    table = page.query_selector("table.gallery.worst")  # the first metric's worst rows
    values = lambda: table.eval_on_selector_all("tbody tr", "rs => rs.map(r => Number(r.cells[2].dataset.v))")  # noqa
    keys = lambda: table.eval_on_selector_all("tbody tr", "rs => rs.map(r => r.cells[1].textContent)")  # noqa
    header = table.query_selector_all("th")
    header[2].click()
    assert values() == sorted(values())
    header[2].click()
    assert values() == sorted(values(), reverse=True)
    header[1].click()
    assert keys() == sorted(keys())

    page.screenshot(path=str(ARTIFACTS / "report-full.png"), full_page=True)
    assert not problems, problems
    assert not requests, requests  # nothing fetched from any network
    page.close()
