"""The run report as one self-contained HTML page: inline CSS and SVG, no scripts, no network.

`write_html_report(report, path)` takes the run report's dict (`dataclasses.asdict(RunReport)`
or the JSON line `index` prints) and draws:

* the run summary: counts, table version, seconds, throughput, padding efficiency, stage times;
* the model: `model = {"model_id", "revision", "weights_hash", "dim", "precision", ...}`;
* quarantined rows by kind: `quarantine_reasons = {kind: rows}`, `quarantine_examples`;
* the lengths of the chunks this run embedded: `length_histogram = {"edges": [...], "counts": [...]}`, edges
  as upper bounds (bin i: (edge[i-1], edge[i]], a last None: longer) or as n + 1 boundaries;
  it counts chunks unless `"of"` says otherwise;
* the micro-batch fill per length bucket: `buckets = [{"max_len", "real_tokens",
  "computed_tokens", "batches"}, ...]` (real tokens vs padding computed on top of them; a
  max_len of None is the bucket past the last edge);
* throughput over the run: `timeline = [[seconds_since_start, docs_done, tokens_done], ...]`;
* retrieval quality, when the dict carries an `eval` result of `gpte_ray.query.evaluate.evaluate`.

Any of these may be missing or empty: its section then says so instead of drawing. Every
string from the report is HTML-escaped.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence

__all__ = ["render_html_report", "write_html_report"]

ACCENT = "#2563eb"
PAD = "#f59e0b"
GOOD = "#16a34a"
MUTED = "#6b7280"
GRID = "#e5e7eb"
INK = "#111827"


# ---- formatting -------------------------------------------------------------------------------
def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v, digits: int = 1) -> str:
    """12,345 / 1.2 / '-' for None."""
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    if not math.isfinite(f):
        return "–"
    if f.is_integer() and abs(f) >= 1000:
        return f"{int(f):,}"
    return f"{f:,.{digits}f}"


def _short(v: float) -> str:
    """Axis labels: 950, 1.2k, 3.4M."""
    a = abs(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            s = f"{v / div:.1f}".rstrip("0").rstrip(".")
            return s + suffix
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.2g}"


def _maybe_short(v) -> str:
    try:
        return _short(float(v))
    except (TypeError, ValueError):
        return "–"


def _edge(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _pct(v) -> str:
    try:
        return f"{100 * float(v):.1f}%"
    except (TypeError, ValueError):
        return "–"


def _nice_max(v: float, ticks: int = 4) -> tuple[float, float]:
    """(axis max, tick step) with a round step covering v."""
    if v <= 0 or not math.isfinite(v):
        return 1.0, 0.25
    raw = v / ticks
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return step * math.ceil(v / step), step


def _empty(msg: str, w: int = 960, h: int = 70) -> str:
    return (f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">'
            f'<rect x="0.5" y="0.5" width="{w - 1}" height="{h - 1}" rx="6" fill="#f9fafb" stroke="{GRID}"/>'
            f'<text x="{w / 2}" y="{h / 2 + 5}" text-anchor="middle" fill="{MUTED}">{_e(msg)}</text></svg>')


def _ints(xs) -> list[float]:
    out = []
    for x in xs or []:
        try:
            out.append(float(x))
        except (TypeError, ValueError):
            out.append(0.0)
    return out


# ---- charts -----------------------------------------------------------------------------------
def _t(x: float, y: float, body: str, cls: str = "tick", anchor: str = "start", attrs: str = "") -> str:
    """An SVG text element; `body` must already be escaped."""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}"{attrs}>{body}</text>'


def _vt(x: float, y: float, body: str) -> str:
    """A vertical axis title."""
    return _t(x, y, body, "axis", "middle", f' transform="rotate(-90 {x:.1f} {y:.1f})"')


def _open(w: float, h: float, label: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
            f'aria-label="{_e(label)}">')


def _y_axis(x0: float, x1: float, y0: float, y1: float, top: float, step: float) -> str:
    """Horizontal grid lines and labels for values 0..top mapped to y0 (bottom)..y1 (top)."""
    parts = []
    for i in range(round(top / step) + 1):
        v = i * step
        y = y0 - (y0 - y1) * v / top
        parts.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(_t(x0 - 6, y + 4, _short(v), anchor="end"))
    return "".join(parts)


def _bounds(edges: Sequence, n: int) -> list[float | None]:
    """n + 1 bin boundaries from a report's edges; None is an open upper end.

    n edges: upper bounds (bin i holds lengths in (edge[i-1], edge[i]], the first from 0, a last
    None: everything longer), as gpte_ray.run.stages.LENGTH_EDGES makes them. n + 1 edges: the
    boundaries themselves. Anything else: bin numbers."""
    def num(v):
        try:
            return None if v is None else float(v)
        except (TypeError, ValueError):
            return None

    vals = [num(v) for v in edges or []]
    if len(vals) == n and all(v is not None for v in vals[:-1]):
        return [0.0, *vals]
    if len(vals) == n + 1 and all(v is not None for v in vals[:-1]):
        return vals
    return [float(i) for i in range(n + 1)]


def _span(lo: float | None, hi: float | None) -> str:
    if hi is None:
        return f"> {_edge(lo or 0)}"
    if not lo:
        return f"≤ {_edge(hi)}"
    return f"{_edge(lo + 1) if float(lo).is_integer() else _edge(lo)}–{_edge(hi)}"


def histogram_svg(hist: dict | None, w: int = 960, h: int = 260) -> str:
    """Chunks (or documents, per `hist["of"]`) per token-count bin; empty bins past the last
    populated one are not drawn."""
    hist = hist or {}
    counts = _ints(hist.get("counts"))
    if not counts or not any(counts):
        return _empty("no length histogram in this report", w)
    bounds = _bounds(hist.get("edges"), len(counts))
    last = max(i for i, c in enumerate(counts) if c > 0)
    counts, bounds = counts[: last + 1], bounds[: last + 2]
    of = _e(hist.get("of") or "chunks")
    left, right, top_m, bottom = 64, 16, 16, 48
    pw, ph = w - left - right, h - top_m - bottom
    base = top_m + ph
    top, step = _nice_max(max(counts))
    bw = pw / len(counts)
    parts = [_open(w, h, "token count histogram"), _y_axis(left, w - right, base, top_m, top, step)]
    total = sum(counts)
    for i, c in enumerate(counts):
        bh = ph * c / top
        x = left + i * bw
        tip = f"{_e(_span(bounds[i], bounds[i + 1]))} tokens: {_num(int(c))} {of} ({_pct(c / total)})"
        parts.append(f'<rect x="{x + 1:.1f}" y="{base - bh:.1f}" width="{max(bw - 2, 1):.1f}" '
                     f'height="{bh:.1f}" fill="{ACCENT}" rx="2"><title>{tip}</title></rect>')
    label_every = max(1, math.ceil(len(bounds) / 16))
    for i, edge in enumerate(bounds):
        if i % label_every and i != len(bounds) - 1:
            continue
        x = left + i * bw
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" stroke="{MUTED}"/>')
        parts.append(_t(x, base + 18, "∞" if edge is None else _edge(edge), anchor="middle"))
    parts.append(_t(left + pw / 2, h - 6, f"tokens per {of.rstrip('s')}", "axis", "middle"))
    parts.append(_vt(14, top_m + ph / 2, of))
    parts.append("</svg>")
    return "".join(parts)


def buckets_svg(buckets: Sequence[dict] | None, w: int = 960) -> str:
    """Per length bucket: real tokens (solid) and the padding computed on top (amber)."""
    rows = []
    for b in buckets or []:
        try:
            cap = b.get("max_len")  # None: the open bucket past the last edge
            rows.append((math.inf if cap is None else int(cap), float(b.get("real_tokens") or 0),
                         float(b.get("computed_tokens") or 0), int(b.get("batches") or 0)))
        except (TypeError, ValueError, AttributeError, OverflowError):
            continue
    rows = [r for r in rows if r[2] > 0 or r[1] > 0]
    if not rows:
        return _empty("no micro-batch buckets in this report", w)
    rows.sort()
    bar_h, gap, top_m, left, right = 22, 10, 30, 92, 250
    h = top_m + len(rows) * (bar_h + gap) + 44
    pw = w - left - right
    top, step = _nice_max(max(max(r[1], r[2]) for r in rows))
    parts = [_open(w, h, "micro-batch fill per length bucket")]
    for i in range(round(top / step) + 1):
        x = left + pw * i * step / top
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top_m - 6}" y2="{h - 38}" stroke="{GRID}"/>')
        parts.append(_t(x, h - 24, _short(i * step), anchor="middle"))
    parts.append(_t(left - 8, top_m - 12, "tokens / row", "axis", "end"))
    parts.append(f'<rect x="{left}" y="{top_m - 23}" width="12" height="12" rx="2" fill="{ACCENT}"/>'
                 + _t(left + 17, top_m - 13, "real tokens")
                 + f'<rect x="{left + 100}" y="{top_m - 23}" width="12" height="12" rx="2" fill="{PAD}" '
                 f'opacity="0.5"/>' + _t(left + 117, top_m - 13, "padding computed"))
    parts.append(_t(w - right + 12, top_m - 12, "fill · micro-batches", "axis"))
    prev = 0
    for i, (max_len, real, computed, batches) in enumerate(rows):
        y = top_m + i * (bar_h + gap)
        mid = y + bar_h / 2
        computed = max(computed, real)
        eff = real / computed if computed else 0.0
        wr, wc = pw * real / top, pw * computed / top
        label = _span(prev, None if max_len == math.inf else max_len)
        prev = max_len if max_len != math.inf else prev
        parts.append(_t(left - 8, mid + 4, _e(label), anchor="end"))
        parts.append(f'<rect x="{left}" y="{y}" width="{max(wc, 1):.1f}" height="{bar_h}" fill="{PAD}" '
                     f'opacity="0.35" rx="3"><title>computed {_num(int(computed))} tokens</title></rect>')
        parts.append(f'<rect x="{left}" y="{y}" width="{max(wr, 1):.1f}" height="{bar_h}" fill="{ACCENT}" '
                     f'rx="3"><title>real {_num(int(real))} tokens</title></rect>')
        color = GOOD if eff >= 0.9 else (PAD if eff >= 0.7 else "#dc2626")
        parts.append(_t(w - right + 12, mid + 5, _pct(eff), "val", attrs=f' fill="{color}"'))
        parts.append(_t(w - right + 78, mid + 5, f"{_num(batches)} batches · {_short(computed)} tok"))
    parts.append(_t(left + pw / 2, h - 4, "tokens computed in the bucket's micro-batches", "axis", "middle"))
    parts.append("</svg>")
    return "".join(parts)


def _line_chart(points: list[tuple[float, float]], title: str, y_label: str, *, w: int, h: int, color: str,
                area: bool, avg: float | None = None, step_line: bool = False) -> str:
    """A line over `points` [(seconds, value)]: filled below with `area`, drawn as steps with
    `step_line`, with a dashed run-average line at `avg`."""
    left, right, top_m, bottom = 60, 16, 30, 44
    pw, ph = w - left - right, h - top_m - bottom
    xmax = max(p[0] for p in points) or 1.0
    top, step = _nice_max(max([p[1] for p in points] + [avg or 0]))
    xtop, xstep = _nice_max(xmax, 5)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + pw * x / xtop, top_m + ph - ph * y / top

    parts = [_open(w, h, title), _t(left, 18, _e(title), "ctitle"),
             _y_axis(left, w - right, top_m + ph, top_m, top, step)]
    for i in range(round(xtop / xstep) + 1):
        parts.append(_t(xy(i * xstep, 0)[0], top_m + ph + 18, _short(i * xstep), anchor="middle"))
    parts.append(_t(left + pw / 2, h - 6, "seconds since start", "axis", "middle"))
    parts.append(_vt(14, top_m + ph / 2, _e(y_label)))
    coords = []
    for i, (x, y) in enumerate(points):
        if step_line and i > 0:
            coords.append(xy(points[i - 1][0], y))
        coords.append(xy(x, y))
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    if area:
        x0, y0 = xy(points[0][0], 0)
        x1, _ = xy(points[-1][0], 0)
        parts.append(f'<polygon points="{x0:.1f},{y0:.1f} {path} {x1:.1f},{y0:.1f}" fill="{color}" '
                     f'opacity="0.12"/>')
    parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2.2" '
                 f'stroke-linejoin="round"/>')
    if avg is not None and avg > 0:
        _, ya = xy(0, avg)
        dash = f'stroke="{INK}" stroke-dasharray="5 4" opacity="0.6"'
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{ya:.1f}" y2="{ya:.1f}" {dash}/>')
        parts.append(f'<line x1="{w - right - 150}" x2="{w - right - 126}" y1="14" y2="14" {dash}/>')
        parts.append(_t(w - right, 18, f"run average {_short(avg)}", anchor="end"))
    parts.append("</svg>")
    return "".join(parts)


def throughput_steps(pts: list[tuple[float, float, float]]) -> list[tuple[float, float]]:
    """Tokens/s between consecutive samples where the token count moved: samples in between
    (progress reported in bursts) fold into the next move, so a burst is spread over the time
    it took instead of drawn as a spike. Step points [(t, rate)], the first at the start."""
    out: list[tuple[float, float]] = []
    t0, k0 = pts[0][0], pts[0][2]
    for t, _, k in pts[1:]:
        if k != k0 and t > t0:
            out.append((t, (k - k0) / (t - t0)))
            t0, k0 = t, k
    if out:
        out.insert(0, (pts[0][0], out[0][1]))
    return out


def timeline_svgs(timeline: Sequence | None, avg_tokens_s: float | None = None, w: int = 468,
                  h: int = 250) -> str:
    """Cumulative documents, and tokens/s per interval, over the run."""
    pts = []
    for row in timeline or []:
        try:
            t, docs, toks = (float(v) for v in list(row)[:3])
        except (TypeError, ValueError):
            continue
        pts.append((t, docs, toks))
    pts.sort()
    if len(pts) < 2:
        return _empty("no throughput timeline in this report (needs two or more samples)", 2 * w + 16)
    if pts[0][0] > 0:
        pts.insert(0, (0.0, 0.0, 0.0))
    docs = [(t, d) for t, d, _ in pts]
    left = _line_chart(docs, "documents embedded", "documents", w=w, h=h, color=ACCENT, area=True)
    rate = throughput_steps(pts)
    right = (_line_chart(rate, "throughput", "tokens / s", w=w, h=h, color=GOOD, area=False,
                         avg=avg_tokens_s, step_line=True)
             if len(rate) >= 2 else _empty("too few samples for a rate", w, h))
    return f'<div class="pair">{left}{right}</div>'


def stages_svg(stages: dict | None, w: int = 960) -> str:
    """Seconds per stage, as bars."""
    items = []
    for k, v in (stages or {}).items():
        try:
            items.append((str(k), float(v)))
        except (TypeError, ValueError):
            continue
    if not items:
        return _empty("no stage timings in this report", w)
    bar_h, gap, top_m, left, right = 18, 8, 6, 140, 90
    h = top_m + len(items) * (bar_h + gap) + 4
    top = max(v for _, v in items) or 1.0
    parts = [_open(w, h, "stage seconds")]
    for i, (name, v) in enumerate(items):
        y = top_m + i * (bar_h + gap)
        bw = (w - left - right) * max(v, 0) / top
        parts.append(_t(left - 8, y + bar_h - 4, _e(name), anchor="end"))
        parts.append(f'<rect x="{left}" y="{y}" width="{max(bw, 1):.1f}" height="{bar_h}" fill="{MUTED}" '
                     f'opacity="0.55" rx="3"/>')
        parts.append(_t(left + bw + 6, y + bar_h - 4, f"{_num(v, 2)} s"))
    parts.append("</svg>")
    return "".join(parts)


# ---- page -----------------------------------------------------------------------------------
def _card(label: str, value: str, sub: str = "", cls: str = "") -> str:
    sub_html = f'<div class="sub">{sub}</div>' if sub else ""
    return (f'<div class="card {cls}"><div class="label">{_e(label)}</div>'
            f'<div class="value">{value}</div>{sub_html}</div>')


def _kv_table(d: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in d.items())
    return f'<table class="kv">{rows}</table>'


def _model_line(model) -> str:
    """Model, revision, dimension and precision: what the vectors are, first thing on the page."""
    if not isinstance(model, dict) or not model:
        return ""
    parts = [f'model <code>{_e(model.get("model_id") or "?")}</code>',
             f'revision <code>{_e(model.get("revision") or "unpinned")}</code>',
             f'weights <code>{_e(model.get("weights_hash") or "?")}</code>',
             f'dim <b>{_e(model.get("dim") or "?")}</b>', f'precision <b>{_e(model.get("precision") or "?")}</b>']
    for key in ("pooling", "max_length", "dtype"):
        if model.get(key) is not None:
            parts.append(f"{_e(key.replace('_', ' '))} {_e(model[key])}")
    return f'<p class="meta">{" · ".join(parts)}</p>'


def _quarantine_section(r: dict) -> str:
    """Quarantined rows counted by kind of reason, with a few example rows of each."""
    reasons = r.get("quarantine_reasons")
    if not isinstance(reasons, dict) or not reasons:
        return ""
    counts = "".join(f"<tr><td>{_num(n)}</td><td>{_e(k)}</td></tr>"
                     for k, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    examples = "".join(
        f"<tr><td>{_e(x.get('source'))}</td><td>{_num(x.get('row'))}</td><td>{_e(x.get('doc_id') or '–')}</td>"
        f"<td>{_e(x.get('reason'))}</td></tr>"
        for x in r.get("quarantine_examples") or [] if isinstance(x, dict))
    where = (f'<p class="note">Every quarantined row: <code>{_e(r["quarantine_file"])}</code></p>'
             if r.get("quarantine_file") else "")
    return (f'<section><h2>Quarantined rows by reason</h2><table class="grid"><tr><th>rows</th><th>reason</th></tr>'
            f"{counts}</table><h2>Examples</h2><table class=\"grid\"><tr><th>source</th><th>row</th><th>doc_id</th>"
            f"<th>reason</th></tr>{examples}</table>{where}</section>")


def _cost_section(r: dict) -> str:
    """What the embed actors held and, with `report.price_per_hour`, what that cost."""
    c = r.get("cost") if isinstance(r.get("cost"), dict) else {}
    if not c:
        return ""
    share = c.get("outside_forward_share")
    cards = [
        _card("embed actors", _num(c.get("embed_actors")), f"{_num(c.get('embed_actor_seconds'))} actor-seconds held"),
        _card("accelerator-seconds", _num(c.get("accelerator_seconds")),
              f"{_num(c.get('tokens_per_accelerator_second'), 0)} tokens per accelerator-second"
              if c.get("tokens_per_accelerator_second") else "CPU run: no accelerator held"),
        _card("outside forward", _pct(share) if share is not None else "–",
              "of the actors' time after model load: feeding, writing, waiting"),
    ]
    if "cost" in c:
        unpriced = c.get("unpriced_node_types") or []
        cards.append(_card("cost", f"{c['cost']:.4f}",
                           (f"{c['cost_per_million_tokens']:.4f} per million tokens"
                            if c.get("cost_per_million_tokens") is not None else "no tokens embedded")
                           + (f" · no price for {', '.join(map(str, unpriced))}" if unpriced else ""),
                           cls="bad" if unpriced else ""))
    nodes = {f"node seconds · {k}": v for k, v in (c.get("node_seconds") or {}).items()}
    note = ('<p class="note">Each node is charged from its first embed actor\'s start to its last window, '
            "at <code>report.price_per_hour</code> for its node type.</p>" if "cost" in c else
            '<p class="note">Set <code>report.price_per_hour</code> (per node type) for a cost line.</p>')
    return (f'<section><h2>Cost</h2>{note}<div class="cards">{"".join(cards)}</div>'
            f"{_kv_table(nodes) if nodes else ''}</section>")


def _trend_section(r: dict) -> str:
    """This table's recent runs, oldest first, this run last: what each embedded and cost."""
    rows = [t for t in r.get("trend") or [] if isinstance(t, dict)]
    if len(rows) < 2:
        return ""
    cols = [("started (UTC)", "started"), ("new", "new"), ("changed", "changed"), ("deleted", "deleted"),
            ("docs embedded", "docs_embedded"), ("tokens", "tokens"), ("seconds", "seconds"),
            ("embed actor-s", "embed_actor_seconds")]
    if any(t.get("accelerator_seconds") for t in rows):  # CPU runs hold no accelerator
        cols += [("accelerator-s", "accelerator_seconds"), ("tokens / accelerator-s", "tokens_per_accelerator_second")]
    if any(t.get("cost") is not None for t in rows):
        cols += [("cost", "cost"), ("per M tokens", "cost_per_million_tokens")]

    def cell(t: dict, k: str) -> str:
        v = t.get(k)
        if v is None:
            return "–"
        if k == "started":
            return _e(str(v)[:16].replace("T", " "))
        return f"{v:.4f}" if k in ("cost", "cost_per_million_tokens") else _num(v)

    body = "".join(
        ('<tr class="this">' if i == len(rows) - 1 else "<tr>") + "".join(f"<td>{cell(t, k)}</td>" for _, k in cols)
        + "</tr>" for i, t in enumerate(rows))
    head = "".join(f"<th>{_e(h)}</th>" for h, _ in cols)
    return (f'<section><h2>Recent runs of this table</h2><p class="note">The last {len(rows)} runs, oldest first; '
            "this run is the last line. A night that changes little should cost little.</p>"
            f'<table class="grid"><tr>{head}</tr>{body}</table></section>')


