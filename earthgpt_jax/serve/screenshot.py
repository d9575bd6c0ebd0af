"""Drive the chat page in headless Chromium: upload an image, ask, wait, read the page, screenshot.

    python -m earthgpt_jax.serve.screenshot --url=http://127.0.0.1:8000/ --image=scene.png \
        --task=detect --out=docs/serve_screenshot.png

Used by the end-to-end test and to make the README's screenshot. Needs Selenium
(requirements-dev.txt) and Debian's `chromium` + `chromium-driver` (Selenium's own driver
download cannot work offline, so the system binaries are named explicitly).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)

# What the page shows once an answer is finished: read in the page so the test checks what the
# user sees (DOM and canvas pixels), not what the API returned.
_READ_PAGE = """
const chat = window.earthgptChat;
const canvas = document.getElementById('image-canvas');
const answers = document.querySelectorAll('#thread .msg.assistant');
const last = answers[answers.length - 1];
const ctx = canvas.getContext('2d');
const img = chat.state.image;
const scale = img ? chat.displayScale(img.naturalWidth, img.naturalHeight) : 0;
const edges = chat.state.boxes.map((b, i) => {
  // The middle of the box's left edge, on the 2-pixel stroke.
  const x = Math.round(b.pixels[0] * scale);
  const y = Math.round((Math.round(b.pixels[1] * scale) + Math.round(b.pixels[3] * scale)) / 2);
  const at = [Math.min(x, canvas.width - 1), Math.min(y, canvas.height - 1)];
  const [r, g, bl] = ctx.getImageData(at[0], at[1], 1, 1).data;
  const hex = '#' + [r, g, bl].map((v) => v.toString(16).padStart(2, '0')).join('');
  return {label: b.label, pixel: hex, colour: chat.colourFor(b.label, i)};
});
return {
  state: last ? last.dataset.state : null,
  answer: last ? last.querySelector('.text').textContent : null,
  canvas_boxes: parseInt(canvas.dataset.boxes, 10),
  canvas_image: canvas.dataset.image,
  canvas_size: [canvas.width, canvas.height],
  listed: Array.from(document.querySelectorAll('#box-list li')).map((li) => li.dataset.label),
  edges: edges,
  status: document.getElementById('status').textContent,
};
"""


def find_browser() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) paths, None where missing."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER_NAMES) if p), None)
    return browser, driver


def open_browser(width: int = 1280, height: int = 860):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = find_browser()
    if not browser or not driver:
        raise RuntimeError("headless Chromium needs Debian's packages: "
                           "apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def ask_on_page(driver, url: str, image_path: str, *, task: str = "detect", phrase: str = "",
                question: str = "", max_tokens: int = 0, timeout: float = 120.0) -> dict:
    """Open the page, upload `image_path`, ask (task shortcuts in turn, e.g. "classify,detect",
    or `question`), wait for each finished answer; returns what the page shows after the last
    (see `_READ_PAGE`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(driver, timeout)
    driver.get(url)
    wait.until(lambda d: d.execute_script("return window.earthgptChat && "
                                          "window.earthgptChat.state.info !== null"))
    driver.find_element(By.ID, "file-input").send_keys(os.path.abspath(image_path))
    wait.until(lambda d: d.find_element(By.ID, "image-canvas").get_attribute("data-image")
               == "loaded" or "error" in d.find_element(By.ID, "status").text)
    if max_tokens:
        field = driver.find_element(By.ID, "max-tokens")
        field.clear()
        field.send_keys(str(max_tokens))
    if phrase:
        driver.find_element(By.ID, "find-phrase").send_keys(phrase)
    # Several shortcuts ("describe,detect") make a multi-turn dialogue; a question replaces them.
    turns = [("question", question)] if question else [
        ("task", t) for t in filter(None, task.split(","))]
    for number, (kind, value) in enumerate(turns, start=1):
        if kind == "question":
            driver.find_element(By.ID, "question").send_keys(value)
            driver.find_element(By.ID, "send").click()
        else:
            driver.find_element(By.CSS_SELECTOR, f"#shortcuts button[data-task='{value}']").click()
        wait.until(lambda d: d.execute_script(
            "const a = document.querySelectorAll('#thread .msg.assistant');"
            "return a.length === arguments[0] && "
            "['done', 'error'].includes(a[a.length - 1].dataset.state);", number))
    return driver.execute_script(_READ_PAGE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m earthgpt_jax.serve.screenshot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--task", default="detect",
                        help="shortcut(s) to press in turn: describe, classify, detect, find; "
                             "e.g. classify,detect")
    parser.add_argument("--phrase", default="", help="what to find (--task=find)")
    parser.add_argument("--question", default="", help="ask this instead of a task shortcut")
    parser.add_argument("--max_tokens", type=int, default=0)
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    driver = open_browser()
    try:
        page = ask_on_page(driver, args.url, args.image, task=args.task, phrase=args.phrase,
                           question=args.question, max_tokens=args.max_tokens)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
    print(json.dumps(page, indent=1))
    return 0 if page["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
