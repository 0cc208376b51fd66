"""The dashboard's single HTML file: data as inline JSON, CSS and JS inline, images as data URIs.

Nothing is fetched: the page works from file:// with no network. The program (dashboard/dashboard.js,
package data) draws tables and SVG charts from the JSON that dashboard/build.py computed.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json

CSS = """
:root { --bg:#f4f5f7; --card:#fff; --ink:#1d2330; --muted:#6b7280; --line:#e5e7eb; --accent:#4f46e5;
        --good:#16a34a; --bad:#dc2626; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       background:var(--bg); color:var(--ink); }
header { background:linear-gradient(120deg,#1e1b4b,#4338ca); color:#fff; padding:18px 28px; }
header h1 { margin:0; font-size:20px; font-weight:600; }
header .sub { opacity:.75; font-size:12px; margin-top:4px; }
nav { position:sticky; top:0; z-index:5; background:#fff; border-bottom:1px solid var(--line);
      padding:8px 28px; display:flex; gap:16px; flex-wrap:wrap; }
nav a { color:var(--accent); text-decoration:none; font-weight:500; }
main { padding:18px 28px; max-width:1500px; }
.card { background:var(--card); border-radius:10px; box-shadow:0 1px 3px rgba(0,0,0,.08); padding:16px 18px;
        margin-bottom:18px; }
.card h2 { margin:0 0 10px; font-size:16px; }
.card h3 { margin:14px 0 6px; font-size:14px; color:var(--muted); font-weight:600; }
.kpis { display:flex; gap:12px; flex-wrap:wrap; margin-bottom:10px; }
.kpi { background:#eef2ff; border-radius:8px; padding:8px 12px; min-width:120px; }
.kpi b { display:block; font-size:18px; }
.kpi span { color:var(--muted); font-size:12px; }
.chosen { background:#ecfdf5; border-left:4px solid var(--good); padding:8px 12px; border-radius:6px; margin:8px 0; }
table { border-collapse:collapse; font-variant-numeric:tabular-nums; }
th, td { padding:5px 9px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:#f9fafb; font-weight:600; color:#374151; position:sticky; top:0; }
td.name, th.name { text-align:left; font-weight:600; }
td .ci { color:var(--muted); font-size:11px; margin-left:4px; }
td.sig-up { background:#dcfce7; } td.sig-down { background:#fee2e2; }
.controls { display:flex; gap:14px; align-items:center; margin:6px 0 10px; flex-wrap:wrap; color:var(--muted); }
select, input[type=text] { padding:4px 8px; border:1px solid #d1d5db; border-radius:6px; font:inherit; }
.scroll { overflow-x:auto; }
.grid td { vertical-align:top; text-align:center; }
.grid td.prompt { text-align:left; white-space:normal; max-width:260px; font-size:12px; }
.thumb { position:relative; display:inline-block; }
.thumb img { width:96px; height:96px; image-rendering:pixelated; border-radius:6px; display:block; }
.badge { position:absolute; left:4px; bottom:4px; background:rgba(17,24,39,.78); color:#fff; font-size:10px;
         padding:1px 5px; border-radius:8px; }
.badge.up { background:rgba(22,163,74,.9); } .badge.down { background:rgba(220,38,38,.9); }
.grid .cell { display:flex; gap:6px; align-items:flex-start; }
.reasoning { max-width:220px; max-height:96px; overflow:auto; text-align:left; white-space:pre-wrap; font-size:11px;
             background:#f9fafb; border:1px solid var(--line); border-radius:6px; padding:3px 6px; color:#374151; }
.cot-tag { background:#fef3c7; color:#92400e; font-size:10px; font-weight:600; padding:1px 5px; border-radius:8px;
           margin-left:6px; }
.cot-summary p { margin:6px 0; } .cot-summary span.sig-up { background:#dcfce7; }
.cot-summary span.sig-down { background:#fee2e2; }
.charts { display:flex; flex-wrap:wrap; gap:14px; }
.chart { border:1px solid var(--line); border-radius:8px; padding:6px 8px; background:#fff; }
.chart .title { font-size:12px; font-weight:600; color:#374151; }
.legend { display:flex; gap:12px; flex-wrap:wrap; font-size:12px; color:var(--muted); margin:4px 0; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:4px; }
.pairs { display:flex; flex-wrap:wrap; gap:12px; }
.pair { border:1px solid var(--line); border-radius:8px; padding:8px; width:260px; font-size:12px; }
.pair .imgs { display:flex; gap:6px; } .pair img { width:120px; height:120px; border-radius:6px; }
.pair .lbl { font-size:11px; color:var(--muted); } .warn { color:var(--bad); font-weight:600; }
.muted { color:var(--muted); }
"""


# Characters that may not appear raw inside <script>: `<` can open `</script>` or `<!--<script>`, which
# switches the HTML tokenizer into a state where the real closing tag is missed; `>` and `&` for good
# measure. Each becomes a JSON \uXXXX escape, which JSON.parse turns back into the same character (they
# only ever occur inside JSON strings). ensure_ascii escapes every non-ASCII character, U+2028/U+2029
# (line ends in older JavaScript) and lone surrogates (not encodable as UTF-8) included.
SCRIPT_UNSAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def json_for_script(data: object) -> str:
    """`data` as JSON text that is safe as the content of a <script type="application/json"> element."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True).translate(SCRIPT_UNSAFE)


@functools.cache
def script() -> str:
    """The text of dashboard/dashboard.js, checked to be safe to inline in a <script> element."""
    text = importlib.resources.files("dashboard").joinpath("dashboard.js").read_text(encoding="utf-8")
    lowered = text.lower()
    # Either sequence would end the element early or put the HTML tokenizer in a state that misses its end.
    if "</script" in lowered or "<!--" in lowered:
        raise ValueError("dashboard/dashboard.js must not contain '</script' or '<!--': it is inlined in the page")
    return text


def render(data: dict) -> str:
    """The whole page as one string."""
    payload = json_for_script(data)  # read back by the script with JSON.parse(textContent)
    title = html.escape(data["title"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>{CSS}</style></head>
<body>
<header><h1>{title}</h1><div class="sub">generated {html.escape(data["generated"])} ·
static page, no network</div></header>
<nav id="nav"></nav>
<main id="main"><p class="muted">Loading… (JavaScript is required to draw the tables and charts.)</p></main>
<script id="data" type="application/json">{payload}</script>
<script>{script()}</script>
</body></html>
"""
