"""Headless Chromium for the fleet page's tests: Debian's chromium and chromium-driver, driven by
Selenium (no browser download), and a small page object that reads through scripts, because the
page redraws itself every 2 seconds and an element found in one call may be gone in the next."""

from __future__ import annotations

import shutil
import time
from typing import Any

from tests.conftest import REPO, wait_for

SHOTS = REPO / "test-artifacts" / "ui"  # screenshots for a person to look at (gitignored)
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser() -> Any:
    assert CHROMIUM and DRIVER, "apt-get install -y chromium chromium-driver (Debian's, no browser download)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1360,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(DRIVER))


class Page:
    def __init__(self, driver: Any, base: str) -> None:
        self.d, self.base = driver, base

    def css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.d.find_elements(By.CSS_SELECTOR, selector))

    def text(self) -> str:
        return str(self.d.execute_script("return document.body.innerText"))

    def text_of(self, selector: str) -> str:
        """The text of the first element matching ``selector`` ("" if none), read in one script:
        the page redraws every 2 s, so an element found in one call may be gone in the next."""
        return str(self.d.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : ''", selector))

    def count(self, selector: str) -> int:
        return int(self.d.execute_script("return document.querySelectorAll(arguments[0]).length", selector))

    def click(self, selector: str) -> None:
        """A real click on the element, found again if a redraw replaced it in between."""
        from selenium.common.exceptions import StaleElementReferenceException

        for _ in range(10):
            try:
                self.css(selector)[0].click()
                return
            except (StaleElementReferenceException, IndexError):
                time.sleep(0.1)
        raise AssertionError(f"could not click {selector}")

    def go(self, hash_: str) -> None:
        self.d.execute_script("location.hash = arguments[0]", hash_)

    def login(self, token: str) -> None:
        self.d.get(f"{self.base}/ui")
        wait_for(lambda: (self.css("#token") and self.css("#token")[0].is_displayed()) or (self.css("#logout")
                 and self.css("#logout")[0].is_displayed()), 20, "the page")
        if self.css("#logout") and self.css("#logout")[0].is_displayed():
            self.css("#logout")[0].click()
        self.css("#token")[0].send_keys(token)
        self.css("#login-button")[0].click()
        wait_for(lambda: "fleet" in self.text_of("#who"), 20, "logged in")

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(SHOTS / f"{name}.png"))
