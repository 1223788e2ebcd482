"""The page of ``taemi serve`` in a real browser (Debian's Chromium through Selenium).

A module fixture trains a tiny run on offline-profile features of 4 generated clips (as
``tests/test_predict_media.py`` does) and starts ``python -m taemi serve`` on it as a
real process. The test opens the page, uploads CREMA-D sample clips through its file
input and checks that the page shows what the API returns for the same file (values to
1e-6, the visible text to 3 decimals, the modalities, which attention timelines exist);
then on a playable video that a click on a timeline seeks the player, and that at phone
width (360 px) nothing scrolls sideways. The last screenshot is kept in the test's tmp
folder; ``TAEMI_SCREENSHOT=PATH`` also writes it to PATH (how ``docs/serve_page.png`` is
made).

Skips (with the reason) without ``/usr/bin/chromium``, ``/usr/bin/chromedriver``, the
``selenium`` package, the serve extra (fastapi, uvicorn), the offline extraction models
or the CREMA-D sample (``../shared/data/crema-d-sample`` or ``$TAEMI_CREMA_D``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import generated_media_corpus

pytestmark = [pytest.mark.slow, pytest.mark.realmedia]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Enough steps on the 4 clips for the tiny model to give varied values (a few seconds).
EPOCHS = 40
TINY = [
    "model.hidden=16",
    "model.heads=2",
    "model.sa_ffn=32",
    "model.head_hidden=16",
    "train.lr=3e-3",
    f"train.max_epochs={EPOCHS}",
    "train.device=cpu",
    "train.precision=fp32",
]
#: Seconds to wait for one prediction through the page (the first loads the encoders).
PREDICT_WAIT = 240


def _sample_dir() -> Path:
    env = os.environ.get("TAEMI_CREMA_D")
    return (
        Path(env)
        if env
        else Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tools() -> SimpleNamespace:
    """The browser, its driver, selenium and the serve extra; skips when one is absent."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.is_file():
            pytest.skip(f"{binary} absent (apt-get install chromium chromium-driver; .ci/run does)")
    pytest.importorskip("selenium", reason="selenium is not installed ([test] extra)")
    for module in ("fastapi", "uvicorn"):
        pytest.importorskip(module, reason=f"{module} is not installed (the serve extra)")
    sample = _sample_dir()
    if not (sample / "media").is_dir():
        pytest.skip(f"CREMA-D sample {sample} absent (set TAEMI_CREMA_D to the sample folder)")
    clips = {
        "video": sample / "media" / "1001_DFA_HAP_XX.flv",
        "audio": sample / "media" / "1002_DFA_HAP_XX.mp3",
    }
    for path in clips.values():
        if not path.is_file():
            pytest.skip(f"CREMA-D sample clip {path} absent")
    return SimpleNamespace(**clips)


@pytest.fixture(scope="module")
def served_run(tools, tmp_path_factory) -> SimpleNamespace:
    """4 generated clips, their offline features, a tiny run trained on all 4 (as media_run)."""
    from taemi.cli.main import main

    root = tmp_path_factory.mktemp("serve_browser")
    corpus = generated_media_corpus(root, size=160)
    store, run = root / "store", root / "run"
    extract = ["extract", "--input", str(corpus.raw), "--out", str(store)]
    extract += ["--max-frames", "4", "--frame-policy", "uniform", "--no-face", "--no-progress"]
    assert main(extract) == 0
    train = ["train", "--store", str(store), "--train", str(corpus.train_csv)]
    train += ["--valid", str(corpus.valid_csv), "--out", str(run), "--train-on-all"]
    train += ["--epochs", str(EPOCHS), "--no-progress", *[a for s in TINY for a in ("--set", s)]]
    assert main(train) == 0
    videos = sorted(corpus.raw.glob("*.mp4"))
    assert videos, f"the generated corpus has no video clip: {sorted(corpus.raw.iterdir())}"
    return SimpleNamespace(root=root, run=run, video=videos[0])


