"""The console's HTML: a layout, the overview table, charts as server-rendered SVG.

No template engine and no JS build: every value goes through `esc` (html.escape),
and the only script is a few lines of vanilla JS inline (sort, filter, refresh).
Colours meet WCAG AA contrast on their backgrounds; tables scroll sideways on a
phone rather than squeezing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape
from typing import Any

CSS = """
:root{--fg:#1b1f24;--muted:#4b5563;--bg:#fff;--line:#d0d7de;--accent:#0b5cad}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,sans-serif;color:var(--fg);
background:var(--bg)}header{display:flex;flex-wrap:wrap;gap:.5rem 1.2rem;align-items:center;
padding:.6rem 1rem;background:#0d2538;color:#fff}header a{color:#fff}header .who{margin-left:auto}
main{padding:1rem;max-width:1400px}h1{font-size:1.35rem;margin:.2rem 0 1rem}
a{color:var(--accent)}a:focus,button:focus,input:focus,select:focus{outline:3px solid #f0a500;
outline-offset:1px}.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}
th,td{padding:.4rem .55rem;border-bottom:1px solid var(--line);text-align:left;
white-space:nowrap}th button{font:inherit;font-weight:600;background:none;border:0;padding:0;
cursor:pointer;color:var(--fg)}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:1rem;font-size:.85rem;
font-weight:600}.live{background:#d1f4dc;color:#0a4d1e}.updating{background:#fff1c2;color:#5c4400}
.error,.compute-unavailable{background:#ffd8d6;color:#82071e}
.scaled-to-zero{background:#e6e9ee;color:#30363d}.muted{color:var(--muted)}
form.inline{display:inline}button.act,input[type=submit]{font:inherit;padding:.3rem .8rem;
border:1px solid var(--accent);background:var(--accent);color:#fff;border-radius:4px;cursor:pointer}
button.danger{background:#a40e26;border-color:#a40e26}.flash{padding:.6rem .8rem;
border:1px solid #0b5cad;background:#e7f0fb;margin-bottom:1rem;word-break:break-all}
.problem{border-color:#a40e26;background:#ffebe9}label{font-weight:600}
input[type=text],input[type=password],input[type=search]{font:inherit;padding:.3rem .5rem;
border:1px solid #6e7781;border-radius:4px;min-width:16rem;max-width:100%}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,420px),1fr));
gap:1rem}.charts>figure:only-child{max-width:640px}caption{text-align:left}th.num{text-align:right}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:.5rem}
figcaption{font-weight:600}.key{display:inline-block;margin-right:.8rem}
.sw{display:inline-block;width:.8rem;height:.8rem;margin-right:.25rem;vertical-align:middle}
.toolbar{display:flex;flex-wrap:wrap;gap:.6rem;align-items:center;margin-bottom:.6rem}
.log{max-height:22rem;overflow:auto;background:#f6f8fa;border:1px solid var(--line);
padding:.5rem;font-size:.85rem;white-space:pre-wrap;word-break:break-all}
.bar{display:grid;grid-template-columns:minmax(6rem,12rem) 1fr 4rem;gap:.5rem;align-items:center;
margin:.2rem 0}.bar-fill{display:block;height:1rem;background:#0b5cad;min-width:2px}
.bar-n{text-align:right;font-variant-numeric:tabular-nums}table.narrow{width:auto}
textarea{font:.9rem ui-monospace,monospace;width:100%;max-width:48rem;padding:.4rem}
pre{white-space:pre-wrap;overflow-wrap:anywhere}svg text{fill:#1b1f24}
.skip{position:absolute;left:-999px}.skip:focus{left:.5rem;top:.5rem;background:#fff;
padding:.3rem .6rem;z-index:1}
@media (max-width:600px){figure svg text{font-size:21px}}
"""

OVERVIEW_JS = """
(function(){
const body=document.getElementById('api-rows'),filter=document.getElementById('filter');
let key=null,dir=1;
function apply(){const q=filter.value.trim().toLowerCase();
 const rows=[...body.rows];rows.forEach(r=>{r.hidden=q&&!r.textContent.toLowerCase().includes(q)});
 if(key!==null){rows.sort((a,b)=>{const x=a.cells[key].dataset.sort,y=b.cells[key].dataset.sort;
  const nx=parseFloat(x),ny=parseFloat(y);
  return dir*(!isNaN(nx)&&!isNaN(ny)?nx-ny:String(x).localeCompare(String(y)))});
  rows.forEach(r=>body.appendChild(r));}}
document.querySelectorAll('th button[data-col]').forEach(b=>b.addEventListener('click',()=>{
 const col=+b.dataset.col;dir=(key===col)?-dir:1;key=col;
 document.querySelectorAll('th').forEach(th=>th.removeAttribute('aria-sort'));
 b.parentElement.setAttribute('aria-sort',dir>0?'ascending':'descending');apply();}));
filter.addEventListener('input',apply);
async function refresh(){try{const r=await fetch('/console/fragment/apis',
 {credentials:'same-origin',headers:{'Accept':'text/html'}});
 if(r.ok){body.innerHTML=await r.text();apply();
 document.getElementById('updated').textContent=new Date().toLocaleTimeString();}}catch(e){}}
setInterval(refresh,5000);})();
"""


def esc(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def when(epoch: float | None) -> str:
    if not epoch:
        return "never"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def page(title: str, body: str, session: Any, *, script: str = "") -> str:
    who = ""
    nav = '<a href="/console">APIs</a>'
    if session is not None and session.signed_in:
        nav += ' <a href="/console/keys">Keys</a> <a href="/console/usage">Usage</a>'
        if session.is_admin:
            nav += ' <a href="/console/server">Server</a> <a href="/console/audit">Audit log</a>'
        who = (
            f'<span class="who">Signed in as <strong>{esc(session.user)}</strong> '
            f'<form class="inline" method="post" action="/console/logout">{csrf(session)}'
            '<button class="act" type="submit">Sign out</button></form></span>'
        )
    elif session is not None and session.key is None and session.user == "local":
        nav += ' <a href="/console/server">Server</a>'
        who = '<span class="who">kiln serve (no sign-in: API keys are off)</span>'
    flash = ""
    if session is not None and session.flash:
        flash = f'<div class="flash" role="status">{session.flash}</div>'
        session.flash = None
    tail = f"<script>{script}</script>" if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)} · Kiln console</title><style>{CSS}</style></head><body>"
        '<a class="skip" href="#main">Skip to content</a>'
        f'<header><strong>Kiln</strong><nav aria-label="Console">{nav}</nav>{who}</header>'
        f'<main id="main"><h1>{esc(title)}</h1>{flash}{body}</main>{tail}</body></html>'
    )


def csrf(session: Any) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'


def badge(status: str) -> str:
    return f'<span class="badge {esc(status.replace(" ", "-"))}">{esc(status)}</span>'


def _ms(value: Any) -> str:
    if value is None:
        return "–"
    return value if isinstance(value, str) else f"{value:.1f} ms"


COLUMNS = ("API", "Kind", "Status", "Replicas", "2xx", "4xx", "5xx", "p50", "p99", "Last deploy")


def api_rows(apis: list[dict[str, Any]]) -> str:
    """The overview's <tr>s; `data-sort` carries the value each column sorts by."""
    rows = []
    for a in apis:
        reps, reqs, lat = a.get("replicas", {}), a.get("requests", {}), a.get("latency_ms", {})
        name = a["name"]
        cells = [
            (name, f'<a href="/console/apis/{esc(name)}">{esc(name)}</a>', ""),
            (a.get("kind", "RealtimeAPI"), esc(a.get("kind", "RealtimeAPI")), ""),
            (a.get("status", ""), badge(a.get("status", "")), ""),
            (
                reps.get("ready", 0),
                f"{reps.get('ready', 0)}/{reps.get('requested', 0)}",
                "num",
            ),
            *[(reqs.get(c, 0), str(reqs.get(c, 0)), "num") for c in ("2xx", "4xx", "5xx")],
            *[
                (lat.get(q) if isinstance(lat.get(q), int | float) else -1, _ms(lat.get(q)), "num")
                for q in ("p50", "p99")
            ],
            (a.get("last_update") or 0, when(a.get("last_update")), ""),
        ]
        tds = "".join(
            f'<td class="{cls}" data-sort="{esc(key)}">{html}</td>' for key, html, cls in cells
        )
        rows.append(f"<tr>{tds}</tr>")
    if not rows:
        return f'<tr><td colspan="{len(COLUMNS)}" class="muted">No APIs yet.</td></tr>'
    return "".join(rows)


def overview(apis: list[dict[str, Any]]) -> str:
    heads = "".join(
        f'<th scope="col"><button type="button" data-col="{i}">{esc(c)}</button></th>'
        for i, c in enumerate(COLUMNS)
    )
    return (
        '<div class="toolbar"><label for="filter">Filter</label>'
        '<input id="filter" type="search" placeholder="name, status, kind">'
        '<span class="muted" aria-live="polite">Refreshes every 5 s; updated '
        '<span id="updated">now</span></span></div>'
        f'<div class="scroll"><table><caption class="muted">{len(apis)} APIs</caption>'
        f'<thead><tr>{heads}</tr></thead><tbody id="api-rows">{api_rows(apis)}</tbody>'
        "</table></div>"
    )


def bar_chart(title: str, bars: list[tuple[str, int, str]], summary: str) -> str:
    """Vertical bars as inline SVG: each bar is (label, value, tick under it or "").

    A bar carries its label and value in a <title> (a tooltip, read by screen
    readers) and in data-label/data-value; `summary` is the figure's text too."""
    w, h, pad = 560, 180, 42
    top = max((v for _, v, _ in bars), default=0) or 1
    step = (w - pad - 5) / max(len(bars), 1)
    rects = []
    for i, (label, value, _) in enumerate(bars):
        height = value / top * (h - pad - 10)
        rects.append(
            f'<rect x="{pad + i * step + 1:.1f}" y="{h - pad - height:.1f}" '
            f'width="{max(step - 2, 1):.1f}" height="{height:.1f}" fill="#0b5cad" '
            f'data-label="{esc(label)}" data-value="{value}">'
            f"<title>{esc(label)}: {value}</title></rect>"
        )
    ticks = "".join(
        f'<text x="{pad + i * step + step / 2:.1f}" y="{h - pad + 16}" font-size="15" '
        f'text-anchor="middle">{esc(tick)}</text>'
        for i, (_, _, tick) in enumerate(bars)
        if tick
    )
    return (
        f"<figure><figcaption>{esc(title)}</figcaption>"
        f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="{esc(summary)}">'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w}" y2="{h - pad}" stroke="#6e7781"/>'
        f'<text x="2" y="14" font-size="15">{top:g}</text>'
        f'<text x="2" y="{h - pad}" font-size="15">0</text>{"".join(rects)}{ticks}</svg>'
        f'<p class="muted">{esc(summary)}</p></figure>'
    )


def chart(
    title: str,
    points: list[dict[str, Any]],
    series: list[tuple[str, str, str]],
    marks: Sequence[tuple[float, str]] = (),
    totals: str = "",
) -> str:
    """A line chart as inline SVG; each series is (point key, label, colour); `marks`
    are (time, label) drawn as dashed vertical lines (scaling events)."""
    w, h, pad = 560, 180, 42
    values = [p.get(k) for p in points for k, _, _ in series]
    top = max([v for v in values if isinstance(v, int | float) and v > 0], default=1)
    n = max(len(points) - 1, 1)
    lines = []
    for key, _, colour in series:
        coords = [
            f"{pad + i * (w - pad - 5) / n:.1f},{h - pad - (p[key] / top) * (h - pad - 10):.1f}"
            for i, p in enumerate(points)
            if isinstance(p.get(key), int | float)
        ]
        if coords:
            lines.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                f'points="{" ".join(coords)}"/>'
            )
        if len(coords) <= 60:  # few points (a fresh API): dots, so one minute still shows
            for xy in coords:
                x, y = xy.split(",")
                lines.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{colour}"/>')
    if points and marks:
        t0, t1 = points[0]["t"], points[-1]["t"] + 60
        for at, why in marks:
            if t0 <= at < t1:
                x = pad + (at - t0) / (t1 - t0) * (w - pad - 5)
                lines.append(
                    f'<line x1="{x:.1f}" y1="5" x2="{x:.1f}" y2="{h - pad}" stroke="#57606a" '
                    f'stroke-dasharray="4 3"><title>{esc(why)}</title></line>'
                )
    legend = "".join(
        f'<span class="key"><span class="sw" style="background:{c}"></span>{esc(label)}</span>'
        for _, label, c in series
    )
    if marks:
        legend += '<span class="key">┆ scaling event</span>'
    label = f"{title}: maximum {top:g} over {len(points)} minutes"
    return (
        f"<figure><figcaption>{esc(title)}</figcaption>"
        f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="{esc(label)}">'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w}" y2="{h - pad}" stroke="#6e7781"/>'
        f'<line x1="{pad}" y1="5" x2="{pad}" y2="{h - pad}" stroke="#6e7781"/>'
        f'<text x="2" y="14" font-size="15">{top:g}</text>'
        f'<text x="2" y="{h - pad}" font-size="15">0</text>'
        f"{''.join(lines)}</svg><div>{legend}</div>"
        + (f'<p class="totals muted">{esc(totals)}</p>' if totals else "")
        + "</figure>"
    )
