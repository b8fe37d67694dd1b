"""The console's numbers against the CLI's, in a real browser (issue 18).

Traffic of known shape (2xx, 4xx, 429s past a key's quota) goes to a user's APIs;
the overview, the API page's charts and the usage page must show what
`kiln get NAME -o json` and `kiln usage -o json` (subprocesses, the user's key)
say. Also: the try-it body built from the API's signature, the regression
tracker's histogram, and each page at phone width. Screenshots go to the folder
printed at the start (shared with test_console.py through KILN_CONSOLE_SHOTS).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import test_console
from daemon import Daemon
from support import write

HANDLERS = """
class Echo:
    def predict(self, payload, context):
        return {"echo": payload}


class Score:
    def predict(self, payload, context):
        return {"value": float(payload)}
"""

SHOTS = test_console.SHOTS
browser = test_console.browser  # the same module-scoped chromium fixture, one per module

PROJECT = """- kind: deployment
  name: app
- kind: api
  name: echo
  python:
    handler: h.py:Echo
    signature:
      inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
- kind: api
  name: score
  python: {handler: h.py:Score}
  tracker: {model_type: regression, key: value}
"""


@pytest.fixture(scope="module")
def carol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A server with user carol (plan free) and her two APIs, deployed with her key."""
    root = tmp_path_factory.mktemp("console-usage")
    d = Daemon(root / "home")
    d.start()
    made = d.kiln("users", "create", "carol", "-o", "json")
    assert made.returncode == 0, made.stderr
    key = orjson.loads(made.stdout)["key"]
    write(root / "carol" / "h.py", HANDLERS)
    write(root / "carol" / "kiln.yaml", PROJECT)
    env = {**d.env, "KILN_API_KEY": key}
    deployed = d.kiln_env(env, "deploy", str(root / "carol"))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    d.key = key  # type: ignore[attr-defined]
    d.user_env = env  # type: ignore[attr-defined]
    yield d
    d.stop()


def _cli_json(d: Daemon, *args: str) -> Any:
    done = d.kiln_env(d.user_env, *args, "-o", "json")  # type: ignore[attr-defined]
    assert done.returncode == 0, done.stdout + done.stderr
    return orjson.loads(done.stdout)


def _sign_in(browser: Any, base: str, key: str, width: int = 1280, height: int = 800) -> Any:
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.goto(f"{base}/console/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/console")
    return page


def test_the_charts_numbers_match_kiln_get_and_kiln_usage(browser: Any, carol: Daemon) -> None:
    key, base = carol.key, carol.management_url  # type: ignore[attr-defined]
    url = f"{carol.url}/carol/echo"
    # A key with a quota of 3: its 4th and 5th calls are refused (429, never metered).
    limited = httpx.post(
        f"{base}/keys", json={"name": "limited", "quota": 3}, headers={"x-api-key": key}
    ).json()
    codes = [
        httpx.post(url, json={"x": [1, 2, 3, 4]}, headers={"x-api-key": limited["key"]}).status_code
        for _ in range(5)
    ]
    assert codes == [200, 200, 200, 429, 429]
    mine = {"x-api-key": key}
    for _ in range(4):
        assert httpx.post(url, json={"x": [0, 0, 0, 0]}, headers=mine).status_code == 200
    for _ in range(2):  # not JSON: the API answers 400, a metered 4xx
        bad = httpx.post(url, content=b"{", headers={**mine, "content-type": "application/json"})
        assert bad.status_code == 400

    detail = _cli_json(carol, "get", "carol.echo")
    # The API answered every request (the 429s too); usage meters only admitted calls.
    assert detail["requests"] == {"2xx": 7, "4xx": 4, "5xx": 0}

    page = _sign_in(browser, base, key)
    row = page.locator("#api-rows tr", has_text="carol.echo")
    cells = row.locator("td").all_inner_texts()
    assert cells[4:7] == [str(detail["requests"][c]) for c in ("2xx", "4xx", "5xx")]

    page.goto(f"{base}/console/apis/carol.echo?window=15m")
    totals = page.locator("figure .totals").first.inner_text()
    assert totals == "Requests in this window: " + ", ".join(
        f"{c} {detail['requests'][c]}" for c in ("2xx", "4xx", "5xx")
    )
    # The try-it body is built from the signature (x FP32 [-1, 4]) and it works.
    body = page.get_by_label("Request body (JSON)")
    assert orjson.loads(body.input_value()) == {"x": [[0.0, 0.0, 0.0, 0.0]]}
    page.screenshot(path=str(SHOTS / "api-carol.png"), full_page=True)
    page.get_by_role("button", name="Send").click()
    assert page.locator("#try-result").inner_text().startswith("HTTP 200 in ")
    assert orjson.loads(page.get_by_label("Answer").inner_text()) == {
        "echo": {"x": [[0.0, 0.0, 0.0, 0.0]]}
    }

    usage = _cli_json(carol, "usage")  # after the try-it call, which is metered too
    page.goto(f"{base}/console/usage")
    per_api = {
        r[0]: r[1:]
        for r in (
            tr.locator("td").all_inner_texts()
            for tr in page.locator("table", has=page.locator("caption", has_text="per API"))
            .locator("tbody tr")
            .all()
        )
    }
    expected: dict[str, list[int]] = {}
    for r in usage["usage"]:
        t = expected.setdefault(r["api"], [0, 0, 0, 0])
        t[0] += r["calls"]
        for i, c in enumerate(("2xx", "4xx", "5xx"), 1):
            t[i] += r["by_status"].get(c, 0)
    assert per_api == {api: [str(n) for n in t] for api, t in expected.items()}
    assert expected["carol.echo"] == [10, 8, 2, 0]  # the 429s are not metered calls

    keys = {k["key_id"]: k for k in usage["keys"]}
    assert keys[limited["id"]]["quota_left"] == 0 and keys[limited["id"]]["refused_429"] == 2
    key_row = page.locator("tr", has_text=limited["id"]).first.locator("td").all_inner_texts()
    assert key_row[4:8] == ["3", "2", "3", "0"]  # calls, 429, quota, quota left

    today = dt.datetime.now(dt.UTC).date().isoformat()
    bar = page.locator(f'rect[data-label="{today}"]')
    by_day = {d["date"]: d["calls"] for d in usage["days"]}
    assert bar.get_attribute("data-value") == str(by_day[today]) == str(usage["total"])
    assert page.locator("rect[data-label]").count() >= 28  # every day of the month
    plan = page.locator("#plan").inner_text()
    assert "free" in plan and str(usage["plan"]["calls_per_month"]) in plan
    assert usage["plan"]["calls_left"] == 1000 - usage["total"]
    page.screenshot(path=str(SHOTS / "usage-carol.png"), full_page=True)
    page.context.close()