@pytest.fixture(scope="module")
def server(served_run) -> str:
    """``python -m taemi serve --run RUN --port P`` as a real process; yields its base URL."""
    port = _free_port()
    log = served_run.root / "serve.log"
    cmd = [sys.executable, "-m", "taemi", "serve", "--run", str(served_run.run)]
    cmd += ["--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=served_run.root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"taemi serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(base + "/v1/health", timeout=5) as response:
                    if json.load(response).get("status") == "ok":
                        break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"taemi serve not healthy after 180 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(tools, tmp_path, monkeypatch):
    """Headless Chromium with Debian's chromedriver; Selenium Manager stays offline."""
    monkeypatch.setenv("SE_OFFLINE", "true")  # never download a driver or a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log")),
        options=options,
    )
    try:
        yield driver
    finally:
        driver.quit()


# --------------------------------------------------------------------------- helpers


def api_predict(base: str, path: Path) -> dict:
    """POST ``path`` to /v1/predict as multipart field ``file``; the JSON answer."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="file"; filename="{path.name}"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            path.read_bytes(),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    request = urllib.request.Request(
        base + "/v1/predict",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=PREDICT_WAIT) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        pytest.fail(f"POST /v1/predict {path.name}: {e.code} {e.read()[:500]!r}")


def upload(driver, path: Path) -> None:
    """Choose ``path`` in the page's file input; wait until its result (or an error) shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "file").send_keys(str(path))

    def finished(d) -> bool:
        status = d.find_element(By.ID, "status").get_attribute("data-state")
        if status == "error":
            return True
        results = d.find_element(By.ID, "results")
        return status == "done" and results.get_attribute("data-filename") == path.name

    WebDriverWait(driver, PREDICT_WAIT, poll_frequency=0.25).until(finished)
    state = driver.find_element(By.ID, "status").get_attribute("data-state")
    error = driver.find_element(By.ID, "error").text
    assert state == "done", f"the page failed on {path.name}: {error}"
    assert driver.find_element(By.ID, "results").is_displayed()


def check_matches_api(driver, answer: dict) -> dict:
    """The bars, modalities and timelines on the page are the API's ``answer``'s clip."""
    from selenium.webdriver.common.by import By

    assert answer["failures"] == [] and len(answer["clips"]) == 1
    clip = answer["clips"][0]
    bars = driver.find_elements(By.CSS_SELECTOR, "#bars [data-emotion]")
    assert [b.get_attribute("data-emotion") for b in bars] == answer["emotions"]
    assert len(bars) == 6
    for bar, emotion in zip(bars, answer["emotions"], strict=True):
        expected = clip["intensities"][emotion]
        shown = float(bar.get_attribute("data-value"))
        assert abs(shown - expected) <= 1e-6, (emotion, shown, expected)
        assert bar.find_element(By.CLASS_NAME, "bar-name").text == emotion
        text = bar.find_element(By.CLASS_NAME, "bar-value").text
        assert len(text.split(".")[-1]) == 3 and abs(float(text) - expected) <= 5e-4 + 1e-9, (
            emotion,
            text,
            expected,
        )
        meter = bar.find_element(By.CSS_SELECTOR, "[role=meter]")
        assert meter.get_attribute("aria-valuetext") == text
    for name, info in clip["modalities"].items():
        item = driver.find_element(By.CSS_SELECTOR, f'#modalities [data-modality="{name}"]')
        assert item.get_attribute("data-present") == str(bool(info["present"])).lower()
        if not info["present"] and info.get("reason"):
            assert info["reason"] in item.text
    for modality in ("audio", "vision"):
        row = driver.find_element(By.ID, f"timeline-{modality}")
        available = clip["attention"].get(modality) is not None
        assert row.get_attribute("data-available") == str(available).lower(), modality
        if available:
            assert row.find_element(By.CSS_SELECTOR, ".timeline canvas").size["width"] > 100
        else:
            assert "Not available" in row.text
    transcript = driver.find_element(By.ID, "transcript").text
    assert transcript == (clip["transcript"].strip() or "(no speech recognised)")
    return clip


