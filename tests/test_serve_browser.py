"""The web page in headless Chromium (Selenium): upload a photo, see K results, click one, keyboard, phone width."""

import json
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def running_server(index_dir, **options):
    """The service on a free 127.0.0.1 port (uvicorn in a thread); yields its URL."""
    import uvicorn

    from momentum_proxy.serving.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(index_dir, **options), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, thread.is_alive), "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def chromium(profile: Path, width: int = 1100, height: int = 900):
    """Headless Chromium driven by the system chromedriver (Selenium downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read by `driver.get_log`
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def search_and_click(driver, url: str, photo: Path, k: int, screenshot: Path, timeout: float = 90) -> dict:
    """Load the page, upload `photo`, wait for k results, click the second, wait for its results, screenshot.
    Returns what was seen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.get(url)
    wait.until(lambda d: "images" in d.find_element(By.ID, "stats").text)
    threshold = driver.find_element(By.ID, "threshold").get_attribute("value")  # set with the stats
    k_input = driver.find_element(By.ID, "k")
    k_input.clear()
    k_input.send_keys(str(k))
    driver.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: "results in" in d.find_element(By.ID, "status").text)
    first = [
        (h.get_attribute("data-id"), h.find_element(By.CLASS_NAME, "score").text)
        for h in driver.find_elements(By.CLASS_NAME, "hit")
    ]
    first_labels = [
        (h.find_element(By.CLASS_NAME, "cls").text, h.get_attribute("class"))
        for h in driver.find_elements(By.CLASS_NAME, "hit")
    ]
    target = driver.find_elements(By.CLASS_NAME, "hit")[1]
    target_id = target.get_attribute("data-id")
    target.click()
    wait.until(lambda d: d.find_element(By.ID, "preview-text").text.startswith(f"item {target_id}"))
    wait.until(lambda d: "results in" in d.find_element(By.ID, "status").text)
    wait.until(
        lambda d: all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            for img in d.find_elements(By.CSS_SELECTOR, ".hit img")
        )
    )
    hits = driver.find_elements(By.CLASS_NAME, "hit")
    seen = {
        "first": first,
        "first_labels": first_labels,
        "target": target_id,
        "second": [h.get_attribute("data-id") for h in hits],
        "frames": [h.get_attribute("class") for h in hits],
        "preview": driver.find_element(By.ID, "preview-text").text,
        "status": driver.find_element(By.ID, "status").text,
        "threshold": threshold,
    }
    driver.save_screenshot(str(screenshot))
    return seen


@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=(
        f"chromium not installed: {CHROMIUM} and {CHROMEDRIVER} are needed "
        "(apt-get install -y chromium chromium-driver)"
    ),
)
@pytest.mark.parametrize("store", ["faiss", pytest.param("milvus", marks=pytest.mark.slow)])  # the page is the same
def test_page_search_click_keyboard_phone(tiny_data, tiny_run, tmp_path, store):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from momentum_proxy.retrieval.build import build_index
    from momentum_proxy.retrieval.calibrate import CLOSE_MATCH
    from momentum_proxy.retrieval.stores import open_store

    location = str(tmp_path / "idx") if store == "faiss" else f"milvus:{tmp_path}/idx.db"  # a folder or Milvus Lite
    build_index(tiny_run, tiny_data, location)
    index = open_store(location)
    measured = {"cosine": 0.4321, "precision": 0.95, "items": 64, "classes": 8}  # as `mproxy index` keeps one
    index.attach(CLOSE_MATCH, json.dumps(measured).encode())
    index.save(location)
    photo = tmp_path / "photo.jpg"
    original = str(tiny_data / "images" / "species_03" / "0005.jpg")
    shutil.copy(original, photo)
    with running_server(location) as url, chromium(tmp_path / "profile") as driver:
        seen = search_and_click(driver, url, photo, 6, tmp_path / "serve.png")
        assert len(seen["first"]) == 6 and all(0 < float(score) <= 1.0001 for _, score in seen["first"])
        assert seen["first"][0][0] == str(index.ids_of([original])[original])
        assert seen["threshold"] == "0.43"  # the page starts from the index's measured threshold
        # an uploaded photo's class is unknown: results numbered #1..#6, none framed as same or other class
        assert [text.split()[0] for text, _ in seen["first_labels"]] == ["#1", "#2", "#3", "#4", "#5", "#6"]
        assert [frame for _, frame in seen["first_labels"]] == ["hit"] * 6
        # searching by a clicked result: its class is known, every result framed green or red accordingly
        target = index.item(int(seen["target"]))
        assert seen["preview"] == f"item {target['id']} · {target['class_name']}"
        assert len(seen["second"]) == 6 and seen["target"] not in seen["second"]
        expected = ["same" if index.item(int(i))["label"] == target["label"] else "diff" for i in seen["second"]]
        assert [f.split()[-1] for f in seen["frames"]] == expected
        assert "results in" in seen["status"] and "embed" in seen["status"]
        assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # keyboard: Enter on a focused result searches with it
        hit = driver.find_elements(By.CLASS_NAME, "hit")[2]
        next_id = hit.get_attribute("data-id")
        hit.send_keys(Keys.ENTER)
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, "preview-text").text.startswith(f"item {next_id}")
        )
        # an error is shown, not swallowed
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image at all")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(driver, 60).until(lambda d: "not an image file" in d.find_element(By.ID, "status").text)
        # readable on a phone: nothing wider than the screen
        driver.set_window_size(390, 844)
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=(
        f"chromium not installed: {CHROMIUM} and {CHROMEDRIVER} are needed "
        "(apt-get install -y chromium chromium-driver)"
    ),
)
def test_page_at_phone_width_wraps_results_and_cuts_nothing(tiny_data, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By

    from momentum_proxy.retrieval.build import build_index

    build_index(tiny_run, tiny_data, tmp_path / "idx")
    photo = tmp_path / "photo.jpg"
    shutil.copy(tiny_data / "images" / "species_03" / "0005.jpg", photo)
    with running_server(tmp_path / "idx") as url, chromium(tmp_path / "profile") as driver:
        # a phone's viewport (a headless window cannot be made narrower than 500 px)
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {"width": 360, "height": 780, "deviceScaleFactor": 2, "mobile": True}
        )
        search_and_click(driver, url, photo, 6, tmp_path / "phone.png")
        assert driver.execute_script("return window.innerWidth") == 360
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        cut = driver.execute_script("""
            const vw = window.innerWidth, out = [];
            for (const hit of document.querySelectorAll('.hit')) {
              const box = hit.getBoundingClientRect();
              if (box.left < 0 || box.right > vw) out.push('result outside the screen');
              for (const el of hit.querySelectorAll('.score, .cls')) {
                const r = el.getBoundingClientRect();
                if (r.left < box.left || r.right > box.right + 0.5 || el.scrollWidth > el.clientWidth + 1)
                  out.push(el.className + ' cut: ' + el.textContent);
              }
            }
            return out;""")
        assert cut == []
        hits = driver.find_elements(By.CLASS_NAME, "hit")
        tops = sorted({round(h.rect["y"]) for h in hits})
        assert len(tops) >= 3  # 6 results wrap into rows of at most 2
        assert all(h.get_attribute("title").split("\n")[0].endswith(".jpg") for h in hits)  # file name on hover
        assert driver.find_element(By.ID, "hint").is_displayed()


