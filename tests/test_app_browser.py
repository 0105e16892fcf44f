"""The app in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`) via selenium.

On the built-in tiny-sd model, as a new user would: opens the page, clicks the one-click example
(pictures of a red heart, a shape the base model never saw), trains with the default settings,
waits for the samples and the download buttons, generates with the new LoRA and without it, and
takes a screenshot of each tab. They go to a temporary folder; with ADAPRELORA_SCREENSHOT_FULL_RUN=1
the run trains all the default steps and the screenshots replace the README's `docs/screenshot_*.png`.
Skipped, with the reason, only when Chromium or chromedriver is not installed.
"""
from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
    pytest.mark.browser,
    pytest.mark.slow,
]
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
WAIT_S = 240  # generous: CI machines are slow and shared; nothing here asserts on time
# All the default steps and the README's screenshots (docs/screenshot_*.png) rewritten; otherwise a
# quarter of the steps and screenshots in a temporary folder, so a test run leaves the tree alone.
FULL_RUN = os.environ.get("ADAPRELORA_SCREENSHOT_FULL_RUN") == "1"


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> str:
    return DOCS if FULL_RUN else str(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, free_port):  # free_port: tests/conftest.py
    import torch

    from adaprelora.app import DEFAULT_BASE_MODEL, build_demo

    root = tmp_path_factory.mktemp("browser-output-root")
    previous = os.environ.get("GRADIO_TEMP_DIR"), torch.get_num_threads()
    os.environ["GRADIO_TEMP_DIR"] = str(root / ".gradio-cache")  # as app.py does: uploads inside the root
    torch.set_num_threads(1)
    demo = build_demo(DEFAULT_BASE_MODEL, str(root), check_base_model_in_background=False)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                        allowed_paths=[str(root)])
    try:
        yield f"http://127.0.0.1:{port}/", root
    finally:
        demo.close()
        torch.set_num_threads(previous[1])
        if previous[0] is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous[0]


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


def _wait(driver, condition, message: str, seconds: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.25).until(condition, message)


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


def _screenshot(driver, folder: str, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    assert driver.save_screenshot(path), f"the screenshot {path} was not written"
    return path


def _generated_images(root, since: set) -> list:
    """The PNGs written since `since`; a file still being written is left out until it reads whole."""
    from PIL import Image

    images = []
    for path in sorted(set(str(p) for p in (root / "generated").rglob("*.png")) - since):
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, SyntaxError):
            continue
    return images


def _generate(driver, root, lora: str, prompt: str) -> list:
    before = set(str(p) for p in (root / "generated").rglob("*.png")) if (root / "generated").exists() else set()
    _choose(driver, "gen-lora", lora)
    _set_text(driver, "#gen-prompt textarea", prompt)
    _css(driver, "#gen-button")[0].click()
    _wait(driver, lambda d: (root / "generated").exists() and len(_generated_images(root, before)) >= 4,
          "no generated image was written")
    _wait(driver, lambda d: _css(d, "#gen-gallery img"), "no generated image appeared")
    return _generated_images(root, before)


