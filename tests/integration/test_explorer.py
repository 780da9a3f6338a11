"""The gap explorer as a person uses it: a running node, a real broker, a real browser.

A node with the shipped weights (and so their genesis history) and
``http.explore: true`` receives captioned pictures through Mosquitto. Once
they are final, Debian's chromium (headless, driven by chromedriver through
selenium) loads /explore: the page must draw as many points as /api/points
serves, answer a what-if typed into its form and one with a picture, and its
screenshot must show points. Then a what-if is checked against the verdict
the round scorer gives when the same caption is actually submitted.

Set ``POC_EXPLORER_SCREENSHOT=path.png`` to keep the screenshot (docs/explorer.png
was made so).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from encoders.modality import Modality
from tests.conftest import (
    POC_NODE,
    ROOT,
    NodeProcess,
    start_mosquitto,
    start_node,
    write_node_config,
)
from tests.peer import Peer, ResultListener, submission_id
from training.stream import WorldMaker, concepts

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
COLOURS = {"text": (0x25, 0x63, 0xEB), "image": (0xEA, 0x58, 0x0C)}
"""The page's colours of the modalities this test submits (node/ops/explore.html)."""


def shipped_weights() -> dict[str, str]:
    encoders = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())["encoders"]
    return {
        "manifest": str(ROOT / "weights" / "default" / "manifest.json"),
        "manifest_sha256": encoders["manifest_sha256"],
    }


