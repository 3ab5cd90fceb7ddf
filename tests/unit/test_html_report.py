"""The HTML run report: self-contained, every section drawn or marked empty, text escaped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from gpte_ray.report.html import render_html_report, throughput_steps, write_html_report

FULL = {
    "run_id": "abc123", "table": "docs", "version_before": 1, "version": 2, "committed": True,
    "rows_read": 1200, "new": 1000, "changed": 150, "unchanged": 50, "quarantined": 0, "deleted": 3,
    "docs_embedded": 1150, "chunks_written": 1400, "tokens": 250_000, "padded_tokens": 260_000,
    "padding_efficiency": 0.9615, "device": "cpu", "seconds": 61.5, "docs_read_per_s": 19.51,
    "docs_embedded_per_s": 20.87, "tokens_per_s": 4065.0, "counts_add_up": True,
    "model": {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "revision": None, "weights_hash": "53aa5172",
              "dim": 384, "precision": "int8", "pooling": "mean", "max_length": 256, "dtype": "auto"},
    "stage_seconds": {"scan": 2.0, "embed": 55.1, "commit": 0.1},
    "length_histogram": {"edges": [0, 32, 64, 128, 256, 512], "counts": [100, 400, 450, 200, 50]},
    "buckets": [
        {"max_len": 64, "real_tokens": 30_000, "computed_tokens": 31_000, "batches": 4},
        {"max_len": 32, "real_tokens": 9_000, "computed_tokens": 9_500, "batches": 2},
        {"max_len": 256, "real_tokens": 211_000, "computed_tokens": 219_500, "batches": 20},
    ],
    "timeline": [[5.0, 100, 20_000], [20.0, 500, 90_000], [40.0, 900, 170_000], [60.0, 1150, 250_000]],
}


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def test_full_report_has_every_section(tmp_path):
    path = write_html_report(FULL, str(tmp_path / "sub" / "report.html"))
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>")
    for title in ("Summary", "Stage times", "Lengths of the chunks embedded in this run (tokens)",
                  "Micro-batch fill per length bucket",
                  "Throughput over the run"):
        assert f"<h2>{title}</h2>" in page
    labels = [re.search(r'aria-label="([^"]+)"', s).group(1) for s in _svgs(page)]
    assert labels == ["stage seconds", "token count histogram", "micro-batch fill per length bucket",
                      "documents embedded", "throughput"]
    assert "no length histogram" not in page and "no micro-batch buckets" not in page
    # the figures people look for
    assert "1,200" in page and "96.2%" in page and "4,065 tokens/s" in page
    assert "19.5" in page and "20.9" in page and "docs read / s" in page and "docs embedded / s" in page
    # what the vectors are, before anything else
    head = page[page.index("<h1>"):page.index("<h2>")]
    for words in ("sentence-transformers/all-MiniLM-L6-v2", "revision <code>unpinned</code>", "dim <b>384</b>",
                  "precision <b>int8</b>"):
        assert words in head
    assert "Quarantined rows" not in page  # nothing quarantined: no section
    # 5 histogram bars, 3 buckets x (padding + real) bars, each with a tooltip
    hist = _svgs(page)[1]
    assert hist.count("<rect") == 5 and "33–64 tokens: 400 chunks" in hist
    fill = _svgs(page)[2]
    assert [m for m in re.findall(r"(\d+\.\d)%", fill)] == ["94.7", "96.8", "96.1"]  # sorted by max_len
    # every SVG is well-formed XML
    for svg in _svgs(page):
        ET.fromstring(svg)


def test_self_contained():
    page = render_html_report(FULL)
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_missing_and_empty_fields_degrade_gracefully():
    for report in ({}, {"table": "t", "length_histogram": None, "buckets": [], "timeline": []},
                   {"length_histogram": {"edges": [], "counts": []}, "timeline": [[1.0, 5, 50]],
                    "buckets": [{"max_len": "x"}], "stage_seconds": {}},
                   {"length_histogram": {"edges": [0, 10], "counts": [0]}, "padding_efficiency": None}):
        page = render_html_report(report)
        assert "no length histogram in this report" in page
        assert "no micro-batch buckets in this report" in page
        assert "no throughput timeline in this report" in page
        for svg in _svgs(page):
            ET.fromstring(svg)


def test_report_py_layout_upper_bound_edges_and_open_bucket():
    """RunReport's layout: edges are upper bounds ending in None; the last bucket has no max_len."""
    report = {
        "length_histogram": {"edges": [8, 16, 32, 64, None], "counts": [3, 2, 0, 0, 1]},
        "buckets": [{"max_len": None, "real_tokens": 900, "computed_tokens": 1000, "batches": 1},
                    {"max_len": 8, "real_tokens": 70, "computed_tokens": 80, "batches": 2},
                    {"max_len": 16, "real_tokens": 0, "computed_tokens": 0, "batches": 0}],
    }
    page = render_html_report(report)
    hist = _svgs(page)[1]
    assert hist.count("<rect") == 5
    assert "≤ 8 tokens: 3 chunks" in hist and "9–16 tokens: 2 chunks" in hist
    assert "&gt; 64 tokens: 1 chunks" in hist
    assert ">∞</text>" in hist
    fill = _svgs(page)[2]
    assert fill.index(">≤ 8<") < fill.index(">&gt; 8<")  # open bucket last; the empty one is left out
    assert re.findall(r"(\d+\.\d)%", fill) == ["87.5", "90.0"]
    # empty bins past the last populated one are not drawn
    trimmed = render_html_report({"length_histogram": {"edges": [8, 16, 32, None], "counts": [1, 2, 0, 0]}})
    assert _svgs(trimmed)[1].count("<rect") == 2
    for svg in _svgs(page) + _svgs(trimmed):
        ET.fromstring(svg)