def _eval_table(ev: dict) -> str:
    modes = [m for m in ("exact", "indexed") if isinstance(ev.get(m), dict)]
    if not modes:
        return ""
    names = list(dict.fromkeys(n for m in modes for n in ev[m]))
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{_e(m)}</th>" + "".join(f"<td>{_num(ev[m].get(n), 3)}</td>" for n in names) + "</tr>"
        for m in modes
    )
    note = f'<p class="note">{_e(ev["note"])}</p>' if ev.get("note") else ""
    tuned = ev.get("search") if isinstance(ev.get("search"), dict) else {}
    tuned_s = ", ".join(f"{_e(k)}={_e(v)}" for k, v in tuned.items() if v is not None)
    meta = (f'<p class="note">{_num(ev.get("queries"))} queries · vector index: '
            f'{_e(ev.get("index", "none"))}{" · indexed search with " + tuned_s if tuned_s else ""}</p>')
    return (f'<section><h2>Retrieval quality</h2>{meta}<table class="grid"><tr><th></th>{head}</tr>'
            f"{body}</table>{note}</section>")


CSS = f"""
*{{box-sizing:border-box}}
body{{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:{INK};
 background:#f3f4f6;margin:0;padding:24px}}
main{{max-width:1000px;margin:0 auto;background:#fff;border-radius:10px;padding:24px 24px 8px;
 box-shadow:0 1px 3px rgba(0,0,0,.08)}}
h1{{font-size:22px;margin:0 0 2px}} h2{{font-size:16px;margin:22px 0 4px}}
.meta{{color:{MUTED};margin:0 0 14px}} .meta code{{color:{INK}}}
.cards{{display:grid;grid-template-columns:repeat(6,1fr);gap:10px}}
.card{{border:1px solid {GRID};border-radius:8px;padding:8px 10px;min-width:0}}
.card .label{{color:{MUTED};font-size:12px}} .card .value{{font-size:20px;font-weight:600;
 white-space:nowrap;overflow:hidden;text-overflow:ellipsis}}
.card .sub{{color:{MUTED};font-size:12px;overflow-wrap:anywhere}}
.card.ok{{border-color:#86efac;background:#f0fdf4}} .card.bad{{border-color:#fca5a5;background:#fef2f2}}
.note{{color:{MUTED};margin:2px 0 8px;font-size:13px}}
svg.chart{{display:block;max-width:100%;height:auto;font-size:12px}}
svg .tick{{fill:{MUTED};font-size:11px}} svg .axis{{fill:{MUTED};font-size:12px}}
svg .val{{font-size:13px;font-weight:600}} svg .ctitle{{fill:{INK};font-size:13px;font-weight:600}}
.pair{{display:flex;gap:16px;flex-wrap:wrap}} .pair svg.chart{{flex:1 1 300px;min-width:0}}
table.kv,table.grid{{border-collapse:collapse;font-size:13px}}
table.kv th,table.kv td,table.grid th,table.grid td{{padding:3px 12px 3px 0;text-align:left}}
table.grid td{{font-variant-numeric:tabular-nums}} table.grid tr.this td{{font-weight:600}}
table.kv th,table.grid th{{color:{MUTED};font-weight:500}}
footer{{color:{MUTED};font-size:12px;margin:18px 0 8px}}
"""


