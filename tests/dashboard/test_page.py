"""The page embeds its data so that no prompt can end or derail the <script> element holding it."""

import json
import re

from dashboard.page import json_for_script, render, script

HOSTILE = "<!--<script></script>&"


def _data_block(page: str) -> str:
    """The text between the data element's start tag and the first `</script` after it."""
    start = page.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    return page[start : page.index("</script", start)]


def test_json_for_script_escapes_by_hand():
    assert json_for_script({"p": "<a>&"}) == '{"p":"\\u003ca\\u003e\\u0026"}'
    assert json_for_script(["\u2028\u2029"]) == '["\\u2028\\u2029"]'


def test_json_for_script_round_trips():
    value = {"prompt": HOSTILE, "slash": "\\<", "line": "a\u2028b", "accent": "é", "n": [1, 2.5, None]}
    assert json.loads(json_for_script(value)) == value


def test_hostile_prompt_stays_inside_the_data_block():
    data = {"title": HOSTILE, "generated": "now", "evals": [], "runs": [], "prefs": [{"prompt": HOSTILE}]}
    page = render(data)
    block = _data_block(page)
    assert not re.search("[<>&]", block)
    assert json.loads(block) == data  # the whole payload, so the element really ended where it should
    assert page.count("</script>") == 2  # the data element's and the program's: no stray closing tag
    assert "<title>&lt;!--&lt;script&gt;&lt;/script&gt;&amp;</title>" in page


def test_the_program_is_the_packaged_js_file_inlined():
    """dashboard/dashboard.js (package data) is the page's program, inlined whole: nothing to fetch."""
    program = script()
    assert '"use strict";' in program and 'setAttribute("data-ready", "1")' in program
    page = render({"title": "t", "generated": "now", "evals": [], "runs": [], "prefs": []})
    assert f"<script>{program}</script>" in page