def test_example_train_watch_generate_in_a_real_browser(app_url, browser, screenshot_dir):
    from adaprelora.tiny_t2i import TINY_SD_DIR
    from adaprelora.tiny_t2i.judge import judge_images, load_judge

    url, root = app_url
    driver = browser
    driver.get(url)
    _wait(driver, lambda d: _css(d, "#example-button"), "the example button never appeared")
    _wait(driver, lambda d: "tiny-sd" in _css(d, "#base-model-status")[0].text
          and "checking" not in _css(d, "#base-model-status")[0].text, "the base-model banner never settled")
    assert "--base-model" in _css(driver, "#base-model-status")[0].text, "the page says how to use SD 1.5"

    # One click fills the images, their captions and the settings.
    _css(driver, "#example-button")[0].click()
    _wait(driver, lambda d: len(_css(d, "#train-preview img")) >= 5, "the example images did not load")
    _wait(driver, lambda d: "sks shape" in _css(d, "#instance-prompt textarea")[0].get_attribute("value"),
          "the example did not fill the prompt")
    _wait(driver, lambda d: "a sks shape on a" in _css(d, "#train-captions")[0].text,
          "the example's captions did not fill the table")

    # Train with the defaults, but a quarter of the steps (CI time; tests/test_tiny_t2i_model.py trains
    # the full default run and scores it; ADAPRELORA_SCREENSHOT_FULL_RUN=1 trains all of them, for the
    # README's screenshots), and watch: samples appear, the download buttons show up at the end.
    steps = int(_css(driver, "#train-steps input")[0].get_attribute("value"))
    if not FULL_RUN:
        steps //= 4
        _set_text(driver, "#train-steps input", str(steps))
    _css(driver, "#train-button")[0].click()
    _wait(driver, lambda d: f"finished at step {steps}" in _css(d, "#train-status")[0].text,
          "training did not finish in the page", seconds=2 * WAIT_S)
    _wait(driver, lambda d: len(_css(d, "#train-samples img")) >= 2, "no sample images appeared")
    _wait(driver, lambda d: _css(d, "#download-diffusers") and _css(d, "#download-diffusers")[0].is_displayed()
          and _css(d, "#download-kohya")[0].is_displayed(), "the download buttons did not appear")
    assert _css(driver, "#loss-plot canvas, #loss-plot svg"), "the loss curve is drawn"
    driver.execute_script("window.scrollTo(0, 0)")
    _screenshot(driver, screenshot_dir, "screenshot_train.png")

    # Generate without the LoRA, then with it: the judge sees the heart only with it.
    judge = load_judge(os.path.join(TINY_SD_DIR, "judge"))
    _click_tab(driver, "Generate")
    _wait(driver, lambda d: _css(d, "#gen-prompt textarea") and _css(d, "#gen-prompt textarea")[0].is_displayed(),
          "the Generate tab did not open")
    plain = _generate(driver, root, "(none)", "a sks shape on a blue background")
    with_lora = (_generate(driver, root, "example-heart", "a sks shape on a purple background")
                 + _generate(driver, root, "example-heart", "a sks shape on a blue background"))
    caption = _wait(driver, lambda d: " ".join(e.text for e in _css(d, "#gen-gallery")), "no gallery text")
    assert "example-heart" in caption, f"the image was made with the LoRA: {caption!r}"
    import numpy as np
    from PIL import Image

    from adaprelora.app.examples import example_images
    from adaprelora.tiny_t2i.judge import similarity

    refs = judge_images(judge, [Image.open(p).convert("RGB") for p in example_images()])
    seen_with, seen_without = judge_images(judge, with_lora), judge_images(judge, plain)
    gain = similarity(seen_with, refs) - similarity(seen_without, refs)
    _screenshot(driver, screenshot_dir, "screenshot_generate.png")
    # Eight images are too few for a learning score (tests/test_app_tiny.py and tests/test_tiny_t2i_model.py
    # count the judge's hearts on more); here the judge's embedding must move towards the example pictures
    # and the base model must draw no heart. Measured: similarity gain 0.166 with 2 of the 8 judged hearts
    # (a quarter of the steps, twice), 0.158 with 1 (half), 0.169 with 3 (all the steps).
    hearts = [sum(v.shape == "heart" for v in seen) for seen in (seen_with, seen_without)]
    print(f"judge-embedding similarity to the example pictures, with minus without the LoRA: {gain:.3f}; "
          f"hearts with / without: {hearts} of {len(with_lora)} / {len(plain)}")
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(plain, with_lora[4:])), "the LoRA changed nothing"
    assert hearts[1] == 0, f"the judge saw {hearts[1]} hearts without the LoRA"
    assert gain > 0.05, f"images with the LoRA are not closer to the example pictures (similarity gain {gain:.3f})"

    # The LoRAs tab lists it with its settings.
    _click_tab(driver, "LoRAs")
    _wait(driver, lambda d: "example-heart" in _css(d, "#lora-table")[0].text, "the LoRA is not in the table")
    from adaprelora.app.defaults import TINY_PROFILE  # trained with the form's default optimizer

    _wait(driver, lambda d: TINY_PROFILE.train.optimizer in _css(d, "#lora-details")[0].text,
          "the LoRA's settings are not shown")
    _screenshot(driver, screenshot_dir, "screenshot_loras.png")
