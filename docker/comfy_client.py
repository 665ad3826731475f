"""A small client for ComfyUI's HTTP and websocket API, as the RunPod worker uses it.

Covers what a job needs: wait until the server answers, upload input files, queue an
API-format workflow, follow its execution over the websocket (progress, errors), read the
history and download the outputs. Every failure is a `ComfyError` subclass whose message
is meant for the person who sent the job.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests


class ComfyError(Exception):
    """ComfyUI could not run the job; the message says why."""


class ComfyUnavailable(ComfyError):
    """The ComfyUI server did not answer."""


class WorkflowRejected(ComfyError):
    """ComfyUI refused the workflow (validation: unknown node, bad input, missing model)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class ExecutionFailed(ComfyError):
    """A node raised while the workflow ran."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class JobTimeout(ExecutionFailed):
    """The workflow did not finish in time; it has been taken off the queue and interrupted."""

    def __init__(self, prompt_id: str, timeout: float) -> None:
        super().__init__(f"the workflow did not finish within the time limit ({timeout:.0f} s, "
                         f"STEADYDANCER_JOB_TIMEOUT); prompt {prompt_id}", {"prompt_id": prompt_id})
        self.prompt_id = prompt_id


@dataclass(frozen=True)
class Progress:
    """One progress event: `value` of `max` steps in `node` (a node id of the workflow)."""

    node: str | None
    value: int
    max: int


@dataclass(frozen=True)
class OutputFile:
    """A file a node saved: where ComfyUI's /view finds it, and which node made it."""

    node: str
    filename: str
    subfolder: str
    type: str
    kind: str  # the key in the node's output: images, gifs, videos, audio, ...

    @property
    def is_video(self) -> bool:
        return self.filename.lower().rsplit(".", 1)[-1] in VIDEO_EXTENSIONS


VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mov", "mkv", "avi", "gif"})


def format_node_errors(response: dict[str, Any], workflow: dict[str, Any] | None = None) -> str:
    """One readable message from /prompt's 400 answer ({"error": ..., "node_errors": ...})."""
    lines = []
    error = response.get("error")
    if isinstance(error, dict):
        lines.append(error.get("message") or error.get("type") or "workflow rejected")
        if error.get("details"):
            lines.append(str(error["details"]))
    elif error:
        lines.append(str(error))
    for node_id, info in (response.get("node_errors") or {}).items():
        class_type = info.get("class_type") or (workflow or {}).get(node_id, {}).get("class_type", "?")
        title = (workflow or {}).get(node_id, {}).get("_meta", {}).get("title")
        label = f"node {node_id} ({class_type}{', ' + repr(title) if title and title != class_type else ''})"
        for err in info.get("errors", []):
            detail = err.get("details") or ""
            message = err.get("message") or err.get("type") or "error"
            lines.append(f"{label}: {message}{': ' + detail if detail else ''}")
    return "\n".join(lines) or "ComfyUI rejected the workflow"


def format_execution_error(data: dict[str, Any]) -> str:
    """One readable message from an `execution_error` websocket event."""
    node = data.get("node_id")
    node_type = data.get("node_type")
    exc_type = data.get("exception_type") or "error"
    message = (data.get("exception_message") or "").strip()
    where = f"node {node} ({node_type})" if node else "ComfyUI"
    return f"{where} failed: {exc_type}: {message}" if message else f"{where} failed: {exc_type}"


def collect_outputs(history_entry: dict[str, Any]) -> list[OutputFile]:
    """Files the workflow saved (type "output"), in node order, from a /history entry."""
    files = []
    outputs = history_entry.get("outputs") or {}
    for node_id in sorted(outputs, key=lambda n: (len(n), n)):
        for kind, items in outputs[node_id].items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and item.get("filename") and item.get("type", "output") == "output":
                    files.append(OutputFile(
                        node=node_id, filename=item["filename"], subfolder=item.get("subfolder", ""),
                        type=item.get("type", "output"), kind=kind,
                    ))
    return files


