"""The chat page at / in a real headless browser (Debian's chromium and chromium-driver, driven by
Selenium): it lists the models, streams an answer equal to a fresh session's, shows the speed, and
Stop cancels the generation on the server."""

from __future__ import annotations

import os
import shutil
import time

import httpx2 as httpx
import pytest

from live_server import API_KEY

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them "
                "when run as root)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    os.environ["SE_OFFLINE"] = "true"  # Selenium must not look for drivers on the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def running(server) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("pocketlm_running_sequences{"))


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")


def finished(driver, n: int):
    """The n-th answer once its stats line is there (it is added when the answer ends)."""
    found = answers(driver)
    if len(found) >= n:
        stats = found[n - 1].find_elements(By.CSS_SELECTOR, ".stats")
        if stats or "error" in found[n - 1].get_attribute("class"):
            return found[n - 1]
    return False


def test_chat_page(browser, server, reference):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    # the server wants a key: the page asks for it, then lists the models
    wait.until(lambda d: d.find_element(By.ID, "key-label").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "system").click()  # the key field's change event
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    Select(browser.find_element(By.ID, "model")).select_by_value("smollm2")
    browser.find_element(By.ID, "temperature").send_keys("0")

    question = "What is the capital of France?"
    expected = "".join(reference["smollm2"].create_session().chat([{"role": "user", "content": question}],
                                                                  temperature=0, max_tokens=900))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys(question)
    prompt.send_keys("\n")  # Enter sends
    answer = wait.until(lambda d: finished(d, 1))
    stats = answer.find_element(By.CSS_SELECTOR, ".stats")
    assert answer.text.removesuffix(stats.text).strip() == expected.strip()
    assert stats.get_attribute("data-reason") == "stop" and "first token" in stats.text
    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.text for u in user] == [question]

    # Stop: a long answer, stopped once text streams in; the server cancels it. Sampled at
    # temperature 1, SmolLM2 at ~400 tok/s may end its story before the click: then it asks again.
    # Watched every 20 ms (WebDriverWait's default, 0.5 s, is ~200 tokens: a short story's whole length).
    fast = WebDriverWait(browser, 60, poll_frequency=0.02)
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("1")
    for n in range(2, 6):
        prompt.send_keys("Write a very long story about a dragon and a knight, with many chapters.")
        browser.find_element(By.ID, "send").click()
        fast.until(lambda d: len(answers(d)) == n and len(answers(d)[n - 1].text) > 20)
        if running(server) >= 1:
            browser.find_element(By.ID, "stop").click()
            answer = wait.until(lambda d: finished(d, n))
            if answer.find_element(By.CSS_SELECTOR, ".stats").get_attribute("data-reason") == "stopped":
                break
        else:
            wait.until(lambda d: finished(d, n))
    else:
        pytest.fail("four long answers in a row ended before Stop could be clicked")
    assert answer.find_element(By.CSS_SELECTOR, ".stats").get_attribute("data-reason") == "stopped"
    assert browser.find_element(By.ID, "send").is_enabled()
    deadline = time.monotonic() + 10
    while running(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server) == 0