@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=(
        f"chromium not installed: {CHROMIUM} and {CHROMEDRIVER} are needed "
        "(apt-get install -y chromium chromium-driver)"
    ),
)
def test_page_says_no_results_and_no_close_match_names_classes_whole_and_has_an_icon(tiny_data, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from momentum_proxy.retrieval.build import build_index

    labels = tmp_path / "classes.csv"  # a long class name of words joined by "_"
    labels.write_text("path,class_name\nimages/species_03/0005.jpg,Black_footed_Albatross_of_the_North_Pacific\n")
    build_index(tiny_run, tiny_data, tmp_path / "idx", labels=str(labels))
    photo = tmp_path / "photo.jpg"
    shutil.copy(tiny_data / "images" / "species_03" / "0005.jpg", photo)  # the bytes of an indexed image
    with running_server(tmp_path / "idx") as url, chromium(tmp_path / "profile") as driver:
        wait = WebDriverWait(driver, 90)
        driver.get(url)
        wait.until(lambda d: "images" in d.find_element(By.ID, "stats").text)
        threshold = driver.find_element(By.ID, "threshold").get_attribute("value")
        assert threshold == "0.7"  # one labelled class: not measured, the fallback

        def search(threshold: str, only_close: bool) -> str:
            box = driver.find_element(By.ID, "threshold")
            box.clear()
            box.send_keys(threshold)
            if driver.find_element(By.ID, "only-close").is_selected() != only_close:
                driver.find_element(By.ID, "only-close").click()
            driver.execute_script("document.getElementById('status').textContent = ''")
            driver.find_element(By.ID, "file").send_keys(str(photo))
            wait.until(lambda d: " in " in d.find_element(By.ID, "status").text)
            return driver.find_element(By.ID, "status").text

        assert search("0.5", False).startswith("12 results in")
        assert not driver.find_element(By.ID, "nomatch").is_displayed()
        first = driver.find_elements(By.CLASS_NAME, "hit")[0]  # the indexed copy, first, marked, its class whole
        assert "same image" in first.text and first.find_element(By.CLASS_NAME, "score").text.startswith("1.000")
        name = first.find_element(By.CLASS_NAME, "cls")
        assert name.get_attribute("title") == "Black_footed_Albatross_of_the_North_Pacific"
        assert "Black_footed_Albatross_of_the_North_Pacific" in name.text.replace("\n", "")
        assert name.size["height"] > 2 * 16 and name.size["width"] < 300  # wrapped into lines, inside its card
        assert search("0.999", True).startswith("1 result in")  # only the copy is that close
        assert not driver.find_element(By.ID, "nomatch").is_displayed()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(photo)  # no match
        assert search("1", False).startswith("12 results in")
        assert driver.find_element(By.ID, "nomatch").text.startswith("No close match: the most similar image scores")
        assert search("1", True).startswith("no results in")
        assert driver.find_element(By.ID, "nomatch").text == "No close match: no image scores 1 or more."
        assert driver.find_elements(By.CLASS_NAME, "hit") == []
        assert driver.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href").startswith("data:image/")
        problems = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert problems == []  # no 404 (a favicon) or other error in the console
