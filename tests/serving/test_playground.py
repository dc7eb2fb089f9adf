"""The playground page (recurrent_depth/serving/static) in a real browser: Debian's headless Chromium driven through
its chromedriver (selenium), against a live server of the tiny Huginn fixture with a word-level tokenizer and a real
engine.  A chat reply streams in; its tokens' text is the server's completion for the same settings, each token
coloured by the iterations it used on the page's scale (viridis from 1 to the server's --max_steps)."""

import os
import shutil

import openai
import pytest

from serving_helpers import ENGINE, Served

# The page's colour scale, computed here on its own: linear between five viridis stops from 1 to max_steps.
STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SETTINGS = {"num_steps": 8, "exit_criterion": "latent-diff", "exit_threshold": 0.2, "max_tokens": 12}
MESSAGE = "kan lor mis nut pes ras"


def colour(iterations: float, max_steps: int) -> str:
    t = min(max((iterations - 1) / (max_steps - 1), 0.0), 1.0) if max_steps > 1 else 1.0
    x = t * (len(STOPS) - 1)
    i = min(int(x), len(STOPS) - 2)
    f = x - i
    r, g, b = (round(a + (c - a) * f + 1e-9) for a, c in zip(STOPS[i], STOPS[i + 1]))
    return f"rgb({r}, {g}, {b})"


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium session; skipped where Debian's chromium and chromium-driver are not installed (CI
    installs them: there it fails instead)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("chromium and chromium-driver are not installed "
                                                               "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("playground") / "tiny-words")
    try:
        served.wait_ready()
        yield served
    finally:
        served.close()


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_the_reply_streams_in_coloured_by_iterations(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(served.url + "/")
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    assert browser.find_element(By.ID, "model-name").text == "tiny-words"
    _wait(browser, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ok")
    # The legend spans the server's depth cap; the controls take the settings.
    assert browser.find_element(By.ID, "legend-max").text == str(ENGINE["max_steps"])
    assert browser.find_element(By.ID, "num-steps").get_attribute("max") == str(ENGINE["max_steps"])
    browser.execute_script("const e = document.getElementById('num-steps'); e.value = arguments[0];"
                           "e.dispatchEvent(new Event('input'));", SETTINGS["num_steps"])
    assert browser.find_element(By.ID, "num-steps-value").text == str(SETTINGS["num_steps"])
    Select(browser.find_element(By.ID, "exit-criterion")).select_by_value(SETTINGS["exit_criterion"])
    threshold = browser.find_element(By.ID, "exit-threshold")
    assert threshold.is_enabled() and threshold.get_attribute("placeholder") == "default 0.03"
    threshold.send_keys(str(SETTINGS["exit_threshold"]))
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(SETTINGS["max_tokens"]))
    browser.find_element(By.ID, "prompt").send_keys(MESSAGE)
    browser.find_element(By.ID, "send").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '.message.assistant[data-state="done"]'))
    browser.save_screenshot(str(tmp_path / "playground.png"))
    spans = browser.execute_script(
        "return [...document.querySelectorAll('.message.assistant .tok')].map(e => ({text: e.textContent, "
        "iterations: e.dataset.iterations, background: getComputedStyle(e).backgroundColor, "
        "marker: e.classList.contains('marker')}))")
    # The server's answer to the same request, whole.
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = client.chat.completions.create(
        model="tiny-words", messages=[{"role": "user", "content": MESSAGE}], max_tokens=SETTINGS["max_tokens"],
        temperature=0, seed=0, extra_body={k: SETTINGS[k] for k in ("num_steps", "exit_criterion", "exit_threshold")}
        | {"return_iterations": True})
    choice = out.choices[0]
    assert "".join(s["text"] for s in spans if not s["marker"]) == choice.message.content
    assert [int(i) for s in spans for i in s["iterations"].split(",")] == choice.iterations
    assert len(set(choice.iterations)) > 1, choice.iterations  # the exit criterion made the depth vary
    for span in spans:
        steps = [int(i) for i in span["iterations"].split(",")]
        assert span["background"] == colour(sum(steps) / len(steps), ENGINE["max_steps"]), span
    stats = browser.find_element(By.CSS_SELECTOR, ".message.assistant .stats").text
    assert stats.startswith(f"{out.usage.completion_tokens} tokens · {out.usage.mean_iterations:.2f} iterations")
    # A second turn carries the conversation: the reply is the server's for the whole history.
    browser.find_element(By.ID, "prompt").send_keys("sit tun")
    browser.find_element(By.ID, "send").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, '.message.assistant[data-state="done"]')) == 2)
    second = browser.execute_script(
        "const m = document.querySelectorAll('.message.assistant')[1]; return [...m.querySelectorAll('.tok')]"
        ".filter(e => !e.classList.contains('marker')).map(e => e.textContent).join('')")
    history = [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": choice.message.content},
               {"role": "user", "content": "sit tun"}]
    expected = client.chat.completions.create(
        model="tiny-words", messages=history, max_tokens=SETTINGS["max_tokens"], temperature=0, seed=0,
        extra_body={k: SETTINGS[k] for k in ("num_steps", "exit_criterion", "exit_threshold")})
    assert second == expected.choices[0].message.content


def test_a_bad_setting_shows_the_servers_error(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(served.url + "/")
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(10 * ENGINE["max_len"]))
    browser.find_element(By.ID, "prompt").send_keys(MESSAGE)
    browser.find_element(By.ID, "send").click()
    error = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.error"))[0]
    assert "exceeds this server's context" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
