"""End to end in a real browser: `python -m earthgpt_jax.serve` on a trained tiny checkpoint,
driven by headless Chromium (Debian's chromium + chromedriver through Selenium): upload an image,
ask for detection, wait for the streamed answer, check the boxes on the canvas, screenshot."""

import os
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.test_serve_api import ORIENTED_SHIP, oriented_answer, trained_workdir
from earthgpt_jax.data import boxes
from earthgpt_jax.serve.screenshot import ask_on_page, find_browser, open_browser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not all(find_browser()),
    reason="headless Chromium not installed here (apt-get install -y chromium chromium-driver; "
           "CI installs them)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    trained = trained_workdir(tmp_path_factory)
    proc = subprocess.Popen(
        [sys.executable, "-m", "earthgpt_jax.serve", f"--ckpt_dir={trained['work']}",
         "--port=0", "--warmup_tokens=64", "--log_level=warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    lines: queue.Queue = queue.Queue()
    # Keep draining the pipe for the server's whole life so it never blocks on a full pipe.
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, url, deadline = [], None, time.time() + 240
    while url is None and time.time() < deadline and proc.poll() is None:
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            continue
        found = re.search(r"EarthGPT web chat .*: (http://127\.0\.0\.1:\d+/)", seen[-1])
        url = found and found.group(1)
    try:
        assert url, "server did not start:\n" + "".join(seen)[-3000:]
        time.sleep(0.2)
        seen += [lines.get_nowait() for _ in range(lines.qsize())]
        assert any("Listening on loopback only" in line for line in seen), seen
        yield dict(trained, url=url)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# The service's boxes of an oriented answer, drawn on the page: how close (sum of RGB
# differences, best within a pixel, as a slanted stroke is antialiased) the canvas comes to the
# box's colour midway along its first edge and at its enclosing box's lower right corner (the
# label sits at the upper left), and its list entry.
_DRAW_ORIENTED = """
const chat = window.earthgptChat;
chat.state.boxes = arguments[0];
chat.drawCanvas();
const canvas = document.getElementById('image-canvas');
const ctx = canvas.getContext('2d');
const s = chat.displayScale(chat.state.image.naturalWidth, chat.state.image.naturalHeight);
const b = chat.state.boxes[0], c = b.corner_pixels, colour = chat.colourFor(b.label, 0);
const want = [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16));
const near = (x, y) => {
  let best = 1e9;
  for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
    const d = ctx.getImageData(Math.round(x * s) + dx, Math.round(y * s) + dy, 1, 1).data;
    best = Math.min(best, [0, 1, 2].reduce((t, k) => t + Math.abs(d[k] - want[k]), 0));
  }
  return best;
};
return {edge: near((c[0] + c[2]) / 2, (c[1] + c[3]) / 2), corner: near(b.pixels[2], b.pixels[3]),
        listed: document.querySelector('#box-list li').textContent};
"""


def test_page_streams_a_detection_answer_and_draws_its_boxes(server, tmp_path):
    from selenium.webdriver.common.by import By
    driver = open_browser()
    try:
        page = ask_on_page(driver, server["url"], os.path.join(server["work"], "ships.png"),
                           task="detect", max_tokens=64)  # the shapes warmed up
        shot = str(tmp_path / "page.png")
        assert driver.save_screenshot(shot)
        chunks = driver.execute_script(
            "return document.querySelector('#thread .msg.assistant').dataset.chunks")
        from earthgpt_jax.serve.service import answer_boxes
        oriented = driver.execute_script(_DRAW_ORIENTED, answer_boxes(oriented_answer(), 64, 48))
        driver.find_element(By.ID, "question").clear()
        driver.find_element(By.ID, "send").click()  # an empty question is told, not ignored
        empty_status = driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "reset").click()
        # The page clears once the server has answered the reset (an awaited fetch): read the
        # state after that, or up to 10 s later (a page that never clears fails the assert).
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait
        read_reset = ("return [document.querySelectorAll('#thread .msg.assistant').length,"
                      " document.getElementById('image-canvas').dataset.boxes]")
        try:
            WebDriverWait(driver, 10).until(
                lambda d: d.execute_script(read_reset) == [0, "0"])
        except TimeoutException:
            pass
        reset = driver.execute_script(read_reset)
    finally:
        driver.quit()
    assert page["state"] == "done", page
    assert page["answer"] == server["answers"][boxes.DETECTION_PROMPT + "ships"]
    assert int(chunks) > 5  # the answer arrived in pieces, not at the end
    # The boxes are on the canvas: counted in its state, listed with labels, and the pixel on
    # each box's left edge has the box's colour.
    assert page["canvas_boxes"] == 2 and page["listed"] == ["ship", "ship"]
    assert all(edge["pixel"] == edge["colour"] for edge in page["edges"]), page["edges"]
    picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    colour = np.array([int(page["edges"][0]["colour"][i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(picture - colour).sum(-1) <= 6).sum() > 200  # box strokes in the screenshot
    # An oriented box is drawn as its polygon (not the rectangle enclosing it) and listed by
    # its corners.
    assert oriented["edge"] <= 30 and oriented["corner"] > 60, oriented
    assert oriented["listed"] == "ship: [" + ", ".join(map(str, ORIENTED_SHIP)) + "] px"
    assert reset == [0, "0"]
    assert empty_status.startswith("the question is empty"), empty_status


_READ_SCENE_PAGE = """
const canvas = document.getElementById('scene-canvas');
return {state: canvas.dataset.state, boxes: canvas.dataset.boxes, tiles: canvas.dataset.tiles,
        progress: document.getElementById('progress-text').textContent,
        status: document.getElementById('status').textContent,
        downloads: Array.from(document.querySelectorAll('#downloads a')).map(
          (a) => [a.dataset.kind, a.getAttribute('href')]),
        found: Array.from(document.querySelectorAll('#found-list li')).map(
          (li) => [li.dataset.label, li.dataset.count])};
"""


def test_scene_page_runs_detect_all_tile_by_tile_and_offers_the_geojson(server, tmp_path):
    """/scene: upload a GeoTIFF, see its overview, detect all on every tile, watch the tiles
    and boxes fill in, download the GeoJSON (fetched from the page's own link)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from tests.test_serve_scene import mosaic_scene
    scene = mosaic_scene(server["work"], tmp_path / "mosaic.tif")
    driver = open_browser()
    try:
        wait = WebDriverWait(driver, 180)
        driver.get(server["url"] + "scene")
        wait.until(lambda d: d.execute_script(
            "return window.earthgptScene && window.earthgptScene.state.info !== null"))
        driver.find_element(By.ID, "scene-input").send_keys(scene)
        wait.until(lambda d: d.find_element(By.ID, "scene-canvas").get_attribute("data-image")
                   == "loaded")
        facts = driver.find_element(By.ID, "scene-facts").text
        for name, value in (("tile", "64"), ("overlap", "0")):  # one tile per cell
            driver.find_element(By.ID, name).send_keys(value)
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.ID, "scene-canvas").get_attribute("data-state")
                   in ("done", "error", "cancelled"))
        page = driver.execute_script(_READ_SCENE_PAGE)
        geojson = driver.execute_async_script(
            "fetch(arguments[0]).then((r) => r.json()).then(arguments[1]);",
            dict(page["downloads"])["geojson"])
        ship_colour = driver.execute_script("return window.earthgptScene.colourFor('ship')")
        shot = str(tmp_path / "scene_page.png")
        assert driver.save_screenshot(shot)
    finally:
        driver.quit()
    assert facts == "mosaic.tif: 192×128 px, 3 band(s), EPSG:32633", facts
    assert page["state"] == "done", page
    assert (page["tiles"], page["boxes"]) == ("6", "9"), page
    assert page["progress"].startswith("tiles 6/6 · ") and "tiles/s · ETA 0h00m00s" in \
        page["progress"], page
    assert sorted(page["found"]) == [["ship", "6"], ["vehicle", "3"]], page
    assert [kind for kind, _ in page["downloads"]] == ["geojson", "scene_crs.geojson", "png"]
    assert geojson["coordinates"].startswith("EPSG:4326") and len(geojson["features"]) == 9
    assert page["status"].startswith("done: 9 found on 6 tiles"), page
    # The six merged ship boxes are on the overview, in the ship colour, in the screenshot.
    picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    colour = np.array([int(ship_colour[i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(picture - colour).sum(-1) <= 6).sum() > 6 * 100
