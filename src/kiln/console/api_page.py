"""One API's console page: charts over a window, revisions with rollback, errors, curl."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from kiln.console import views
from kiln.console.views import esc

CLASSES = ("2xx", "4xx", "5xx")


def api_body(
    session: Any, api: dict[str, Any], points: list[dict[str, Any]], window: str, log_text: str
) -> str:
    name = api["name"]
    link = f"/console/apis/{quote(name)}"
    windows = " ".join(
        f'<a href="{link}?window={w}"{" aria-current=page" if w == window else ""}>{w}</a>'
        for w in ("15m", "1h", "24h")
    )
    reps = api.get("replicas", {})
    summary = (
        f"<p>{views.badge(api.get('status', ''))} replicas {reps.get('ready', 0)}/"
        f"{reps.get('requested', 0)} · revision {esc(api.get('revision'))} · "
        f"last deploy {views.when(api.get('last_update'))}</p>"
    )
    per_s = [{**p, **{c: round(p[c] / 60, 3) for c in ("2xx", "4xx", "5xx")}} for p in points]
    charts = (
        '<div class="charts">'
        + views.chart(
            "Requests per second",
            per_s,
            [("2xx", "2xx", "#1a7f37"), ("4xx", "4xx", "#9a6700"), ("5xx", "5xx", "#cf222e")],
            totals="Requests in this window: "
            + ", ".join(f"{c} {sum(int(p.get(c) or 0) for p in points)}" for c in CLASSES),
        )
        + views.chart(
            "Latency (ms)",
            points,
            [
                ("p50_ms", "p50", "#0b5cad"),
                ("p90_ms", "p90", "#8250df"),
                ("p99_ms", "p99", "#cf222e"),
            ],
        )
        + views.chart(
            "Replicas ready",
            points,
            [("replicas", "replicas", "#1a7f37")],
            marks=[
                (float(e["time"]), f"{e.get('from')} -> {e.get('to')}: {e.get('reason', '')}")
                for e in api.get("scaling_events", [])
                if isinstance(e.get("time"), int | float)
            ],
        )
        + views.chart("Queue length", points, [("queue", "queue", "#9a6700")])
        + "</div>"
    )
    revisions = ""
    for rev in api.get("revisions", []) or []:
        rid = esc(rev.get("revision") or rev.get("hash") or rev.get("id"))
        current = rev.get("current")
        action = (
            "current"
            if current
            else f'<form class="inline" method="post" action="{link}/rollback" '
            f"onsubmit=\"return confirm('Roll {esc(name)} back to {rid}?')\">{views.csrf(session)}"
            f'<input type="hidden" name="revision" value="{rid}">'
            f'<button class="act" type="submit">Roll back</button></form>'
        )
        revisions += (
            f"<tr><td>{rid}</td><td>{esc(rev.get('status'))}</td>"
            f"<td>{views.when(rev.get('created_at'))}</td><td>{action}</td></tr>"
        )
    errors = "".join(
        f"<li>{esc(e.get('error') if isinstance(e, dict) else e)}</li>"
        for e in api.get("recent_errors", [])
    )
    return (
        f'{summary}<nav aria-label="Window">Window: {windows}</nav>{charts}'
        '<h2>Revisions</h2><div class="scroll"><table><thead><tr><th scope=col>Revision</th>'
        "<th scope=col>Status</th><th scope=col>Created</th><th scope=col>Action</th></tr>"
        f"</thead><tbody>{revisions or '<tr><td colspan=4>none</td></tr>'}</tbody></table></div>"
        f"{tracker_section(api.get('tracker'))}"
        f"<h2>Recent errors</h2><ul>{errors or '<li>none</li>'}</ul>"
        f'<h2 id="log-title">Log (live tail)</h2><pre id="log-tail" aria-labelledby="log-title" '
        f'tabindex="0" class="log" data-src="/console/fragment/logs/{quote(name)}">'
        f"{esc(log_text)}</pre>"
        + (  # a realtime API's curl is the try-it panel's, built from the same body
            f"<h2>Submit a job with curl</h2><pre>{esc(api.get('curl', ''))}</pre>"
            if api.get("kind") == "BatchAPI"
            else ""
        )
    )


def tracker_section(tracker: Any) -> str:
    """The tracker's distribution: class counts as bars, or a regression's summary."""
    if not isinstance(tracker, dict) or not tracker.get("model_type"):
        return ""
    if tracker["model_type"] == "classification":
        classes = tracker.get("classes", {})
        top = max(classes.values(), default=1) or 1
        bars = "".join(
            f'<div class="bar"><span class="bar-label">{esc(label)}</span>'
            f'<span class="bar-fill" style="width:{100 * n / top:.1f}%"></span>'
            f'<span class="bar-n">{n}</span></div>'
            for label, n in classes.items()
        )
        return f"<h2>Predictions by class</h2>{bars or '<p>nothing tracked yet</p>'}"
    cells = "".join(
        f"<tr><th scope=row>{k}</th><td class=num>{_num(tracker.get(k))}</td></tr>"
        for k in ("count", "min", "p50", "p90", "p99", "max", "mean")
    )
    hist = tracker.get("histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    bins = [
        (
            f"{_num(edges[i])} to {_num(edges[i + 1])}",
            int(n),
            _num(edges[i]) if i % 5 == 0 else "",
        )
        for i, n in enumerate(counts)
        if i + 1 < len(edges)
    ]
    chart = (
        views.bar_chart(
            "Predicted values (histogram)",
            bins,
            f"{sum(counts)} predicted values in {len(bins)} bins from {_num(edges[0])} "
            f"to {_num(edges[-1])}",
        )
        if bins
        else ""
    )
    return (
        f'<h2>Predicted values</h2><div class="charts">{chart}<table class=narrow>'
        f"<tbody>{cells}</tbody></table></div>"
    )


def _num(value: Any) -> str:
    """A tracked value, short: 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else esc(value)


LOG_JS = """
(function(){const pre=document.getElementById('log-tail');if(!pre)return;
const url=pre.dataset.src;setInterval(async()=>{try{const r=await fetch(url,
{credentials:'same-origin'});if(r.ok){
const atEnd=pre.scrollTop+pre.clientHeight>=pre.scrollHeight-4;
pre.textContent=await r.text();if(atEnd)pre.scrollTop=pre.scrollHeight;}}catch(e){}},5000);})();
"""
