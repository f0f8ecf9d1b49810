"""The page at / and the API docs in a real browser: headless Chromium, driven by Selenium, against a live uvicorn.

Chromium runs with name resolution off for everything but loopback, so a page that needed a CDN would fail here
the way it fails on a machine without internet access. The service runs the embedded default model with an API
key, so the page's key field is exercised too. The run writes screenshots of the page to a temporary folder, or to
docs/screenshots/ (the README shows one) when LRAEE_UPDATE_SCREENSHOTS=1, so `make test` leaves the tree clean.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make tools`` installs them) and the ``selenium`` package;
the photo tests also need ``../shared/data/imagenet-photos/``. Each skips, saying why, when something is absent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from lraee_core.assets import DEFAULT_CHECKPOINT
from lraee_core.images import decode_rgb
from training.embedded import photos

from ..decisions import same_ranking
from . import imagegen
from .test_uvicorn import REPO, free_port, start, stop, wait_until_ready

pytestmark = pytest.mark.slow

KEY = "browser-test-key"
PHOTO_MEMBER = "n04146614/ILSVRC2012_val_00031163.JPEG"  # a school bus, the README's screenshot
LABELS = ["school bus", "sports car", "tractor", "trolleybus", "police van", "lifeboat"]  # the page's Vehicles preset
SCREENSHOTS = (
    REPO / "docs" / "screenshots"
    if os.environ.get("LRAEE_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "lraee-screenshots"
)
WAIT_SECONDS = 60
UPLOAD_LIMIT = 256 * 1024  # LRAEE_MAX_UPLOAD_BYTES of the service under test: room for the photo, a 413 is cheap
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1200,1000",
    # No name resolves except loopback: what a machine without internet access sees.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium or chromedriver is not installed (make tools, as root, installs them with apt-get)")
    return chromium, chromedriver


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The service on a free loopback port: embedded default model, an API key, a 256 KiB upload limit; its URL."""
    browser_binaries()  # skip before paying for the model load
    port = free_port()
    process = start(DEFAULT_CHECKPOINT, port, LRAEE_API_KEY=KEY, LRAEE_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, base, seconds=120)
        yield base
    finally:
        stop(process)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium with a fresh profile; its network log is kept for the no-other-origin checks."""
    chromium, chromedriver = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = webdriver.ChromeService(executable_path=chromedriver)
    browser = webdriver.Chrome(options=options, service=service)
    browser.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real photo, extracted from the shared tar into a temporary folder."""
    tar_path = photos.SOURCE_DIR / photos.TARS["acuity"][0]
    if not tar_path.is_file():
        pytest.skip(f"real photos absent: {tar_path} not found")
    with tarfile.open(tar_path) as tar:
        member = tar.extractfile(PHOTO_MEMBER)
        assert member is not None, PHOTO_MEMBER
        data = member.read()
    path = tmp_path_factory.mktemp("photo") / "school-bus.jpg"
    path.write_bytes(data)
    return path