def test_a_regression_tracker_shows_a_histogram(browser: Any, carol: Daemon) -> None:
    key, base = carol.key, carol.management_url  # type: ignore[attr-defined]
    values = [1.0] * 5 + [5.0] * 3 + [10.0] * 2
    for v in values:
        assert httpx.post(f"{carol.url}/carol/score", json=v, headers={"x-api-key": key}).is_success
    tracker = _cli_json(carol, "get", "carol.score")["tracker"]
    assert tracker["count"] == len(values) and sum(tracker["histogram"]["counts"]) == len(values)
    page = _sign_in(browser, base, key)
    page.goto(f"{base}/console/apis/carol.score")
    bars = page.locator("rect[data-label]")
    counts = [int(bars.nth(i).get_attribute("data-value") or 0) for i in range(bars.count())]
    assert counts == tracker["histogram"]["counts"]
    assert counts[0] == 5 and counts[-1] == 2 and sum(counts) == 10
    assert "10 predicted values in 20 bins" in page.locator("main").inner_text()
    page.screenshot(path=str(SHOTS / "api-regression.png"), full_page=True)
    page.context.close()


def test_pages_fit_a_phone(browser: Any, carol: Daemon) -> None:
    """At 390x844 no page is wider than the screen (tables scroll inside their box)."""
    key, base = carol.key, carol.management_url  # type: ignore[attr-defined]
    page = _sign_in(browser, base, key, 390, 844)
    for path, shot in (
        ("/console", "overview"),
        ("/console/apis/carol.echo", "api"),
        ("/console/usage", "usage"),
        ("/console/keys", "keys"),
    ):
        page.goto(f"{base}{path}")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{path} is {width} px wide on a 390 px phone"
        page.screenshot(path=str(SHOTS / f"{shot}-phone.png"), full_page=True)
    # Keyboard: the first Tab offers to skip the header, the next reaches its first link.
    page.goto(f"{base}/console")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "APIs"
    page.context.close()


def test_the_usage_answer_is_in_the_openapi_document(carol: Daemon) -> None:
    doc = httpx.get(f"{carol.management_url}/openapi.json", headers=carol.auth).json()
    schema = doc["paths"]["/usage"]["get"]["responses"]["200"]["content"]["application/json"]
    assert {"days", "keys", "plan", "usage"} <= set(schema["schema"]["properties"])


# ---- without a browser ----------------------------------------------------------------


def test_a_body_from_the_signature() -> None:
    from kiln.console.try_it import body_from_signature

    assert body_from_signature([{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]) == (
        '{"x": [[0.0, 0.0, 0.0, 0.0]]}'
    )
    two = [
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
        {"name": "mask", "datatype": "BOOL", "shape": [2, 2]},
        {"name": "ids", "datatype": "INT64", "shape": [1]},
    ]
    assert orjson.loads(body_from_signature(two) or "") == {
        "text": ["text"],
        "mask": [[False, False], [False, False]],
        "ids": [0],
    }
    assert body_from_signature([]) is None  # no signature: the plain sample stays


def test_the_regression_histogram_regroups_the_stored_bins() -> None:
    from kiln.control.durable import linear_histogram
    from kiln.control.store.histogram import bin_counts

    values = [0.0] * 3 + [5.0] * 2 + [10.0]
    hist = linear_histogram(bin_counts(values), 0.0, 10.0, n=10)
    assert hist["counts"] == [3, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert hist["edges"][0] == 0.0 and hist["edges"][-1] == 10.0 and len(hist["edges"]) == 11
    same = linear_histogram(bin_counts([2.5] * 4), 2.5, 2.5)
    assert same == {"edges": [2.5, 2.5], "counts": [4]}
    assert linear_histogram({}, None, None) == {"edges": [], "counts": []}
