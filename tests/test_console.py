"""The web console (issue 18) in a real browser: Debian's chromium driven by Playwright.

Sign-in with a user's key against `kiln server`, what a session sees, CSRF, Host
checks, keys through the console, the audit log; `kiln serve` without sign-in.
Screenshots go to a folder printed at the start (look at them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from daemon import Daemon
from support import KilnServer, write

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("KILN_CONSOLE_SHOTS") or tempfile.mkdtemp(prefix="kiln-console-"))

HANDLER = """
class Echo:
    def predict(self, payload, context):
        print("echoing", payload, flush=True)
        return {"owner": OWNER, "echo": payload}
"""


def _project(folder: Path, owner: str) -> Path:
    write(folder / "h.py", f"OWNER = {owner!r}\n" + HANDLER)
    write(
        folder / "kiln.yaml",
        "- kind: deployment\n  name: app\n"
        f"- kind: api\n  name: {owner}-echo\n  python: {{handler: h.py:Echo}}\n"
        "  tracker: {model_type: classification, key: echo}\n",
    )
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One chromium for this module (Debian's; Playwright's own download cannot work).

    Module-scoped, not session-scoped: Playwright's sync API runs an event loop in the
    main thread while it is open, and every later test's asyncio.run() would fail."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        message = "chromium is missing: run scripts/system-packages.sh (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is missing: pip install -e '.[test]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    print(f"\nconsole screenshots: {SHOTS}")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chrome
        chrome.close()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("console")
    d = Daemon(root / "home")
    d.start()
    keys = {"admin": d.admin_key}
    for user in ("alice", "bob"):
        made = d.kiln("users", "create", user, "-o", "json")
        assert made.returncode == 0, made.stderr
        keys[user] = orjson.loads(made.stdout)["key"]
        env = {**d.env, "KILN_API_KEY": keys[user]}
        deployed = d.kiln_env(env, "deploy", str(_project(root / user, user)))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    d.keys = keys  # type: ignore[attr-defined]
    yield d
    d.stop()


def _sign_in(browser: Any, base: str, key: str) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(f"{base}/console")
    assert page.url.endswith("/console/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/console")
    return page


def test_a_user_signs_in_and_sees_only_their_apis(browser: Any, platform: Daemon) -> None:
    base = platform.management_url
    page = _sign_in(browser, base, platform.keys["alice"])  # type: ignore[attr-defined]
    rows = page.locator("#api-rows tr")
    names = [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())]
    assert names == ["alice.alice-echo"]
    assert "bob" not in page.content()
    assert page.locator("#api-rows .badge").first.inner_text() == "live"
    port = base.rsplit(":", 1)[1]
    cookie = next(c for c in page.context.cookies() if c["name"] == f"kiln_console_{port}")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.screenshot(path=str(SHOTS / "overview-alice.png"), full_page=True)

    # Traffic shows up in the live table without a reload (the 5 s fragment refresh).
    alice = {"x-api-key": platform.keys["alice"]}  # type: ignore[attr-defined]
    for _ in range(3):
        assert httpx.post(f"{platform.url}/alice/alice-echo", json="hi", headers=alice).is_success
    from playwright.sync_api import expect

    expect(page.locator("#api-rows td:nth-child(5)").first).to_have_text("3", timeout=15_000)

    # Filtering hides rows in the page.
    page.get_by_label("Filter").fill("nothing-matches")
    assert page.locator("#api-rows tr:visible").count() == 0

    # Another user's API page answers like a missing one (REST's 404).
    other = page.goto(f"{base}/console/apis/bob.bob-echo")
    assert other is not None and other.status == 404
    mine = page.goto(f"{base}/console/apis/alice.alice-echo?window=15m")
    assert mine is not None and mine.status == 200
    assert page.locator("figure svg[role=img]").count() == 4
    # The 3 answers of this minute, per second, are the requests chart's peak.
    label = page.locator("figure svg[role=img]").first.get_attribute("aria-label")
    assert label == "Requests per second: maximum 0.05 over 15 minutes"
    # The tracker's classes as bars; the log tail holds the API's lines.
    assert page.locator(".bar").all_inner_texts() == ["hi\n3"]
    assert page.locator("#log-tail").inner_text().strip()
    tail = page.request.get(f"{base}/console/fragment/logs/alice.alice-echo")
    assert tail.status == 200 and tail.text().strip()
    assert page.request.get(f"{base}/console/fragment/logs/bob.bob-echo").status == 404
    page.screenshot(path=str(SHOTS / "api-alice.png"), full_page=True)

    # Try it: the body goes to the API with the session's key; status, latency, answer.
    page.get_by_label("Request body (JSON)").fill('"ping"')
    page.get_by_role("button", name="Send").click()
    result = page.locator("#try-result").inner_text()
    assert result.startswith("HTTP 200 in ") and result.endswith(" ms")
    answer = orjson.loads(page.get_by_label("Answer").inner_text())
    assert answer == {"owner": "alice", "echo": "ping"}
    assert f"curl -X POST '{platform.url}/alice/alice-echo'" in page.content()

    # The phone layout still shows the table (it scrolls sideways).
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{base}/console")
    page.screenshot(path=str(SHOTS / "overview-phone.png"), full_page=True)
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{base}/console/login")
    page.context.close()


def test_forms_need_the_csrf_token_and_the_host_must_be_this_server(
    browser: Any, platform: Daemon
) -> None:
    base = platform.management_url
    page = _sign_in(browser, base, platform.keys["bob"])  # type: ignore[attr-defined]
    forged = page.request.post(f"{base}/console/keys", form={"name": "sneaky"})
    assert forged.status == 403 and "CSRF" in forged.text()
    (cookie,) = [c for c in page.context.cookies() if c["name"].startswith("kiln_console_")]
    jar = {cookie["name"]: cookie["value"]}
    # The same session through another Host name (a DNS-rebinding page) is refused.
    rebound = httpx.get(f"{base}/console", cookies=jar, headers={"Host": "evil.example:80"})
    assert rebound.status_code == 403 and "evil.example" in rebound.text
    # A cross-origin POST is refused even with a token-shaped field.
    cross = httpx.post(
        f"{base}/console/keys",
        cookies=jar,
        data={"name": "x", "csrf": "x"},
        headers={"Origin": "http://evil.example"},
    )
    assert cross.status_code == 403
    keys = httpx.get(f"{base}/keys", headers={"x-api-key": platform.keys["bob"]}).json()  # type: ignore[attr-defined]
    assert "sneaky" not in {k["name"] for k in keys["keys"]}
    page.context.close()


def _curl(url: str, key: str) -> int:
    """The HTTP status curl gets for a POST with `key` (the real client the issue names)."""
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", url]
        + ["-H", f"x-api-key: {key}", "-H", "content-type: application/json", "-d", '"hi"'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(done.stdout or 0)


def test_keys_made_in_the_console_work_and_are_audited(browser: Any, platform: Daemon) -> None:
    base = platform.management_url
    page = _sign_in(browser, base, platform.keys["alice"])  # type: ignore[attr-defined]
    page.goto(f"{base}/console/keys")
    page.get_by_label("New key name").fill("from-console")
    page.get_by_role("button", name="Create key").click()
    new_key = page.locator("#new-key").inner_text()
    assert len(new_key) > 20
    page.screenshot(path=str(SHOTS / "keys-alice.png"), full_page=True)
    url = f"{platform.url}/alice/alice-echo"
    assert _curl(url, new_key) == 200  # the key as the console showed it, with curl
    page.reload()
    assert new_key not in page.content()  # shown once
    row = page.locator("tr", has_text="from-console")
    key_id = row.locator("td").first.inner_text()
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"disable key {key_id}").click()
    page.wait_for_selector(f"text=Key {key_id} disabled.")
    # A disabled key stops working within a second (accounts.py): 403, with curl.
    deadline = time.monotonic() + 5
    status = _curl(url, new_key)
    while status == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = _curl(url, new_key)
    assert status == 403
    page.context.close()

    admin = _sign_in(browser, base, platform.keys["admin"])  # type: ignore[attr-defined]
    admin.goto(f"{base}/console/audit")
    text = admin.locator("tbody").inner_text()
    assert "key created" in text and "key disabled" in text and key_id in text
    assert "alice" in text
    admin.screenshot(path=str(SHOTS / "audit-admin.png"), full_page=True)
    names = admin.locator("#api-rows tr td:first-child")
    admin.goto(f"{base}/console")
    assert {"alice.alice-echo", "bob.bob-echo"} <= set(names.all_inner_texts())
    admin.context.close()
    # A user's session has no audit page.
    bob = _sign_in(browser, base, platform.keys["bob"])  # type: ignore[attr-defined]
    response = bob.goto(f"{base}/console/audit")
    assert response is not None and response.status == 404
    bob.context.close()


def test_keys_enable_rotate_delete_each_confirmed(browser: Any, platform: Daemon) -> None:
    keys = platform.keys  # type: ignore[attr-defined]
    base, url = platform.management_url, f"{platform.url}/bob/bob-echo"
    page = _sign_in(browser, base, keys["bob"])
    page.goto(f"{base}/console/keys")
    page.get_by_label("New key name").fill("to-rotate")
    page.get_by_role("button", name="Create key").click()
    first = page.locator("#new-key").inner_text()
    row = page.locator("tr", has_text="to-rotate")
    key_id = row.locator("td").first.inner_text()

    def act(action: str, answer: bool = True) -> list[str]:
        asked: list[str] = []

        def on_dialog(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.accept() if answer else dialog.dismiss()

        page.once("dialog", on_dialog)
        page.locator("tr", has_text="to-rotate").get_by_role(
            "button", name=f"{action} key {key_id}"
        ).click()
        page.wait_for_load_state()
        return asked

    assert act("disable") == [f"Disable key {key_id}?"]
    page.wait_for_selector(f"text=Key {key_id} disabled.")
    assert act("enable") == [f"Enable key {key_id}?"]
    page.wait_for_selector(f"text=Key {key_id} enabled.")
    assert httpx.post(url, json="hi", headers={"x-api-key": first}).status_code == 200
    assert act("rotate") == [f"Rotate key {key_id}?"]
    second = page.locator("#new-key").inner_text()
    assert second != first
    assert httpx.post(url, json="hi", headers={"x-api-key": second}).status_code == 200
    for _ in range(20):  # the old secret stops working within a second
        if httpx.post(url, json="hi", headers={"x-api-key": first}).status_code in (401, 403):
            break
        page.wait_for_timeout(250)
    assert httpx.post(url, json="hi", headers={"x-api-key": first}).status_code in (401, 403)
    rotated_id = page.locator("tr", has_text="to-rotate").locator("td").first.inner_text()
    key_id = rotated_id
    assert act("delete", answer=False) == [f"Delete key {key_id}?"]  # dismissed: kept
    assert page.locator("tr", has_text="to-rotate").count() == 1
    act("delete")
    page.wait_for_selector(f"text=Key {key_id} deleted.")
    assert page.locator("tr", has_text="to-rotate").count() == 0
    page.context.close()


def test_the_overview_sorts_by_a_column(browser: Any, platform: Daemon) -> None:
    base = platform.management_url
    page = _sign_in(browser, base, platform.keys["admin"])  # type: ignore[attr-defined]
    header = page.get_by_role("button", name="API", exact=True)
    names = page.locator("#api-rows tr td:first-child")
    header.click()
    ascending = names.all_inner_texts()
    assert ascending == sorted(ascending) and len(ascending) >= 2
    assert page.locator("th[aria-sort=ascending]").count() == 1
    header.press("Enter")  # keyboard works too
    assert names.all_inner_texts() == sorted(ascending, reverse=True)
    page.context.close()


def test_usage_and_server_pages_show_what_rest_answers(browser: Any, platform: Daemon) -> None:
    keys = platform.keys  # type: ignore[attr-defined]
    base = platform.management_url
    bob = {"x-api-key": keys["bob"]}
    for _ in range(2):
        assert httpx.post(f"{platform.url}/bob/bob-echo", json="hi", headers=bob).is_success
    usage = httpx.get(f"{base}/usage", headers=bob).json()
    expected = sum(r["calls"] for r in usage["usage"] if r["api"] == "bob.bob-echo")
    assert expected >= 2
    page = _sign_in(browser, base, keys["bob"])
    page.goto(f"{base}/console/usage")
    per_api = page.locator("table", has=page.locator("caption", has_text="per API"))
    row = per_api.locator("tr", has_text="bob.bob-echo")
    assert row.locator("td").nth(1).inner_text() == str(expected)
    assert "alice" not in page.locator("main").inner_text()
    page.screenshot(path=str(SHOTS / "usage-bob.png"), full_page=True)
    response = page.goto(f"{base}/console/server")
    assert response is not None and response.status == 404  # the admin's page
    page.context.close()

    admin = _sign_in(browser, base, keys["admin"])
    admin.goto(f"{base}/console/server")
    users = admin.locator("table").nth(1).locator("tbody tr td:first-child").all_inner_texts()
    assert {"alice", "bob"} <= set(users)
    version = httpx.get(f"{base}/server", headers={"x-api-key": keys["admin"]}).json()["version"]
    assert version in admin.locator("table").first.inner_text()
    admin.screenshot(path=str(SHOTS / "server-admin.png"), full_page=True)
    admin.context.close()


def test_a_session_ends_when_its_key_is_disabled(browser: Any, platform: Daemon) -> None:
    keys = platform.keys  # type: ignore[attr-defined]
    base = platform.management_url
    made = httpx.post(
        f"{base}/keys",
        json={"name": "bob-console", "scope": "manage"},
        headers={"x-api-key": keys["bob"]},
    )
    assert made.status_code == 201, made.text
    page = _sign_in(browser, base, made.json()["key"])
    assert page.locator("#api-rows td").first.inner_text() == "bob.bob-echo"
    disabled = httpx.post(
        f"{base}/keys/{made.json()['id']}/disable", headers={"x-api-key": keys["admin"]}
    )
    assert disabled.status_code == 200, disabled.text
    for _ in range(20):  # a disabled key stops working within a second
        page.goto(f"{base}/console")
        if page.url.endswith("/console/login"):
            break
        page.wait_for_timeout(250)
    assert page.url.endswith("/console/login")
    page.context.close()


PREDICTOR = """
import time

