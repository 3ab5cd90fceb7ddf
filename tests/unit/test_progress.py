"""Progress as the user sees it: reported per micro-batch, printed at once, then steadily."""

from __future__ import annotations

import io

import pyarrow as pa

from gpte_ray.config import ModelConfig
from gpte_ray.model.spec import resolve_model
from gpte_ray.report import run_report as report_module
from gpte_ray.report.run_report import Progress
from gpte_ray.run.stages import EmbedOptions, EmbedStage, TokenizeStage


class _Counter:
    """Stands in for the ProgressCounter actor handle: `add.remote(docs, rows, tokens)`."""

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []
        self.add = self
        self.remote = lambda *a: self.calls.append(a)


def test_embed_stage_reports_each_micro_batch():
    spec = resolve_model(ModelConfig(max_length=32))
    texts = [("word " * n).strip() for n in (3, 50, 12, 7, 9, 15, 20, 4)]  # the 50-word one is 2+ chunks
    docs = pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts, "content_hash": ["h"] * 8})
    chunks = TokenizeStage(spec)(docs)
    for interval, calls in ((0.0, lambda n: n > 2), (3600.0, lambda n: n == 1)):
        counter = _Counter()
        stage = EmbedStage(spec, EmbedOptions("cpu", 64, 4, 0.0, 1), progress=counter)  # budget 64 tokens: many batches
        stage.progress.interval = interval  # a window that takes longer than this reports as it goes
        stage(chunks)
        assert calls(len(counter.calls)), counter.calls  # as it goes; or once, at the window's end
        docs_done, rows, tokens = (sum(c[i] for c in counter.calls) for i in range(3))
        assert (docs_done, rows) == (8, chunks.num_rows)
        assert tokens == sum(len(x) for x in chunks["input_ids"].to_pylist())


def test_progress_line_at_once_then_steady(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(report_module.time, "perf_counter", lambda: now[0])
    out = io.StringIO()  # not a terminal: plain lines
    p = Progress(10, stream=out)

    def at(t, docs, rows):
        now[0] = 100.0 + t
        p.update(docs, rows, rows * 10)
        return out.getvalue().count("\n")

    assert at(0.5, 0, 0) == 1  # the first line comes at once
    assert at(2.0, 1, 2) == 1  # moved, but within 5 s of the last line
    assert at(6.0, 1, 3) == 2  # moved (chunks count too) after 5 s
    assert at(20.0, 1, 3) == 2  # nothing moved: no line...
    assert at(37.0, 1, 3) == 3  # ...until 30 s have passed: a heartbeat
    assert at(38.0, 10, 12) == 4  # done: always printed
    assert out.getvalue().splitlines()[-1].startswith("embedded 10/10 docs (12 chunks)")


def test_progress_counts_the_plan_with_resumed_work_and_keeps_a_steady_eta(monkeypatch):
    """A resumed run starts at what was staged (as its report counts), and documents that
    finish in bursts (100 every 20 s: 5 per second) give an ETA near the truth, not a swing."""
    now = [100.0]
    monkeypatch.setattr(report_module.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    p = Progress(4400, stream=out, resumed=(400, 900))
    now[0] = 100.5
    p.update(0, 0, 0)
    assert out.getvalue().splitlines()[0].startswith("embedded 400/4400 docs (900 chunks)")
    etas = []
    for t in range(2, 800, 2):
        now[0] = 100.0 + t
        done = 100 * (t // 20)
        p.update(done, 2 * done, 0)
        if t >= 120 and p.docs < p.total:
            etas.append((p.total - p.docs) / p.rate(now[0]) / ((p.total - p.docs) / 5.0))
    assert 0.8 < min(etas) and max(etas) < 1.25, (min(etas), max(etas))


def test_the_report_says_which_versions_the_run_made():
    from gpte_ray.report.html import _versions_note, render_html_report

    note = _versions_note({"version_before": 3, "version": 5, "committed": True})
    assert "commit made version 4" in note and "upkeep then made 1 more (up to 5), which change no row" in note
    assert "committed nothing" in _versions_note({"version_before": 5, "version": 5, "committed": False})
    page = render_html_report({"version_before": 3, "version": 5, "committed": True,
                               "stage_seconds": {"embed": 28.8, "embed_compute": 2.6}})
    assert "<code>embed_compute</code> is the forward alone" in page and "made version 4" in page


def test_a_message_never_lands_inside_the_progress_line(monkeypatch):
    from gpte_ray import console as console_module

    class Tty(io.StringIO):
        def isatty(self):
            return True

    term = Tty()
    monkeypatch.setattr(console_module, "_console", term)
    Progress(10, stream=term).update(3, 4, 40)
    console_module.say("gpte-ray: interrupted")
    assert term.getvalue().endswith("\ngpte-ray: interrupted\n") and "ETA" in term.getvalue().split("\n")[0]


def test_a_log_path_is_named_only_if_the_log_stays(tmp_path, monkeypatch):
    from gpte_ray import console as console_module

    log = tmp_path / "index-1-x.log"
    log.write_text("")
    monkeypatch.setattr(console_module, "_noise_log", str(log))
    assert console_module.noise_log_kept() is None  # empty: removed at exit
    log.write_text("a warning from Ray\n")
    assert console_module.noise_log_kept() == str(log)
    log.unlink()
    assert console_module.noise_log_kept() is None
