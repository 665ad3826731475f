"""The UI workflow in a real browser: ComfyUI's page (frontend 1.27) with this package loaded.

Headless Debian chromium driven by selenium. The workflow must load with every node type
known (no missing-nodes dialog), and the graph the page would queue must be the API
workflow in workflows/ (so the two files are the same graph). A screenshot is kept in
test-output/.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from scripts.comfyui_server import PACKAGE_FOLDER, REPO_ROOT

pytestmark = pytest.mark.comfyui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1920,1080"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _wait_for_app(driver, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph);"):
            return
        time.sleep(0.5)
    raise TimeoutError("the ComfyUI page did not start its app")


# Loads the template as the frontend's template browser does: fetch it from ComfyUI's
# /api/workflow_templates/<package>/<name>.json route, then loadGraphData.
LOAD_AND_EXPORT = """
const [url, done] = [arguments[0], arguments[arguments.length - 1]];
(async () => {
  const workflow = await (await fetch(url)).json();
  await window.app.loadGraphData(workflow, true, true, "steadydancer");
  await new Promise(r => setTimeout(r, 1500));
  const nodes = window.app.graph._nodes;
  const unknown = nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
  const dialogs = [...document.querySelectorAll('.p-dialog, .p-toast-message, [role="dialog"], [role="alertdialog"], .comfy-modal')]
    .filter(d => d.offsetParent !== null).map(d => d.innerText);
  const prompt = await window.app.graphToPrompt();
  done({count: nodes.length, types: nodes.map(n => n.type), unknown, dialogs, output: prompt.output});
})().catch(e => done({error: String(e)}));
"""


@pytest.mark.parametrize(("ui_name", "api_name"), [
    ("steadydancer.json", "steadydancer_api.json"),
    ("steadydancer_long.json", "steadydancer_long_api.json"),
])  # fmt: skip
def test_ui_workflow_template_renders_every_node(comfy_server, browser, ui_name: str, api_name: str) -> None:
    workflow = json.loads((REPO_ROOT / "workflows" / ui_name).read_text())
    api_workflow = json.loads((REPO_ROOT / "workflows" / "api" / api_name).read_text())
    browser.get(comfy_server.url)
    _wait_for_app(browser)
    template = f"{comfy_server.url}/api/workflow_templates/{PACKAGE_FOLDER}/{ui_name}"
    result = browser.execute_async_script(LOAD_AND_EXPORT, template)
    out = REPO_ROOT / "test-output"
    out.mkdir(exist_ok=True)
    screenshot = out / ui_name.replace(".json", "_workflow.png")
    browser.save_screenshot(str(screenshot))

    assert "error" not in result, result.get("error")
    assert result["unknown"] == [], f"node types the page does not know: {result['unknown']}"
    assert result["dialogs"] == [], f"the page complained about the workflow: {result['dialogs']}"
    assert result["count"] == len(workflow["nodes"])
    # The page's own API export of the UI workflow is the API workflow: same nodes, settings, links.
    # A newer ComfyUI adds inputs with defaults to its own nodes (0.33: CreateVideo's bit_depth),
    # an older one lacks some (0.3.64's WAN Context Windows has no freenoise): ComfyUI's nodes are
    # compared on the inputs both have; this package's nodes must match exactly.
    exported = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["output"].items()}
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api_workflow.items()}
    assert exported.keys() == expected.keys()
    for key, node in expected.items():
        got = exported[key]
        assert got["class_type"] == node["class_type"]
        if node["class_type"].startswith("SteadyDancer"):
            assert got["inputs"] == node["inputs"], key
        else:
            shared = got["inputs"].keys() & node["inputs"].keys()
            assert {name: got["inputs"][name] for name in shared} == {name: node["inputs"][name] for name in shared}, key
            assert all(name in shared for name, v in node["inputs"].items() if isinstance(v, list)), key  # every link
    assert screenshot.stat().st_size > 10_000