def _summary(r: dict) -> str:
    """The two rows of cards: what the run counted, and what it embedded and how fast."""
    add_up = r.get("counts_add_up")
    eff = r.get("padding_efficiency")
    cards_counts = "".join([
        _card("rows read", _num(r.get("rows_read")), f"{_num(r.get('rows_skipped'))} in shards skipped unchanged"),
        _card("shards read", _num(r.get("shards_read")),
              f"of {_num(r.get('shards_total'))}; {_num(r.get('shards_skipped'))} skipped unchanged"
              + (f" · full scan: {_e(r['full_scan'])}" if r.get("full_scan") else "")
              + (f" · {len(r['shards_changed_in_place'])} changed keeping size and mtime"
                 if r.get("shards_changed_in_place") else "")),
        _card("new", _num(r.get("new"))),
        _card("changed", _num(r.get("changed"))),
        _card("unchanged", _num(r.get("unchanged"))),
        _card("metadata updated", _num(r.get("metadata_updated")), "kept columns only: copied, not embedded"),
        _card("quarantined", _num(r.get("quarantined")), cls="bad" if r.get("quarantined") else ""),
        _card("deleted", _num(r.get("deleted"))),
    ])
    cards_work = "".join([
        _card("docs embedded", _num(r.get("docs_embedded")),
              f"{_num(r.get('chunks_written'))} chunks written"),
        _card("tokens", _maybe_short(r.get("tokens")), f"{_maybe_short(r.get('padded_tokens'))} computed"),
        _card("padding efficiency", _pct(eff) if eff is not None else "–", "real / computed tokens"),
        _card("docs read / s", _num(r.get("docs_read_per_s")), "rows read over the whole run"),
        _card("docs embedded / s", _num(r.get("docs_embedded_per_s")),
              f"over the embed stage · {_num(r.get('tokens_per_s'), 0)} tokens/s over the run"),
        _card("counts add up", "yes" if add_up else "no",
              "every row in the files was read and accounted for" if add_up
              else "rows in the files ≠ read ≠ new + changed + unchanged + metadata updated + quarantined",
              cls="ok" if add_up else "bad"),
    ])
    return (f'<section><h2>Summary</h2>\n<div class="cards">{cards_counts}</div><div style="height:10px"></div>\n'
            f'<div class="cards">{cards_work}</div></section>')