def test_a_single_interval_and_no_elapsed_time():
    page = render_html_report({"timeline": [[0, 0, 0], [10, 50, 1000]]})
    assert 'aria-label="documents embedded"' in page
    assert 'aria-label="throughput"' in page
    page = render_html_report({"timeline": [[0, 0, 0], [0, 5, 50]]})  # no time passed: no rate
    assert 'aria-label="documents embedded"' in page and "too few samples for a rate" in page


def test_text_is_escaped():
    evil = "<script>alert('x')</script>"
    report = dict(FULL, table=evil, run_id='"><img src=x onerror=alert(1)>', device=evil,
                  stage_seconds={evil: 1.0}, upkeep={"note": evil},
                  eval={"queries": 3, "index": evil, "exact": {"recall@10": 0.5}, "note": evil})
    page = render_html_report(report)
    assert "<script" not in page.lower()
    assert "<img" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    for svg in _svgs(page):
        ET.fromstring(svg)


def test_eval_section_when_present():
    ev = {"queries": 150, "index": "IVF_PQ", "exact": {"recall@10": 0.84, "ndcg@10": 0.61},
          "indexed": {"recall@10": 0.83, "ndcg@10": 0.6}}
    page = render_html_report(dict(FULL, eval=ev))
    assert "<h2>Retrieval quality</h2>" in page and "0.840" in page and "IVF_PQ" in page
    assert "Retrieval quality" not in render_html_report(FULL)


def test_bursty_progress_is_spread_over_the_time_it_took():
    # progress arrives in bursts: samples in between fold into the next move
    pts = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (10, 100, 1000), (11, 100, 1000), (20, 200, 1900),
           (21, 200, 1900)]
    assert throughput_steps(pts) == [(0, 100.0), (10, 100.0), (20, 90.0)]
    page = render_html_report({"timeline": [list(p) for p in pts], "tokens_per_s": 95.0})
    assert "run average 95" in page


def test_quarantine_reasons_by_kind_with_examples():
    from gpte_ray.report.run_report import RunReport, quarantine_kind

    assert quarantine_kind("text is not valid UTF-8 (byte 5)") == "text is not valid UTF-8"
    assert quarantine_kind("bad shard: input error: s3://b/x.parquet: unreadable Parquet") == "bad shard"
    assert quarantine_kind("duplicate doc_id (kept a.jsonl row 10)") == "duplicate doc_id"
    rows = ([{"shard": 0, "row": i, "doc_id": f"d{i}", "reason": "empty text"} for i in range(5)]
            + [{"shard": 1, "row": 7, "doc_id": None, "reason": "invalid JSON (Expecting value: line 1)"}])
    report = RunReport()
    report.add_quarantine(rows, ["a.parquet", "b.jsonl"], examples=2)
    assert report.quarantine_reasons == {"empty text": 5, "invalid JSON": 1}
    assert [(x["source"], x["row"]) for x in report.quarantine_examples] == [
        ("a.parquet", 0), ("a.parquet", 1), ("b.jsonl", 7)]
    page = render_html_report({**FULL, "quarantined": 6, "quarantine_reasons": report.quarantine_reasons,
                               "quarantine_examples": report.quarantine_examples,
                               "quarantine_file": "db/docs.quarantine/abc.parquet"})
    section = page[page.index("<h2>Quarantined rows by reason</h2>"):]
    section = section[:section.index("</section>")]
    assert re.search(r"<td>5</td><td>empty text</td>.*<td>1</td><td>invalid JSON</td>", section)
    assert "b.jsonl</td><td>7</td><td>–</td><td>invalid JSON (Expecting value: line 1)" in section
    assert "db/docs.quarantine/abc.parquet" in section