@dataclass
class ComfyClient:
    """ComfyUI at `base_url` (e.g. http://127.0.0.1:8188)."""

    base_url: str = "http://127.0.0.1:8188"
    timeout: float = 30.0
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    session: requests.Session = field(default_factory=requests.Session)

    def _url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def _get(self, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.get(self._url(path), timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ComfyUnavailable(f"ComfyUI at {self.base_url} did not answer {path}: {exc}") from None
        if response.status_code != 200:
            raise ComfyError(f"ComfyUI answered {path} with HTTP {response.status_code}: {response.text[:300]}")
        return response

    def wait_ready(self, timeout: float = 600.0, interval: float = 1.0) -> dict[str, Any]:
        """Wait until /system_stats answers; returns it. ComfyUI takes a while to start."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self._get("/system_stats").json()
            except (ComfyError, ValueError) as exc:
                last = exc
                time.sleep(interval)
        raise ComfyUnavailable(f"ComfyUI at {self.base_url} was not ready after {timeout:.0f} s ({last})")

    def upload(self, name: str, data: bytes, *, subfolder: str = "", overwrite: bool = False) -> str:
        """Put a file in ComfyUI's input folder (in `subfolder`); returns the name to use in the
        workflow. Without `overwrite`, ComfyUI never replaces a file: it stores the upload under
        another name (or, for identical content, answers with the existing file's name)."""
        try:
            response = self.session.post(
                self._url("/upload/image"),
                files={"image": (name, data)},
                data={"overwrite": "true" if overwrite else "false", "type": "input", "subfolder": subfolder},
                timeout=max(self.timeout, 120.0),
            )
        except requests.RequestException as exc:
            raise ComfyUnavailable(f"uploading {name} to ComfyUI failed: {exc}") from None
        if response.status_code != 200:
            raise ComfyError(f"ComfyUI refused the upload of {name}: HTTP {response.status_code} {response.text[:300]}")
        info = response.json()
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue(self, workflow: dict[str, Any]) -> str:
        """Submit an API-format workflow; returns its prompt id. Raises WorkflowRejected."""
        try:
            response = self.session.post(
                self._url("/prompt"), json={"prompt": workflow, "client_id": self.client_id},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ComfyUnavailable(f"submitting the workflow to ComfyUI failed: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:500]}
        if response.status_code != 200 or "prompt_id" not in body:
            raise WorkflowRejected(format_node_errors(body, workflow), body)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The /history entry of a prompt, or None while it is not finished."""
        return self._get(f"/history/{prompt_id}").json().get(prompt_id)

    def download(self, output: OutputFile) -> bytes:
        params = {"filename": output.filename, "subfolder": output.subfolder, "type": output.type}
        return self._get("/view", params=params).content

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running prompt (only `prompt_id`, if given and ComfyUI knows targeted interrupts)."""
        with contextlib.suppress(requests.RequestException):
            self.session.post(self._url("/interrupt"), json={"prompt_id": prompt_id} if prompt_id else {},
                              timeout=self.timeout)

    def cancel(self, prompt_id: str) -> None:
        """Take a prompt off the queue if it has not started, and interrupt it if it runs."""
        with contextlib.suppress(requests.RequestException):
            self.session.post(self._url("/queue"), json={"delete": [prompt_id]}, timeout=self.timeout)
        self.interrupt(prompt_id)

    def is_queued_or_running(self, prompt_id: str) -> bool:
        """Whether ComfyUI's queue still holds the prompt (running or pending)."""
        queue = self._get("/queue").json()
        items = [*(queue.get("queue_running") or []), *(queue.get("queue_pending") or [])]
        return any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in items)

    def wait_stopped(self, prompt_id: str, timeout: float, interval: float = 0.5) -> bool:
        """Wait until ComfyUI has dropped the prompt; False if it still holds it after `timeout` s
        (a node that never checks for interrupts) or does not answer."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self.is_queued_or_running(prompt_id):
                    return True
            except (ComfyError, ValueError):
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def run(
        self,
        workflow: dict[str, Any],
        *,
        on_progress: Callable[[Progress], None] | None = None,
        timeout: float = 3600.0,
        connect: Callable[[str], Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Queue a workflow and follow it to its end; returns (prompt id, history entry).

        The websocket is opened before the workflow is queued, so that no event of a fast
        (or fully cached) run is missed. Raises WorkflowRejected or ExecutionFailed.
        """
        try:
            ws = (connect or _connect_websocket)(self._ws_url())
        except Exception:  # no websocket: the history is polled instead
            ws = None
        try:
            prompt_id = self.queue(workflow)
            return prompt_id, self.wait(prompt_id, on_progress=on_progress, timeout=timeout, ws=ws)
        finally:
            if ws is not None:
                with contextlib.suppress(Exception):
                    ws.close()

    def wait(
        self,
        prompt_id: str,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        timeout: float = 3600.0,
        ws: Any = None,
    ) -> dict[str, Any]:
        """Follow a queued prompt until it ends; returns its history entry.

        Progress and errors come from the websocket `ws` (opened on /ws with this client's id)
        when given; without it, or when it drops, the history is polled, so a job never hangs
        on a lost connection. Raises ExecutionFailed with the failing node and its exception,
        JobTimeout after `timeout` seconds, once the prompt is off the queue and interrupted.
        """
        deadline = time.monotonic() + timeout
        try:
            if ws is not None:
                self._follow_websocket(ws, prompt_id, on_progress, deadline)
            return self._poll_history(prompt_id, deadline)
        except _DeadlinePassed:
            self.cancel(prompt_id)
            raise JobTimeout(prompt_id, timeout) from None

    def _ws_url(self) -> str:
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}/ws?clientId={self.client_id}"

    def _follow_websocket(
        self, ws: Any, prompt_id: str, on_progress: Callable[[Progress], None] | None, deadline: float
    ) -> None:
        while time.monotonic() < deadline:
            if hasattr(ws, "settimeout"):  # a quiet server must not keep us past the deadline
                ws.settimeout(max(0.1, min(WS_RECV_TIMEOUT, deadline - time.monotonic())))
            try:
                message = ws.recv()
            except Exception as exc:
                if type(exc).__name__ == "WebSocketTimeoutException":
                    # Quiet for a while: make sure the prompt did not finish unseen.
                    if self.history(prompt_id) is not None:
                        return
                    continue
                return  # connection lost: the caller polls the history
            if not isinstance(message, str):
                continue  # binary frames are previews
            try:
                event = json.loads(message)
            except ValueError:
                continue
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "execution_error":
                raise ExecutionFailed(format_execution_error(data), data)
            if kind == "execution_interrupted":
                raise ExecutionFailed("the workflow was interrupted", data)
            if kind == "progress" and on_progress is not None:
                node = data.get("node")
                on_progress(Progress(None if node is None else str(node), int(data.get("value", 0)),
                                     int(data.get("max", 0))))
            if kind == "execution_success":
                return
            if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return
        raise _DeadlinePassed

    def _poll_history(self, prompt_id: str, deadline: float, interval: float = 1.0) -> dict[str, Any]:
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    for name, data in status.get("messages", []):
                        if name == "execution_error":
                            raise ExecutionFailed(format_execution_error(data), data)
                    raise ExecutionFailed("the workflow failed (no error message in ComfyUI's history)")
                return entry
            if time.monotonic() > deadline:
                raise _DeadlinePassed
            time.sleep(interval)


class _DeadlinePassed(Exception):
    """Internal: the job's time is up (wait() cancels the prompt and raises JobTimeout)."""


# Longest wait for one websocket message before the history is checked.
WS_RECV_TIMEOUT = 10.0


def _connect_websocket(url: str, timeout: float = 10.0) -> Any:
    import websocket  # websocket-client

    ws = websocket.create_connection(url, timeout=timeout)
    return ws