def _versions_note(r: dict) -> str:
    """Which versions the run made: its one commit, then upkeep's, which change no row."""
    before, after, committed = r.get("version_before"), r.get("version"), r.get("committed")
    if after is None:
        return ""
    made = (before or 0) + 1 if committed else None
    said = [f"this run's one commit made version {made}" if committed else "this run committed nothing (no change)"]
    start = made if committed else before
    if start is not None and after > start:
        said.append(f"upkeep then made {after - start} more (up to {after}), which change no row: "
                    "index updates, compaction, cleanup")
    upkeep = r.get("upkeep") if isinstance(r.get("upkeep"), dict) else {}
    if upkeep.get("error"):
        said.append(f"upkeep did not finish ({upkeep['error']}); the next run repeats it")
    return f'<p class="note">Versions: {_e("; ".join(said))}.</p>'


STAGES_NOTE = ('<p class="note"><code>embed</code> is the whole embed pass: reading the planned rows, '
               "tokenizing, starting the actors and loading the model, the forward, writing fragments and "
               "markers. <code>embed_compute</code> is the forward alone, summed over the embed actors; "
               "the cost section splits the actors' time (load, forward, waiting for input).</p>")


def _details(r: dict) -> str:
    """The counts that are usually zero, and what upkeep did, when there is any of either."""
    keys = ("bad_shards", "truncated", "oom_retries", "min_token_budget", "chunks_embedded", "chunks_resumed",
            "chunks_copied", "quarantine_file")
    extra = {k: r[k] for k in keys if r.get(k) not in (None, 0, "")}
    upkeep = r.get("upkeep") if isinstance(r.get("upkeep"), dict) else {}
    if not extra and not upkeep:
        return ""
    return "<h2>Details</h2>" + _kv_table({**extra, **{f"upkeep.{k}": v for k, v in upkeep.items()}})


