"""The app in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`) via selenium.

Opens the page, uploads photos, trains 2 steps at 32 px, waits for the samples and the download
buttons, generates with the new LoRA, and saves a screenshot of each tab under `docs/`.
Skipped, with the reason, only when Chromium or chromedriver is not installed.
"""
from __future__ import annotations

import os
import shutil
import socket

import pytest

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
WAIT_S = 240  # generous: CI machines are slow and shared; nothing here asserts on time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from adaprelora.app import build_demo
    from adaprelora.testing.tiny_sd import tiny_sd_pipeline_dir

    demo = build_demo(tiny_sd_pipeline_dir(), str(tmp_path_factory.mktemp("browser-output-root")),
                      check_base_model_in_background=False)
    port = _free_port()
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1500", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("browser-photos")
    paths = []
    for i, colour in enumerate([(200, 80, 40), (60, 140, 200), (90, 180, 90)]):
        yy, xx = np.mgrid[0:64, 0:64]
        img = np.zeros((64, 64, 3), dtype=np.uint8)
        img[...] = colour
        img[(yy - 32) ** 2 + (xx - 32) ** 2 < (12 + 4 * i) ** 2] = (240, 240, 240)
        path = folder / f"subject{i}.png"
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition, message)


def _css(driver, selector: str):
    return driver.find_elements("css selector", selector)


def _set_text(driver, selector: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field = _css(driver, selector)[0]
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(str(text))
    field.send_keys(Keys.TAB)  # Gradio commits number fields on blur


def _choose(driver, elem_id: str, value: str) -> None:
    """Pick `value` from a Gradio dropdown by clicking it in the opened list."""
    _css(driver, f"#{elem_id} input")[0].click()
    options = _wait(driver, lambda d: [li for li in _css(d, f"#{elem_id} li") if li.text.strip().endswith(value)],
                    f"{value!r} is not offered in #{elem_id}")
    options[0].click()
    _wait(driver, lambda d: _css(d, f"#{elem_id} input")[0].get_attribute("value") == value,
          f"#{elem_id} did not take {value!r}")


def _click_tab(driver, name: str) -> None:
    tab = next(b for b in _css(driver, "button[role='tab']") if b.text.strip() == name)
    tab.click()


def _screenshot(driver, name: str) -> str:
    os.makedirs(DOCS, exist_ok=True)
    path = os.path.join(DOCS, name)
    driver.save_screenshot(path)
    return path


def test_upload_train_watch_generate_in_a_real_browser(app_url, browser, photos):
    driver = browser
    driver.get(app_url)
    _wait(driver, lambda d: _css(d, "#train-images input[type='file']"), "the upload field never appeared")
    _wait(driver, lambda d: "Base model:" in _css(d, "#base-model-status")[0].text
          and "checking" not in _css(d, "#base-model-status")[0].text, "the base-model banner never settled")

    # Upload, preview, settings.
    _css(driver, "#train-images input[type='file']")[0].send_keys("\n".join(photos))
    _wait(driver, lambda d: len(_css(d, "#train-preview img")) >= len(photos), "the upload preview stayed empty")
    _set_text(driver, "#instance-prompt textarea", "a photo of sks ball")
    _set_text(driver, "#lora-name textarea", "browser-ball")
    _set_text(driver, "#train-steps input", 2)
    _set_text(driver, "#train-resolution input", 32)
    next(b for b in _css(driver, "button") if "More settings" in b.text).click()
    _wait(driver, lambda d: _css(d, "#validation-steps input") and _css(d, "#validation-steps input")[0].is_displayed(),
          "the settings accordion did not open")
    _set_text(driver, "#validation-steps input", 1)

    # Train and watch: samples appear, the download buttons show up at the end.
    _css(driver, "#train-button")[0].click()
    _wait(driver, lambda d: "finished at step 2" in _css(d, "#train-status")[0].text,
          "training did not finish in the page")
    _wait(driver, lambda d: len(_css(d, "#train-samples img")) >= 2, "no sample images appeared")
    _wait(driver, lambda d: _css(d, "#download-diffusers") and _css(d, "#download-diffusers")[0].is_displayed()
          and _css(d, "#download-kohya")[0].is_displayed(), "the download buttons did not appear")
    assert _css(driver, "#loss-plot canvas, #loss-plot svg"), "the loss curve is drawn"
    driver.execute_script("window.scrollTo(0, 0)")
    _screenshot(driver, "screenshot_train.png")

    # Generate with the new LoRA.
    _click_tab(driver, "Generate")
    _wait(driver, lambda d: _css(d, "#gen-prompt textarea") and _css(d, "#gen-prompt textarea")[0].is_displayed(),
          "the Generate tab did not open")
    _choose(driver, "gen-lora", "browser-ball")
    _set_text(driver, "#gen-prompt textarea", "a photo of sks ball on the grass")
    _set_text(driver, "#gen-steps input", 2)
    _css(driver, "#gen-button")[0].click()
    _wait(driver, lambda d: _css(d, "#gen-gallery img"), "no generated image appeared")
    caption = _wait(driver, lambda d: " ".join(e.text for e in _css(d, "#gen-gallery")), "no gallery text")
    assert "browser-ball" in caption, f"the image was made with the LoRA: {caption!r}"
    _screenshot(driver, "screenshot_generate.png")

    # The LoRAs tab lists it with its settings.
    _click_tab(driver, "LoRAs")
    _wait(driver, lambda d: "browser-ball" in _css(d, "#lora-table")[0].text, "the LoRA is not in the table")
    _wait(driver, lambda d: "adaprelora" in _css(d, "#lora-details")[0].text, "the LoRA's settings are not shown")
    _screenshot(driver, "screenshot_loras.png")
