"""Headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium) for the page's
end-to-end test and for screenshots of a running page.

    python -m ui.browser --url http://127.0.0.1:8501 --out docs/demo-movielens.png     # after `make demo UI=1`

Selenium gets the Debian driver's path, so it never tries to download one (`make system-deps` installs
both packages when missing).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
SCRIPT_DONE = (  # Streamlit marks its app element while the script (re)runs
    "const a = document.querySelector('[data-testid=stApp]');"
    "return a !== null && a.getAttribute('data-test-script-state') === 'notRunning'"
)
IMAGES_LOADED = (
    "return Array.from(arguments[0].querySelectorAll('img'))"
    ".filter(i => i.complete && i.naturalWidth > 0).length"
)


def chromium(width: int = 1600, height: int = 1400):
    """A headless Chromium WebDriver (call .quit() when done)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver") or CHROMEDRIVER
    if not Path(driver_path).exists():
        raise FileNotFoundError("chromedriver is missing: run `make system-deps` (Debian's chromium-driver)")
    options = Options()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def wait(driver, condition, timeout_s: float = 60.0):
    """WebDriverWait that also retries while Streamlit replaces elements under it (stale references)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout_s, poll_frequency=0.25, ignored_exceptions=ignored).until(condition)


def wait_for_page(driver, url: str, keys: list[str], min_images: int = 1, timeout_s: float = 60.0) -> None:
    """Open url and wait until the script has finished its run and every `st-key-<key>` container holds at
    least min_images loaded images."""
    from selenium.webdriver.common.by import By

    driver.get(url)

    def ready(d) -> bool:
        if not d.execute_script(SCRIPT_DONE):
            return False
        for key in keys:
            found = d.find_elements(By.CSS_SELECTOR, f".st-key-{key}")
            if not found or d.execute_script(IMAGES_LOADED, found[0]) < min_images:
                return False
        return True

    wait(driver, ready, timeout_s)


def screenshot(url: str, out: Path, keys: list[str], width: int = 1600, height: int = 2000) -> Path:
    """A full-window PNG of the page once the keyed containers show their images."""
    driver = chromium(width, height)
    try:
        wait_for_page(driver, url, keys)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ui.browser", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8501")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keys", nargs="+", default=["col-student", "col-similar", "mixed"])
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    print(screenshot(args.url, args.out, args.keys, args.width, args.height))


if __name__ == "__main__":
    main()