def _bucket_note(buckets: Sequence[dict]) -> str:
    """How much of the computed tokens was real text; empty when the buckets do not add up."""
    if not buckets:
        return ""
    try:
        real = sum(float(b.get("real_tokens", 0)) for b in buckets)
        comp = sum(float(b.get("computed_tokens", 0)) for b in buckets)
        nb = sum(int(b.get("batches", 0)) for b in buckets)
    except (TypeError, ValueError, AttributeError):
        return ""
    return (f'<p class="note">{_num(nb)} micro-batches; {_pct(real / comp if comp else 0)} of the computed tokens '
            "were real text, the rest padding.</p>")


def _hist_note(hist: dict | None) -> str:
    if not hist or not hist.get("counts"):
        return ""
    n = _num(int(sum(_ints(hist.get("counts")))))
    return (f'<p class="note">{n} {_e(hist.get("of") or "chunks")} by token count: only what this '
            "run embedded (new and changed documents), not the whole table.</p>")


def render_html_report(report: dict) -> str:
    """The page as a string."""
    r = dict(report or {})
    table = r.get("table") or "?"
    before, after = r.get("version_before"), r.get("version")
    version = f"{_num(before) if before is not None else 'new'} → {_num(after)}"
    committed = "committed" if r.get("committed") else "nothing to commit"
    buckets = r.get("buckets") or []
    hist = r.get("length_histogram") if isinstance(r.get("length_histogram"), dict) else None
    ev = _eval_table(r["eval"]) if isinstance(r.get("eval"), dict) else ""
    timeline_note = ('<p class="note">Tokens per second between successive progress updates '
                     "(a burst of finished rows counts over the time since the previous one).</p>"
                     if len(r.get("timeline") or []) >= 2 else "")

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gpte-ray run report: {_e(table)}</title>
<style>{CSS}</style></head>
<body><main>
<h1>Run report · table <code>{_e(table)}</code></h1>
{_model_line(r.get("model"))}
<p class="meta">run <code>{_e(r.get("run_id") or "?")}</code> (plan <code>{_e(r.get("plan_id") or "?")}</code>) ·
 device {_e(r.get("device") or "?")} ·
 version {version} ({committed}){" · full rebuild" if r.get("rebuild") else ""} ·
 {_num(r.get("seconds"))} s</p>
{_versions_note(r)}
{_summary(r)}
{_quarantine_section(r)}
{_cost_section(r)}
{_trend_section(r)}
<section><h2>Stage times</h2>{STAGES_NOTE}{stages_svg(r.get("stage_seconds"))}</section>
<section><h2>Lengths of the chunks embedded in this run (tokens)</h2>{_hist_note(hist)}{histogram_svg(hist)}</section>
<section><h2>Micro-batch fill per length bucket</h2>{_bucket_note(buckets)}{buckets_svg(buckets)}</section>
<section><h2>Throughput over the run</h2>{timeline_note}{timeline_svgs(r.get("timeline"), r.get("tokens_per_s"))}
</section>
{ev}
{_details(r)}
<footer>gpte-ray · self-contained report: no scripts, no network.</footer>
</main></body></html>
"""


def write_html_report(report: dict, path: str) -> str:
    """Write the page to `path` (folders created); returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html_report(report))
    return path
