"""Regenerate a UI-format workflow from its API-format twin: workflows/steadydancer.json from
workflows/api/steadydancer_api.json, or with `--variant long` workflows/steadydancer_long.json
from workflows/api/steadydancer_long_api.json (made by `scripts/workflow_variants.py long`).

The UI format (node positions, widget order, link table) is what ComfyUI's frontend writes;
rather than imitate it, this asks the frontend itself: it starts ComfyUI with this package,
opens the page in headless chromium, loads the API graph with the frontend's own
`loadApiJson`, lays the nodes out in columns, and saves `app.graph.serialize()`.

    .venv/bin/python scripts/api_to_ui_workflow.py --comfyui $COMFYUI_DIR [--variant long]

Needs chromium + chromium-driver (Debian) and selenium. The browser test checks that the
result exports back to exactly the API graph.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from scripts.comfyui_server import REPO_ROOT, ComfyServer

# Columns of the layout, left to right (node ids of the API graph).
COLUMNS = [
    ["1", "2", "3", "4"],
    ["5", "6", "12"],
    ["7", "8", "9", "10", "11", "13"],
    ["14", "15", "16", "17", "100"],  # 100: the long variant's context-windows node
    ["18", "19", "20", "21", "22"],
    ["23", "24", "25"],
]

VARIANTS = {  # --variant: (API file in workflows/api, UI file in workflows)
    "example": ("steadydancer_api.json", "steadydancer.json"),
    "long": ("steadydancer_long_api.json", "steadydancer_long.json"),
}

# Seeds that stay fixed between runs: a new pose-augmentation seed would redo the pose
# rendering and every VAE encode of the conditioning for nothing.
FIXED_SEED_NODES = {"6"}

LAYOUT = """
const [api, columns, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
(async () => {
  await window.app.loadApiJson(api, "steadydancer");
  const graph = window.app.graph;
  let x = 0;
  for (const column of columns) {
    let y = 0, width = 0;
    for (const id of column) {
      const node = graph.getNodeById(+id);
      node.pos = [x, y];
      y += node.size[1] + 80;
      width = Math.max(width, node.size[0]);
    }
    x += width + 60;
  }
  const workflow = JSON.parse(JSON.stringify(graph.serialize()));  // drops undefined fields
  workflow.extra.ds = {scale: 0.7, offset: [30, 30]};  // the whole graph in view
  done(workflow);
})().catch(e => done({error: String(e)}));
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "tiny_models")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="example")
    args = parser.parse_args()
    from selenium import webdriver

    api_name, ui_name = VARIANTS[args.variant]
    api = json.loads((REPO_ROOT / "workflows" / "api" / api_name).read_text())
    columns = [[node for node in column if node in api] for column in COLUMNS]
    with tempfile.TemporaryDirectory() as work:
        server = ComfyServer(args.comfyui, Path(work), args.models)
        os.environ.setdefault("SE_AVOID_STATS", "true")
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1920,1080"):
            options.add_argument(arg)
        driver = None
        try:
            server.wait_ready()
            service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
            driver = webdriver.Chrome(service=service, options=options)
            driver.set_script_timeout(60)
            driver.get(server.url)
            while not driver.execute_script("return !!(window.app && window.app.graph)"):
                time.sleep(0.5)
            workflow = driver.execute_async_script(LAYOUT, api, columns)
        finally:
            if driver is not None:
                driver.quit()
            server.stop()
    if "error" in workflow:
        raise SystemExit(workflow["error"])
    for node in workflow["nodes"]:
        if str(node["id"]) in FIXED_SEED_NODES:
            node["widgets_values"] = ["fixed" if v == "randomize" else v for v in node["widgets_values"]]
    out = REPO_ROOT / "workflows" / ui_name
    out.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({len(workflow['nodes'])} nodes, {len(workflow['links'])} links)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