def api(node: NodeProcess, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.metrics_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def browser_or_skip() -> Any:
    """A headless chromium under chromedriver; skipped only where chromium is truly absent."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium: `make test` installs it"
    )
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("chromium is not installed (`make test` installs chromium and chromium-driver)")
    if not (os.path.exists(CHROMEDRIVER) or shutil.which("chromedriver")):
        pytest.skip("chromedriver is not installed (`make test` installs chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = (
        CHROMIUM if os.path.exists(CHROMIUM) else str(shutil.which("chromium"))
    )
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for chromium's sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    driver_path = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")
    return webdriver.Chrome(service=Service(str(driver_path)), options=options)


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = browser_or_skip()
    try:
        yield driver
    finally:
        driver.quit()


async def submit_and_wait(broker_port: int, raws: list[bytes]) -> list[dict[str, Any]]:
    async with ResultListener(broker_port) as listener:
        for raw in raws:
            await listener.publish(raw)
        return [await listener.final(submission_id(raw), timeout=180) for raw in raws]


def wait_mapped(node: NodeProcess, round_number: int) -> dict[str, Any]:
    """/api/points once the map includes ``round_number``."""
    for _ in range(300):
        try:
            body = api(node, "/api/points")
            if body["round"] is not None and body["round"] >= round_number:
                return dict(body)
        except urllib.error.HTTPError as error:
            if error.code != 503:
                raise
        asyncio.run(asyncio.sleep(0.2))
    raise TimeoutError("the explorer did not map the committed rounds")


def blobs(mask: np.ndarray) -> int:
    """Connected regions (4-neighbour) of a boolean image."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def near_colour(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Pixels of ``rgb`` drawn opaque or at the page's 0.75 alpha over white."""
    faded = tuple(0.75 * c + 0.25 * 255 for c in rgb)
    masks = [np.abs(pixels - np.asarray(c)).max(axis=-1) <= 24 for c in (rgb, faded)]
    return np.asarray(masks[0] | masks[1])


def test_the_explorer_in_a_real_browser(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    broker = start_mosquitto(tmp_path)
    config = write_node_config(
        tmp_path / "node.yaml",
        encoders=shipped_weights(),
        http={"explore": True, "whatif_per_minute": 600, "whatif_burst": 50},
        # One epoch for the whole test: a what-if and the same caption submitted
        # later are encoded with the same beacon.
        rounds={"epoch_rounds": 100_000},
        scoring={"top_k": 3},
    )
    node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}", config)
    try:
        maker = WorldMaker(5)
        peer = Peer()
        pairs = [maker.pair("novel", c, Modality.IMAGE) for c in concepts(novel=True)[:6]]
        raws = [
            peer.submission([(str(i.modality), i.mime, i.data) for i in s.items]) for s in pairs
        ]
        finals = asyncio.run(submit_and_wait(broker.port, raws))
        assert all(result["status"] == "final" for result in finals), finals
        assert any(result["reward"] > 0 for result in finals)
        body = wait_mapped(node, max(result["round"] for result in finals))
        assert body["count"] == body["history_size"] > 390  # genesis + the new items, all shown
        assert body["modalities"].keys() >= {"text", "image"}
        assert any(point["paid"] for point in body["points"])

        # The page draws every point the API serves.
        browser.get(f"http://127.0.0.1:{node.metrics_port}/explore")
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "yes"
        )
        drawn = browser.find_element(By.ID, "drawn")
        assert int(drawn.get_attribute("data-count")) == body["count"]
        legend = browser.find_element(By.ID, "legend").text
        assert "text" in legend and "image" in legend and "paid" in legend

        # A what-if typed into the form: the page shows the node's answer.
        caption = "a purple hexagon floating above a green triangle"
        expected = api(node, "/api/whatif", {"caption": caption})
        browser.find_element(By.ID, "caption").send_keys(caption)
        browser.find_element(By.ID, "ask").click()
        answer = browser.find_element(By.ID, "answer")
        WebDriverWait(browser, 60).until(lambda _: answer.get_attribute("data-state") != "asking")
        assert answer.get_attribute("data-state") == "answered", answer.text
        shown = "yes" if expected["would_qualify"] else "no"
        assert answer.get_attribute("data-qualify") == shown
        assert browser.find_element(By.ID, "qualify").text == shown
        assert f"{expected['items'][0]['gap']:.4f}" in answer.text
        assert len(answer.find_elements(By.CSS_SELECTOR, "table tr")) == 1 + 8

        # The screenshot (with the answer) shows the points: many colours, blobs of each modality.
        screenshot = tmp_path / "explorer.png"
        browser.save_screenshot(str(screenshot))
        keep = os.environ.get("POC_EXPLORER_SCREENSHOT")
        if keep:
            shutil.copyfile(screenshot, keep)
        image = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # not blank
        canvas = browser.find_element(By.ID, "map")
        box = canvas.location, canvas.size
        area = image[
            box[0]["y"] : box[0]["y"] + box[1]["height"],
            box[0]["x"] : box[0]["x"] + box[1]["width"],
        ]
        total = 0
        for modality, rgb in COLOURS.items():
            found = blobs(near_colour(area, rgb))
            assert found >= 1, f"no {modality} points visible"
            total += found
        # Points overlap, so there are at most as many blobs as points, and not a few.
        assert body["count"] // 20 <= total <= body["count"]

        # A picture dropped into the file input, with the caption: judged as a pair.
        item = maker.item(Modality.IMAGE, concepts(novel=True)[7])
        picture = tmp_path / ("picture.png" if item.mime == "image/png" else "picture.jpg")
        picture.write_bytes(item.data)
        browser.find_element(By.ID, "picture").send_keys(str(picture))
        browser.find_element(By.ID, "ask").click()
        WebDriverWait(browser, 60).until(lambda _: answer.get_attribute("data-state") != "asking")
        assert answer.get_attribute("data-state") == "answered", answer.text
        assert answer.text.count("lands at") == 2, answer.text
        assert "image" in answer.text

        # The same gaps from the command line.
        url = f"--url=http://127.0.0.1:{node.metrics_port}"
        printed = subprocess.run(
            [str(POC_NODE), "gaps", "--top", "3", url], capture_output=True, text=True, check=True
        ).stdout
        assert "open gaps" in printed and len(printed.splitlines()) <= 2 + 3, printed
        near = subprocess.run(
            [str(POC_NODE), "gaps", "--top", "2", "--near", caption, "--modality", "text", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"near {caption!r}" in near, near
        assert all(" text " in line for line in near.splitlines()[2:]), near

        # The what-if is the round scorer's verdict: submit the caption for real.
        result = asyncio.run(
            submit_and_wait(
                broker.port, [peer.submission([("text", "text/plain", caption.encode())])]
            )
        )[0]
        assert result["status"] == expected["status"]
        assert result["scores_ppm"] == expected["scores_ppm"]
        after = api(node, "/api/whatif", {"caption": caption})
        assert after["items"][0]["duplicate"] is True and after["would_qualify"] is False

        # Same history, same map: a restarted node draws every point where it was.
        before = wait_mapped(node, result["round"])
        assert node.stop() == 0
        node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}", config)
        restarted = wait_mapped(node, result["round"])

        def places(body: dict[str, Any]) -> list[tuple[Any, ...]]:
            return [(p["id"], p["modality"], p["round"], p["x"], p["y"]) for p in body["points"]]

        assert places(restarted) == places(before)
    finally:
        node.stop()
        broker.stop()
