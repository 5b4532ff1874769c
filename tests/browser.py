"""Open a page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium).

    with chromium(tmp_path) as page:
        result = check_page(page, path)   # renders, every image loads, no console errors
        page.save_screenshot(...)

scripts/setup.sh installs the two packages; the flags keep Chromium off the network this
machine does not have (docs: headless Chromium on these machines).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("ALPHADRIVE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ALPHADRIVE_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def artifacts_dir() -> Path:
    """Where tests keep screenshots (ALPHADRIVE_TEST_ARTIFACTS, default test-artifacts/ in the repo)."""
    path = Path(os.environ.get("ALPHADRIVE_TEST_ARTIFACTS", REPO / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def chromium(profile_dir: Path, width: int = 1400, height: int = 1000):
    """A selenium WebDriver on a fresh headless Chromium with its own empty profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            raise RuntimeError(f"{binary} is missing: run ./scripts/setup.sh (it installs Debian's chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class PageCheck:
    title: str
    ready_state: str
    images: int
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    text: str = ""


# Wait for every image to settle (loaded or failed), then report the broken ones.
_IMAGES_JS = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
Promise.all(images.map(img => img.complete ? null : new Promise(r => { img.onload = img.onerror = r; })))
  .then(() => done(images.map(img => [img.alt || img.src.slice(0, 60), img.complete && img.naturalWidth > 0])));
"""


def check_page(driver, path: Path) -> PageCheck:
    """Load a local HTML file and report what a reader would see go wrong."""
    driver.get(path.resolve().as_uri())
    ready = driver.execute_script("return document.readyState")
    images = driver.execute_async_script(_IMAGES_JS)
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    return PageCheck(
        title=driver.title,
        ready_state=ready,
        images=len(images),
        broken_images=[name for name, ok in images if not ok],
        console_errors=errors,
        text=driver.find_element("tag name", "body").text,
    )


def full_page_screenshot(driver, path: Path) -> Path:
    """A PNG of the whole page (not only the window), through the DevTools protocol."""
    import base64

    size = driver.execute_script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}},
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
