"""A RunPod job that runs past STEADYDANCER_JOB_TIMEOUT (docker/comfy_client.py, runpod_handler.py).

The worker takes the prompt off ComfyUI's queue and interrupts it, in websocket mode as in
polling mode, so that the dead job does not keep the GPU from the next one; a prompt still
running STEADYDANCER_INTERRUPT_GRACE seconds after its interrupt (a node that never checks
for interrupts) makes the job's result ask RunPod for a fresh worker (`refresh_worker`).
Checked with a recording HTTP session and, with COMFYUI_DIR, against a real ComfyUI running
a chain of slow core nodes on the CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from docker_modules import load_docker_module, running_comfyui

cc = load_docker_module("comfy_client")
rh = load_docker_module("runpod_handler")


class _Response:
    def __init__(self, body: Any, status: int = 200) -> None:
        self.body, self.status_code, self.text = body, status, str(body)

    def json(self) -> Any:
        return self.body


class RecordingSession:
    """requests.Session stand-in: records POSTs; a prompt that never finishes on GET."""

    def __init__(self, running: list[str] | None = None) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.running = running if running is not None else []

    def post(self, url: str, json: Any = None, **kwargs: Any) -> _Response:
        self.posts.append((url.split("/", 3)[-1], json))
        if url.endswith("/prompt"):
            return _Response({"prompt_id": "p1"})
        if url.endswith("/queue") and json and "delete" in json:
            self.running[:] = [p for p in self.running if p not in json["delete"]]
        return _Response({})

    def get(self, url: str, **kwargs: Any) -> _Response:
        if "/history/" in url:
            return _Response({})  # not finished
        if url.endswith("/queue"):
            return _Response({"queue_running": [[0, p, {}, {}, []] for p in self.running], "queue_pending": []})
        return _Response({})


class QuietWebSocket:
    """A websocket on which nothing ever happens (recv times out), like a stuck node's."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def settimeout(self, seconds: float) -> None:
        self.timeouts.append(seconds)

    def recv(self) -> str:
        time.sleep(min(self.timeouts[-1], 0.05))
        raise type("WebSocketTimeoutException", (Exception,), {})()

    def close(self) -> None:
        pass


def test_a_timeout_in_websocket_mode_dequeues_and_interrupts_the_prompt():
    client = cc.ComfyClient("http://comfy.invalid", session=RecordingSession())
    ws = QuietWebSocket()
    started = time.monotonic()
    with pytest.raises(cc.JobTimeout, match=r"did not finish within the time limit \(0 s, STEADYDANCER_JOB_TIMEOUT\)"):
        client.run({"1": {"class_type": "X", "inputs": {}}}, timeout=0.3, connect=lambda url: ws)
    assert time.monotonic() - started < 2
    assert client.session.posts[1:] == [("queue", {"delete": ["p1"]}), ("interrupt", {"prompt_id": "p1"})]
    assert max(ws.timeouts) <= 0.3  # no recv waits past the job's deadline


def test_a_timeout_in_polling_mode_does_the_same():
    client = cc.ComfyClient("http://comfy.invalid", session=RecordingSession())

    def no_websocket(url):
        raise OSError("refused")

    with pytest.raises(cc.JobTimeout):
        client.run({}, timeout=0.2, connect=no_websocket)
    assert client.session.posts[1:] == [("queue", {"delete": ["p1"]}), ("interrupt", {"prompt_id": "p1"})]


def test_wait_stopped_reads_comfyuis_queue():
    session = RecordingSession(running=["p1"])
    client = cc.ComfyClient("http://comfy.invalid", session=session)
    assert client.wait_stopped("p1", timeout=0.2, interval=0.05) is False
    assert client.wait_stopped("other", timeout=0.2) is True
    session.running.clear()
    assert client.wait_stopped("p1", timeout=0.2) is True


class TimingOutClient:
    def __init__(self, stops: bool) -> None:
        self.stops, self.grace = stops, None

    def wait_ready(self, timeout):
        return {}

    def upload(self, name, data, subfolder=""):
        return f"{subfolder}/{name}"

    def run(self, workflow, on_progress, timeout):
        raise cc.JobTimeout("p9", timeout)

    def wait_stopped(self, prompt_id, timeout):
        self.grace = timeout
        return self.stops


WORKFLOW_JOB = {"input": {"workflow": {"1": {"class_type": "X", "inputs": {}}}}}


def test_a_prompt_that_stops_after_its_interrupt_keeps_the_worker():
    client = TimingOutClient(stops=True)
    result = rh.run_job(WORKFLOW_JOB, client=client, environ={"STEADYDANCER_INTERRUPT_GRACE": "7"})
    assert "did not finish within the time limit" in result["error"]
    assert "refresh_worker" not in result and client.grace == 7


def test_a_prompt_that_does_not_stop_asks_runpod_for_a_new_worker():
    result = rh.run_job(WORKFLOW_JOB, client=TimingOutClient(stops=False), environ={})
    assert result["refresh_worker"] is True
    assert "worker is replaced" in result["error"]


# --- a real ComfyUI ---------------------------------------------------------------------------

def slow_chain(colour: int, blurs: int, size: int = 1024) -> dict[str, Any]:
    """EmptyImage, then `blurs` ImageBlur nodes (about 1.5 s each at 1024 px on two CPU cores)."""
    workflow = {"1": {"class_type": "EmptyImage",
                      "inputs": {"width": size, "height": size, "batch_size": 1, "color": colour}}}
    for i in range(blurs):
        workflow[str(i + 2)] = {"class_type": "ImageBlur",
                                "inputs": {"image": [str(i + 1), 0], "blur_radius": 31, "sigma": 1.0 + i}}
    workflow[str(blurs + 2)] = {"class_type": "SaveImage",
                                "inputs": {"images": [str(blurs + 1), 0], "filename_prefix": "slow"}}
    return workflow


@pytest.fixture(scope="module")
def comfyui_url():
    with tempfile.TemporaryDirectory() as work, running_comfyui(Path(work)) as url:
        yield url


@pytest.mark.comfyui
def test_real_comfyui_a_timed_out_job_stops_and_the_next_one_runs_at_once(comfyui_url):
    client = cc.ComfyClient(comfyui_url)
    started = time.monotonic()
    result = rh.run_job({"input": {"workflow": slow_chain(1, blurs=8)}}, client=client,
                        environ={"STEADYDANCER_JOB_TIMEOUT": "2", "STEADYDANCER_INTERRUPT_GRACE": "30"})
    assert "did not finish within the time limit" in result["error"], result
    assert "refresh_worker" not in result  # interrupted between two nodes
    assert not client.is_queued_or_running(result["prompt_id"])
    # The 8 blurs would take about 12 s; the job is over after the timeout and the node that ran.
    assert time.monotonic() - started < 10
    started = time.monotonic()
    result = rh.run_job({"input": {"workflow": slow_chain(2, blurs=1, size=64)}}, client=client, environ={})
    assert "error" not in result, result
    assert time.monotonic() - started < 5  # not queued behind the dead job


@pytest.mark.comfyui
def test_real_comfyui_a_node_that_outlasts_the_grace_replaces_the_worker(comfyui_url):
    client = cc.ComfyClient(comfyui_url)
    result = rh.run_job({"input": {"workflow": slow_chain(3, blurs=1, size=2048)}}, client=client,
                        environ={"STEADYDANCER_JOB_TIMEOUT": "1", "STEADYDANCER_INTERRUPT_GRACE": "0.5"})
    assert result["refresh_worker"] is True, result
    assert client.wait_stopped(result["prompt_id"], timeout=60)  # it ends by itself eventually