def click_timeline_at(driver, modality: str, fraction: float) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    timeline = driver.find_element(By.CSS_SELECTOR, f"#timeline-{modality} .timeline")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", timeline)
    width = timeline.size["width"]
    offset = round((fraction - 0.5) * width)  # Selenium 4 offsets count from the centre
    ActionChains(driver).move_to_element_with_offset(timeline, offset, 0).click().perform()


def player_state(driver) -> dict:
    return driver.execute_script(
        "const p = document.getElementById('player');"
        "return {tag: p.tagName.toLowerCase(), time: p.currentTime, duration: p.duration,"
        " ready: p.readyState, error: p.error && p.error.code};"
    )


def save_whole_page(driver, path: Path, width: int) -> None:
    """A screenshot of the whole page (not just the window) at ``width`` CSS pixels."""
    metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    metrics["height"] = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    time.sleep(0.5)  # layout, the timelines' redraw and the bars' width transition
    assert driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# --------------------------------------------------------------------------- the test


def test_page_shows_the_api_result_and_seeks(tools, served_run, server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(server + "/")
    assert driver.find_element(By.CSS_SELECTOR, "label[for=file]").text
    assert driver.find_element(By.ID, "status").get_attribute("aria-live") == "polite"
    assert driver.find_element(By.ID, "results").is_displayed() is False
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.ID, "model").get_attribute("data-run")
    )

    # a real CREMA-D video (FLV: the browser cannot play it; the results still show)
    answer = api_predict(server, tools.video)
    upload(driver, tools.video)
    clip = check_matches_api(driver, answer)
    assert clip["modalities"]["vision"]["present"] and clip["attention"]["vision"] is not None
    assert clip["attention"]["audio"] is not None
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "player-note").is_displayed())
    assert "cannot play .flv" in driver.find_element(By.ID, "player-note").text

    # a real CREMA-D voice clip (MP3: an audio player, no face frames)
    answer = api_predict(server, tools.audio)
    upload(driver, tools.audio)
    clip = check_matches_api(driver, answer)
    assert clip["modalities"]["vision"]["present"] is False
    assert player_state(driver)["tag"] == "audio"

    # a playable video (the generated H.264 clip): a click on a timeline seeks the player
    upload(driver, served_run.video)
    WebDriverWait(driver, 30).until(lambda d: player_state(d)["ready"] >= 1)
    player = player_state(driver)
    assert player["tag"] == "video" and player["error"] is None and player["time"] == 0
    for modality, fraction in (("audio", 0.75), ("vision", 0.3)):
        click_timeline_at(driver, modality, fraction)
        WebDriverWait(driver, 10).until(lambda d: player_state(d)["time"] > 0)
        player = player_state(driver)
        assert abs(player["time"] - fraction * player["duration"]) < 0.06 * player["duration"], (
            modality,
            player,
        )
        head = driver.find_element(By.CSS_SELECTOR, f"#timeline-{modality} .playhead")
        left = float(head.value_of_css_property("left").removesuffix("px"))
        width = driver.find_element(By.CSS_SELECTOR, f"#timeline-{modality} .timeline").size[
            "width"
        ]
        assert abs(left / width - player["time"] / player["duration"]) < 0.02

    # the screenshot: the whole page at desktop width
    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "serve_page.png"
    save_whole_page(driver, shot, width=1100)
    if os.environ.get("TAEMI_SCREENSHOT"):
        target = Path(os.environ["TAEMI_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    # phone width: one column, nothing scrolls sideways, the numbers still there
    driver.set_window_size(360, 800)
    WebDriverWait(driver, 5).until(lambda d: d.execute_script("return window.innerWidth") <= 360)
    scroll, client = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert scroll <= client, f"horizontal scroll at 360 px: {scroll} > {client}"
    values = driver.find_elements(By.CSS_SELECTOR, "#bars .bar-value")
    assert len(values) == 6 and all(v.is_displayed() for v in values)
    save_whole_page(driver, tmp_path / "serve_page_360.png", width=360)