def api(base: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{base}{path}", headers={"X-API-Key": KEY}, timeout=30, **kwargs)


def wait(driver: Any, condition: Any, what: str) -> Any:
    try:
        return WebDriverWait(driver, WAIT_SECONDS).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; page status: {status_text(driver)!r}")


def status_text(driver: Any) -> str:
    """The page's status line, or the start of whatever page is shown (for failure messages)."""
    return str(
        driver.execute_script("return (document.getElementById('status') || document.body).innerText.slice(0, 300)")
    )


def shown_error(driver: Any) -> str:
    box = driver.find_element(By.ID, "error")
    return str(box.text) if box.is_displayed() else ""


def open_page(driver: Any, base: str, *, key: bool = True) -> None:
    """Load / and, with ``key``, type the API key; wait until the operating points are loaded."""
    driver.get(f"{base}/")
    wait(driver, lambda d: d.find_element(By.ID, "model-line").text != "Loading the model description…", "/model")
    if key:
        field = driver.find_element(By.ID, "api-key")
        field.send_keys(KEY)
        driver.find_element(By.ID, "labels").click()  # leaving the field fires its change event
        wait(driver, lambda d: d.find_element(By.ID, "model-line").text.startswith("Model "), "/model with the key")


def submit(driver: Any) -> None:
    driver.find_element(By.ID, "submit").click()
    wait(driver, lambda d: d.find_element(By.ID, "submit").is_enabled(), "the answer")


def bars(driver: Any, list_id: str = "bars") -> list[tuple[str, float]]:
    items = driver.find_elements(By.CSS_SELECTOR, f"#{list_id} li")
    return [(item.get_attribute("data-label"), float(item.get_attribute("data-score"))) for item in items]


def strip(driver: Any) -> list[tuple[int, str]]:
    cells = driver.find_elements(By.CSS_SELECTOR, "#exit-strip li")
    return [(int(cell.get_attribute("data-block")), cell.get_attribute("data-state")) for cell in cells]


def screenshot(driver: Any, name: str) -> Path:
    """A palette PNG of the window (a few tens of KB instead of a few hundred)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    path = SCREENSHOTS / name
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def requests_made(driver: Any) -> list[tuple[str, str]]:
    """(URL, resource type) of each request the browser sent since the last call (Chrome's performance log)."""
    made = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            made.append((message["params"]["request"]["url"], message["params"].get("type", "")))
    return made


def foreign(made: list[tuple[str, str]], base: str) -> list[tuple[str, str]]:
    return [(url, kind) for url, kind in made if not url.startswith((base, "data:", "blob:"))]


def test_every_control_has_a_label_and_the_page_loads_nothing_from_elsewhere(driver: Any, server: str) -> None:
    requests_made(driver)
    open_page(driver, server, key=False)
    unlabelled = driver.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter((c) => c.labels.length === 0).map((c) => c.id)"
    )
    assert unlabelled == []
    # Keyboard: a preset is a real button (Enter activates it), and Enter in the labels field submits the form.
    driver.find_element(By.XPATH, "//div[@id='presets']/button[text()='Animals']").send_keys(Keys.ENTER)
    assert driver.find_element(By.ID, "labels").get_attribute("value").startswith("tabby cat, ")
    driver.find_element(By.ID, "labels").send_keys(Keys.ENTER)
    assert "No image yet" in shown_error(driver)
    assert driver.switch_to.active_element.get_attribute("id") == "image"
    # Without the key the page still loads, and says what it needs.
    assert "API key" in driver.find_element(By.ID, "model-line").text
    assert foreign(requests_made(driver), server) == []


@pytest.mark.photos
def test_page_classifies_a_real_photo(driver: Any, server: str, photo: Path) -> None:
    open_page(driver, server, key=False)
    driver.find_element(By.ID, "image").send_keys(str(photo))
    wait(driver, lambda d: d.find_element(By.ID, "preview").get_attribute("naturalWidth") not in (None, "0"), "preview")
    driver.find_element(By.XPATH, "//div[@id='presets']/button[text()='Vehicles']").click()
    assert driver.find_element(By.ID, "labels").get_attribute("value") == ", ".join(LABELS)

    # Without the key: the API's 401, in words, and the focus moves to the key field.
    submit(driver)
    assert "needs an API key" in shown_error(driver)
    assert driver.switch_to.active_element.get_attribute("id") == "api-key"
    driver.find_element(By.ID, "api-key").send_keys(KEY)
    driver.find_element(By.ID, "labels").click()
    wait(driver, lambda d: d.find_element(By.ID, "model-line").text.startswith("Model "), "/model with the key")

    model = api(server, "GET", "/model").json()
    layers = model["candidate_layers"]  # the model line names them in words, one head or several
    one = f"one exit head, after block {layers[0]}." if len(layers) == 1 else None
    assert (one or f"exit heads after blocks {', '.join(map(str, layers))}.") in driver.find_element(
        By.ID, "model-line"
    ).text
    point = Select(driver.find_element(By.ID, "operating-point")).first_selected_option.get_attribute("value")
    assert point == model["default_operating_point"]
    submit(driver)
    assert shown_error(driver) == ""
    shown = bars(driver)

    # The page shows what the API answers for the same image, labels and operating point.
    expected = api(
        server,
        "POST",
        "/classify",
        files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
        data={"labels": LABELS, "top_k": "5", "operating_point": point},
    ).json()
    assert [label for label, _ in shown] == [p["label"] for p in expected["predictions"]]
    assert [score for _, score in shown] == pytest.approx([p["score"] for p in expected["predictions"]], abs=1e-6)
    cells = strip(driver)
    assert [block for block, _ in cells] == list(range(1, model["num_layers"] + 1))
    exit_layer = expected["exit_layer"]
    assert [state for _, state in cells] == [
        "ran" if block < exit_layer else "exit" if block == exit_layer else "skipped" for block, _ in cells
    ]
    facts = driver.find_element(By.ID, "facts").text
    assert f"{expected['flops_saved'] * 100:.1f}% of full depth" in facts
    assert "inference" in facts and "round trip" in facts
    screenshot(driver, "page.png")

    # The key lived in the page only: nothing stored, and a reload forgets it.
    stored = driver.execute_script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    assert KEY not in stored and KEY not in driver.current_url
    driver.refresh()
    assert driver.find_element(By.ID, "api-key").get_attribute("value") == ""


def test_the_page_offers_full_depth(driver: Any, server: str) -> None:
    """``full`` is built into every checkpoint (``lraee_core.config.FULL_OPERATING_POINT``): the API lists it and
    the page offers it, so the comparison below always has its reference."""
    points = api(server, "GET", "/model").json()["operating_points"]
    assert "full" in points, sorted(points)
    open_page(driver, server)
    offered = [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "operating-point")).options]
    assert "full" in offered and set(offered) == set(points)


