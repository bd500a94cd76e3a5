"""The dashboard (`/dashboard`) in a real browser: Debian's Chromium driven by playwright-core
(tests/sdk/js/lib/browser.mjs), against the suite's server with real sandboxes made by the
official SDK. Screenshots are kept under $ALCOVE_TEST_ARTIFACTS/dashboard."""

import os
from pathlib import Path

import pytest
from e2b import Sandbox

from browser import Browser

ARTIFACTS = Path(os.environ.get("ALCOVE_TEST_ARTIFACTS", "/tmp/alcove-test-artifacts")) / "dashboard"
# Metadata a caller wrote: the page must show it as text, never run it.
XSS = "<img src=x onerror=document.title='owned'>"


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def test_sign_in_filter_and_kill_from_the_dashboard(browser, run_id):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    sbx = Sandbox.create(metadata={"run": run_id, "note": XSS}, timeout=300)
    base = os.environ["E2B_API_URL"]
    try:
        r = browser.ok(cmd="goto", url=f"{base}/dashboard")
        assert r["title"].startswith("Sign in"), r
        # A wrong key is refused on the page, saying what to do.
        browser.ok(cmd="fill", selector="#api_key", value="e2b_" + "0" * 40)
        browser.ok(cmd="click", selector="form.signin button")
        assert "not valid" in browser.ok(cmd="text")["text"]
        browser.ok(cmd="fill", selector="#api_key", value=os.environ["E2B_API_KEY"])
        r = browser.ok(cmd="click", selector="form.signin button")
        assert r["url"].endswith("/dashboard/sandboxes"), r
        # This run's sandbox, by its metadata: listed, its metadata shown as text.
        browser.ok(cmd="fill", selector="#metadata", value=f"run={run_id}")
        r = browser.ok(cmd="click", selector="form.filters button")
        assert r["title"].startswith("Sandboxes"), r
        page = browser.ok(cmd="text", selector="table")["text"]
        assert sbx.sandbox_id in page and XSS in page, page
        assert "owned" not in r["title"]
        browser.ok(cmd="screenshot", path=str(ARTIFACTS / "sandboxes.png"))
        # Killed from the page: gone for the SDK too.
        browser.ok(cmd="click", selector=f'button[aria-label="Kill sandbox {sbx.sandbox_id}"]')
        assert f"Killed {sbx.sandbox_id}." in browser.ok(cmd="text")["text"]
        assert not sbx.is_running()
        browser.ok(cmd="screenshot", path=str(ARTIFACTS / "killed.png"))
        # Signed out: back at the sign-in page, and the list asks for it again.
        r = browser.ok(cmd="click", selector="form.signout button")
        assert r["title"].startswith("Sign in"), r
        r = browser.ok(cmd="goto", url=f"{base}/dashboard/sandboxes")
        assert r["title"].startswith("Sign in"), r
    finally:
        try:
            sbx.kill()
        except Exception:
            pass