def test_cost_section_shows_what_the_run_held_and_cost():
    cost = {"embed_actors": 2, "embed_actor_seconds": 120.0, "accelerator_seconds": 120.0,
            "tokens_per_accelerator_second": 2083.3, "outside_forward_share": 0.031,
            "node_seconds": {"gpu-1x": 61.0, "odd-node": 60.0}, "cost": 0.0425,
            "cost_per_million_tokens": 0.17, "unpriced_node_types": ["odd-node"]}
    page = render_html_report({**FULL, "cost": cost})
    section = page[page.index("<h2>Cost</h2>"):page.index("<h2>Stage times</h2>")]
    assert "0.0425" in section and "0.1700 per million tokens" in section and "no price for odd-node" in section
    assert "2,083 tokens per accelerator-second" in section and "3.1%" in section
    assert "node seconds · gpu-1x" in section
    # unpriced: the section says how to get a cost line; no cost figures at all: no section
    unpriced = {k: v for k, v in cost.items() if k not in ("cost", "cost_per_million_tokens")}
    assert "report.price_per_hour" in render_html_report({**FULL, "cost": unpriced})
    assert "<h2>Cost</h2>" not in render_html_report(FULL)


def test_trend_of_recent_runs_with_this_run_last():
    from gpte_ray.report.run_report import trend_row

    nights = [{"started": f"2026-11-{d:02d}T02:00:00+00:00", "run_id": f"r{d}", "seconds": 30.0 + d, "new": d,
               "changed": 1, "deleted": 0, "docs_embedded": d + 1, "tokens": 100 * (d + 1),
               "cost": {"embed_actor_seconds": 10.0 + d, "accelerator_seconds": 10.0 + d,
                        "tokens_per_accelerator_second": 55.5, "cost": 0.001 * d,
                        "cost_per_million_tokens": 1.25}} for d in (27, 28, 29)]
    rows = [trend_row(n) for n in nights]
    assert rows[0]["accelerator_seconds"] == 37.0 and rows[2]["cost"] == 0.029 and rows[1]["tokens"] == 2900
    page = render_html_report({**FULL, "trend": rows})
    section = page[page.index("<h2>Recent runs of this table</h2>"):page.index("<h2>Stage times</h2>")]
    assert section.count("<tr") == 4 and section.index("2026-11-27") < section.index("2026-11-29")
    assert '<tr class="this"><td>2026-11-29 02:00</td>' in section and "0.0290" in section and "1.2500" in section
    assert "tokens / accelerator-s" in section
    ET.fromstring(section[section.index("<table"):section.index("</table>") + 8])  # well-formed
    # unpriced runs: no cost columns; one run alone: no trend section
    unpriced = [{**r, "cost": None, "cost_per_million_tokens": None, "accelerator_seconds": 0.0} for r in rows]
    page = render_html_report({**FULL, "trend": unpriced})
    section = page[page.index("<h2>Recent runs of this table</h2>"):page.index("<h2>Stage times</h2>")]
    assert "per M tokens" not in section and "accelerator-s" not in section and "embed actor-s" in section
    assert "Recent runs" not in render_html_report({**FULL, "trend": rows[:1]})


def test_the_page_shows_the_shards_read_and_skipped():
    from gpte_ray.report.html import render_html_report

    page = render_html_report({**FULL, "shards_total": 5000, "shards_read": 5, "shards_skipped": 4995,
                               "rows_skipped": 4_995_000, "full_scan": "",
                               "shards_changed_in_place": []})
    assert "shards read" in page and "4,995 skipped unchanged" in page and "full scan" not in page
    page = render_html_report({**FULL, "shards_total": 2, "shards_read": 2, "full_scan": "--full-scan <x>",
                               "shards_changed_in_place": ["a.jsonl"]})
    assert "full scan: --full-scan &lt;x&gt;" in page and "1 changed keeping size and mtime" in page
