"""The root app.py in a real browser: `python app.py` with the tiny model, configured only through
the environment as on a Space; headless Chromium (Debian `chromium` + `chromium-driver`, driven by
Selenium) loads the page, submits a prompt and sees the base and the LoRA image."""

from __future__ import annotations

import copy
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import train_tiny_lora
from helpers import served_app


REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "impr3ssionism, water lilies on a pond"


@pytest.fixture(scope="module")
def app_server(tmp_path_factory, _demo_params_master, encoded_cache):
    root = tmp_path_factory.mktemp("browser")
    params = copy.deepcopy(_demo_params_master)
    train_tiny_lora(root, params, encoded_cache, lora=dict(rank=4, alpha=4), steps=3)
    params["sample"].update(steps=2, resolution=64)
    params["app"] = {"min_resolution": 32, "max_resolution": 128, "max_steps": 8}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, IMPRESSIONIST_PARAMS=str(root / "params.yaml"),
               IMPRESSIONIST_LORA=str(root / "lora"), GRADIO_TEMP_DIR=str(root / "gradio"))
    with served_app(REPO, env, root / "app.log") as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).is_file() and shutil.which("chromedriver"), \
        "the browser test needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def image_sources(driver) -> dict[str, str]:
    """src of the loaded <img> in each output component (empty until an image has arrived)."""
    found = {}
    for elem_id in ("base-image", "lora-image"):
        for img in driver.find_elements("css selector", f"#{elem_id} img"):
            if img.get_attribute("src") and driver.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth", img):
                found[elem_id] = img.get_attribute("src")
    return found


def test_page_submits_a_prompt_and_shows_two_images(app_server, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(app_server)
    wait = WebDriverWait(browser, 60)
    prompt = wait.until(lambda d: d.find_element("css selector", "#prompt textarea"))
    assert not image_sources(browser)
    prompt.clear()
    prompt.send_keys(PROMPT)
    browser.find_element("css selector", "#generate").click()
    sources = wait.until(lambda d: (lambda found: found if len(found) == 2 else False)(image_sources(d)))
    pictures = [urllib.request.urlopen(src, timeout=10).read() for src in sources.values()]
    assert all(p.startswith(b"\x89PNG") for p in pictures)
    assert pictures[0] != pictures[1]  # base and LoRA differ