@pytest.mark.photos
def test_full_depth_and_the_comparison(driver: Any, server: str, photo: Path) -> None:
    open_page(driver, server)
    driver.find_element(By.ID, "image").send_keys(str(photo))
    driver.find_element(By.ID, "labels").send_keys(", ".join(LABELS))

    Select(driver.find_element(By.ID, "operating-point")).select_by_value("full")
    submit(driver)
    assert shown_error(driver) == ""
    cells = strip(driver)
    assert [state for _, state in cells] == ["ran"] * (len(cells) - 1) + ["exit"]
    assert "full depth" in driver.find_element(By.ID, "facts").text
    full_answer = bars(driver)

    default = api(server, "GET", "/model").json()["default_operating_point"]
    Select(driver.find_element(By.ID, "operating-point")).select_by_value(default)
    driver.find_element(By.ID, "compare").click()
    submit(driver)
    assert shown_error(driver) == ""
    comparison = driver.find_element(By.ID, "comparison")
    assert comparison.is_displayed()
    # Scores equal up to float rounding, and the same order wherever two scores do not tie (tests/decisions.py):
    # the two requests may now share an engine batch (different operating points batch together), and an FP32
    # GEMM's last bits depend on its row count.
    compared = bars(driver, "full-bars")
    same_ranking(compared, full_answer, atol=1e-6)
    agree = bars(driver)[0][0] == full_answer[0][0]
    assert comparison.get_attribute("data-agree") == str(agree).lower()
    screenshot(driver, "page-compare.png")


def test_preview_is_upright_as_the_service_decodes_it(driver: Any, server: str, tmp_path: Path) -> None:
    data = imagegen.exif_rotated_jpeg()
    upload = tmp_path / "rotated.jpg"
    upload.write_bytes(data)
    open_page(driver, server, key=False)
    driver.find_element(By.ID, "image").send_keys(str(upload))
    preview = driver.find_element(By.ID, "preview")
    wait(driver, lambda d: preview.get_attribute("naturalWidth") not in (None, "0"), "the preview")
    shown = (int(preview.get_attribute("naturalWidth")), int(preview.get_attribute("naturalHeight")))
    assert shown == decode_rgb(data).size == (20, 40)


@pytest.mark.parametrize(
    ("file_name", "content", "labels", "status", "words"),
    [
        ("notes.txt", b"these are words, not pixels\n" * 20, "cat, dog", "415", "not an image the service can read"),
        ("huge.png", b"\x89PNG\r\n\x1a\n" + bytes(UPLOAD_LIMIT), "cat, dog", "413", "The image is too large"),
        ("tiny.png", imagegen.png(), "cat, cat", "422", "could not use this input"),
    ],
    ids=["not-an-image", "too-large", "duplicate-labels"],
)
def test_api_errors_are_shown_in_words(
    driver: Any, server: str, tmp_path: Path, file_name: str, content: bytes, labels: str, status: str, words: str
) -> None:
    upload = tmp_path / file_name
    upload.write_bytes(content)
    open_page(driver, server)
    driver.find_element(By.ID, "image").send_keys(str(upload))
    driver.find_element(By.ID, "labels").send_keys(labels)
    submit(driver)
    box = driver.find_element(By.ID, "error")
    assert box.get_attribute("data-status") == status, box.text
    assert words in box.text
    assert not driver.find_element(By.ID, "answer").is_displayed()


@pytest.mark.parametrize(
    ("docs", "operation_selector"),
    [("/docs", ".opblock-summary-path"), ("/redoc", "[data-section-id^='operation/']")],
)
def test_docs_render_their_operations_offline(driver: Any, server: str, docs: str, operation_selector: str) -> None:
    spec = api(server, "GET", "/openapi.json").json()
    operations = [(path, method) for path, methods in spec["paths"].items() for method in methods]
    driver.execute_cdp_cmd("Network.enable", {})
    # /docs is behind the key like the rest of the API; the browser sends it on every request here.
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"X-API-Key": KEY}})
    try:
        requests_made(driver)
        driver.get(f"{server}{docs}")
        wait(
            driver,
            lambda d: len(d.find_elements(By.CSS_SELECTOR, operation_selector)) >= len(operations),
            f"{docs} to render {len(operations)} operations",
        )
        rendered = driver.find_elements(By.CSS_SELECTOR, operation_selector)
        assert len(rendered) == len(operations)
        if docs == "/docs":
            paths = {str(element.get_attribute("textContent")).replace("\u200b", "") for element in rendered}
            assert paths == {path for path, _ in operations}
        # Scripts, styles, fonts and fetches all came from the service. ReDoc's footer shows a Redocly logo from
        # its CDN: an image that fails here without harm, so images are left out of this check.
        assert [(url, kind) for url, kind in foreign(requests_made(driver), server) if kind != "Image"] == []
    finally:
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