class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload, batch_id):
        time.sleep(0.3)
        if 5 in payload:
            raise ValueError("cannot score item 5")
        return payload
"""


def test_kiln_serve_needs_no_sign_in_but_keeps_csrf_and_shows_jobs(
    browser: Any, tmp_path: Path
) -> None:
    write(tmp_path / "h.py", "OWNER = 'me'\n" + HANDLER)
    write(tmp_path / "predictor.py", PREDICTOR)
    write(
        tmp_path / "kiln.yaml",
        "- kind: api\n  name: echo\n  python: {handler: h.py:Echo}\n"
        "- kind: BatchAPI\n  name: scorer\n  predictor: {type: python, path: predictor.py}\n"
        "  jobs: {visibility_timeout: 1}\n",
    )
    server = KilnServer(tmp_path, tmp_path / "home")
    try:
        base = server.management_url
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        response = page.goto(f"{base}/console")
        assert response is not None and response.status == 200
        names = page.locator("#api-rows tr td:first-child").all_inner_texts()
        assert sorted(names) == ["echo", "scorer"]
        forged = page.request.post(f"{base}/console/keys", form={"name": "x"})
        assert forged.status == 403
        page.screenshot(path=str(SHOTS / "overview-serve.png"), full_page=True)

        spec = {"workers": 1, "item_list": {"items": list(range(8)), "batch_size": 2}}
        job = httpx.post(f"{base}/apis/scorer/jobs", json=spec, timeout=30)
        assert job.status_code in (200, 201), job.text
        job_id = job.json()["job_id"]
        page.goto(f"{base}/console/apis/scorer")
        page.screenshot(path=str(SHOTS / "jobs-serve.png"), full_page=True)
        page.get_by_role("link", name=job_id).click()
        status = ""
        for _ in range(120):  # follow the job to its end (the page reloads itself)
            status = page.locator("tr", has_text="Status").locator("td").inner_text()
            if status not in ("enqueuing", "running", "pending"):
                break
            page.wait_for_timeout(500)
            page.reload()
        final = httpx.get(f"{base}/apis/scorer/jobs/{job_id}").json()
        assert status == final["job_status"]["status_text"] != "running"
        bar = page.get_by_label("batches")
        assert bar.get_attribute("max") == "4"
        assert bar.get_attribute("value") == str(final["progress"]["batches_done"])
        assert "cannot score item 5" in page.locator("main").inner_text()
        page.screenshot(path=str(SHOTS / "job-serve.png"), full_page=True)
        context.close()
    finally:
        server.stop()


# ---- the guard's rules, without a browser ------------------------------------------------


def test_host_names_and_the_allowed_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.console.guard import allowed_hosts, check_host, host_name
    from kiln.errors import Forbidden

    assert host_name("Example.COM:8081") == "example.com"
    assert host_name("[::1]:8081") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1"
    monkeypatch.delenv("KILN_CONSOLE_HOSTS", raising=False)
    wildcard = allowed_hosts("0.0.0.0", "10.1.2.3")
    assert wildcard == {"localhost", "127.0.0.1", "::1", "10.1.2.3"}
    check_host("10.1.2.3:8081", wildcard)
    with pytest.raises(Forbidden, match="KILN_CONSOLE_HOSTS"):
        check_host("rebound.evil.example:8081", wildcard)
    with pytest.raises(Forbidden):
        check_host(None, wildcard)
    monkeypatch.setenv("KILN_CONSOLE_HOSTS", "kiln.example.com, other.example")
    check_host("kiln.example.com", allowed_hosts("127.0.0.1", None))


def test_origin_rules_for_a_post() -> None:
    from kiln.console.guard import check_origin
    from kiln.errors import Forbidden

    check_origin({"host": "127.0.0.1:8081", "origin": "http://127.0.0.1:8081"}, "http")
    check_origin({"host": "127.0.0.1:8081"}, "http")  # no Origin: the CSRF token decides
    for headers in (
        {"host": "127.0.0.1:8081", "origin": "http://evil.example"},
        {"host": "127.0.0.1:8081", "origin": "null"},
        {"host": "127.0.0.1:8081", "sec-fetch-site": "cross-site"},
    ):
        with pytest.raises(Forbidden):
            check_origin(headers, "http")


def test_sessions_expire_when_idle_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.console import guard

    now = [1000.0]
    sessions = guard.Sessions(clock=lambda: now[0])
    first = sessions.new()
    assert sessions.get(first.sid) is first and sessions.get("forged") is None
    now[0] += guard.IDLE_S + 1
    assert sessions.get(first.sid) is None
    monkeypatch.setattr(guard, "MAX_SESSIONS", 3)
    made = [sessions.new() for _ in range(5)]
    assert [sessions.get(s.sid) is not None for s in made] == [False, False, True, True, True]
    made[2].signed_in = True  # a flood of new sessions pushes out the others first
    flood = [sessions.new() for _ in range(4)]
    assert sessions.get(made[2].sid) is made[2]
    assert [sessions.get(s.sid) is not None for s in flood] == [False, False, True, True]
    renewed = sessions.renew(made[-1])
    assert renewed.sid != made[-1].sid and renewed.csrf != made[-1].csrf
    assert sessions.get(made[-1].sid) is None
    header = guard.cookie_header(renewed.sid)
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/console" in header
