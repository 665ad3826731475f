"""A ComfyUI server process with this package, and its HTTP and websocket API.

`ComfyServer` starts ComfyUI's main.py on a free loopback port with this package loaded
from the checkout, without copying it: an extra_model_paths file whose `custom_nodes` entry
is a folder holding a symlink to the repository, its model folders pointing at a models
folder. The demo, the integration tests and the pipeline benchmark use it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDER = "comfyui-steadydancer"
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "clip_vision", "vae", "dwpose", "loras")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfyui_python(comfyui_dir: Path) -> str:
    """COMFYUI_PYTHON, else ComfyUI's own .venv, else `python3`."""
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = comfyui_dir / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else "python3"


def write_extra_paths(work: Path, models: Path) -> Path:
    """extra_model_paths.yaml: our package as a custom node, the models folders under `models`."""
    nodes_dir = work / "custom_nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    link = nodes_dir / PACKAGE_FOLDER
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    lines = ["steadydancer_test:", f"  base_path: {models}", f"  custom_nodes: {nodes_dir}"]
    lines += [f"  {name}: {name}" for name in MODEL_FOLDERS]
    config = work / "extra_model_paths.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


class ComfyServer:
    """A ComfyUI process on a free loopback port; `stop()` ends it (only it)."""

    def __init__(
        self, comfyui_dir: Path, work: Path, models: Path, *, input_dir: Path | None = None, output_dir: Path | None = None,
        comfy_args: tuple[str, ...] = ("--cpu",),
    ) -> None:
        """`comfy_args`: ComfyUI's own flags (default `--cpu`; () starts it as it starts on a GPU)."""
        self.comfyui_dir = comfyui_dir
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = output_dir or work / "output"
        self.input_dir = input_dir or work / "input"
        self.log_path = work / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        config = write_extra_paths(work, models)
        for folder in (self.input_dir, self.output_dir):
            folder.mkdir(parents=True, exist_ok=True)
        command = [
            comfyui_python(comfyui_dir), "main.py", *comfy_args, "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--extra-model-paths-config", str(config),
            "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
            "--temp-directory", str(work),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, cwd=comfyui_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()}")
        failed = [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if PACKAGE_FOLDER in line and ("IMPORT FAILED" in line or "Error while calling comfy_entrypoint" in line)
        ]
        if failed:  # ComfyUI starts anyway; say why our nodes are missing
            raise RuntimeError(f"ComfyUI could not load the package ({failed[0].strip()}):\n{self.log(8000)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    # --- HTTP API -------------------------------------------------------------------------
    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=30)

    def object_info(self) -> dict:
        return self.get("/object_info").json()

    def submit(self, graph: dict) -> requests.Response:
        """POST /prompt; the response is returned as is (200 with prompt_id, or 400 with node_errors)."""
        return requests.post(f"{self.url}/prompt", json={"prompt": graph, "client_id": self.client_id}, timeout=60)

    def interrupt(self) -> None:
        requests.post(f"{self.url}/interrupt", timeout=10).raise_for_status()

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").json().get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt finished (successfully or not); returns its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)  # present once the prompt has finished
            if entry:
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log()}")

    def websocket(self):  # -> websocket.WebSocket
        import websocket

        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=30)
        return ws


def messages_until_done(ws, prompt_id: str, timeout: float = 600.0, on_message=None) -> list[dict]:
    """Websocket JSON messages of one prompt, until it succeeded, failed or was interrupted."""
    messages: list[dict] = []
    deadline = time.monotonic() + timeout
    ws.settimeout(5)
    while time.monotonic() < deadline:
        try:
            raw = ws.recv()
        except Exception as error:  # websocket timeouts: keep waiting until the deadline
            if type(error).__name__ == "WebSocketTimeoutException":
                continue
            raise
        if not isinstance(raw, str):
            continue  # binary preview frames
        message = json.loads(raw)
        data = message.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        messages.append(message)
        if on_message is not None:
            on_message(message)
        if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            return messages
    raise TimeoutError(f"no end of prompt {prompt_id} on the websocket within {timeout:.0f} s")


def saved_files(entry: dict) -> list[dict]:
    """Every file the prompt's output nodes reported (images, videos, ...)."""
    files = []
    for output in entry.get("outputs", {}).values():
        for items in output.values():
            if isinstance(items, list):
                files.extend(item for item in items if isinstance(item, dict) and "filename" in item)
    return files
