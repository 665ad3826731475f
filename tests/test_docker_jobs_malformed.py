"""Malformed and hostile RunPod jobs through the worker (docker/runpod_handler.py).

Each job of JOBS goes through `run_job` with the files ComfyUI's input and output folders
held before it. Every one must come back as a result (never an exception, never the
handler's "internal error" catch-all), with the expected message, and leave both folders
exactly as they were: the same files with the same bytes and times, nothing of the job
left over. The jobs run against a stand-in ComfyUI that stores uploads, validates and runs
LoadImage/ImageInvert/SaveImage the way ComfyUI does, and, with COMFYUI_DIR, against a real
ComfyUI too.

The list is the hardening issue's, rebuilt: wrong types, NaN/Infinity/1e309 numbers (valid
for Python's json and for the RunPod SDK), huge strings, bad base64, bad URLs, private
addresses, path traversal names, duplicate names, names of files already in the input
folder, oversize media. Run `pytest -q tests/test_docker_jobs_malformed.py -k fake` for
the count in docs/reliability.md.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import inspect
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from docker_modules import load_docker_module, running_comfyui

cc = load_docker_module("comfy_client")
ji = load_docker_module("job_input")
rh = load_docker_module("runpod_handler")


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RED, GREEN = (200, 10, 10), (10, 200, 30)
USERS_PNG = png(RED)  # input/existing.png, a file of the user's
JOB_PNG = png(GREEN)
MP4 = b"\x00\x00\x00\x20ftypisom" + b"\x00" * 64
PNG_HEADER_ONLY = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # passes the type check, not an image
MB = 2**20
# The limits the jobs run under (small, so that the oversize jobs stay small).
ENV = {"STEADYDANCER_MAX_INPUT_MB": "1", "STEADYDANCER_MAX_TOTAL_INPUT_MB": "1.5",
       "STEADYDANCER_MAX_IMAGES": "16", "STEADYDANCER_MAX_PROMPT_CHARS": "4000",
       "STEADYDANCER_DOWNLOAD_TIMEOUT": "5", "STEADYDANCER_JOB_TIMEOUT": "60"}

IMAGE_WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "existing.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "worker-test"}},
}


def j(text: str) -> Any:
    """From JSON text, as the SDK parses it: NaN, Infinity and 1e309 (inf) are valid there."""
    return json.loads(text)


def simple(**params: Any) -> dict[str, Any]:
    return {"image": b64(JOB_PNG), "video": b64(MP4), **params}


def workflow_job(images: Any = None, workflow: Any = None, **extra: Any) -> dict[str, Any]:
    job = {"workflow": IMAGE_WORKFLOW if workflow is None else workflow, **extra}
    if images is not None:
        job["images"] = images
    return job


def deep(levels: int) -> dict[str, Any]:
    value: Any = 0
    for _ in range(levels):
        value = {"a": value}
    return value


REJECTED = "ComfyUI rejected the workflow"
NOT_A_NUMBER = "must be an integer"
BAD_NAME = "must be a plain file name"
PRIVATE = "cannot be fetched"

# (id, job input, what the error says: a string, a tuple of alternatives, or None for success)
JOBS: list[tuple[str, Any, Any]] = [
    # the input itself
    ("input-string", "hello", "must be an object"),
    ("input-list", [], "must be an object"),
    ("input-null", None, "must be an object"),
    ("input-empty", {}, "must be an object"),
    ("input-number", 5, "must be an object"),
    # media
    ("no-video", {"image": b64(JOB_PNG)}, "`video` is required"),
    ("image-number", simple(image=123), "`image` must be a base64 string"),
    ("image-empty", simple(image=""), "`image` must be a base64 string"),
    ("image-bad-base64", simple(image="not base64 !!"), "neither an http(s) URL nor valid base64"),
    ("image-non-ascii", simple(image="ÿÿÿÿ"), "neither an http(s) URL nor valid base64"),
    ("image-text-file", simple(image=b64(b"hello world")), "not a file type we recognise"),
    ("image-is-a-video", simple(image=b64(MP4)), "`image` is a mp4 file"),
    ("video-is-an-image", simple(video=b64(JOB_PNG)), "`video` is a png file"),
    ("data-url-bad-payload", simple(image="data:image/png;base64,!!!!"), "neither an http(s) URL"),
    ("image-oversize", simple(image=b64(JOB_PNG + b"\x00" * (2 * MB))), "larger than 1 MB"),
    ("media-oversize-together", simple(image=b64(JOB_PNG + b"\x00" * (MB - 2000)),
                                       video=b64(MP4 + b"\x00" * (MB - 2000))), "add up to more than 1.5 MB"),
    # numbers: NaN, Infinity and 1e309 as the SDK's json gives them
    ("seed-nan", simple(seed=j("NaN")), NOT_A_NUMBER),
    ("seed-infinity", simple(seed=j("Infinity")), NOT_A_NUMBER),
    ("seed-minus-infinity", simple(seed=j("-Infinity")), NOT_A_NUMBER),
    ("seed-1e309", simple(seed=j("1e309")), NOT_A_NUMBER),
    ("steps-nan", simple(steps=j("NaN")), NOT_A_NUMBER),
    ("steps-1e309", simple(steps=j("1e309")), NOT_A_NUMBER),
    ("width-1e309", simple(width=j("1e309"), height=480), NOT_A_NUMBER),
    ("height-nan", simple(width=480, height=j("NaN")), NOT_A_NUMBER),
    ("length-infinity", simple(length=j("Infinity")), NOT_A_NUMBER),
    ("size-nan-pair", simple(size=j("[NaN, 480]")), NOT_A_NUMBER),
    ("size-infinite-pair", simple(size=j("[Infinity, 1e309]")), NOT_A_NUMBER),
    ("size-5000-digits", simple(size="9" * 5000 + "x480"), 'look like "480x832"'),
    ("size-1e309-text", simple(size="1e309x480"), 'look like "480x832"'),
    ("size-object", simple(size={"w": 480}), 'look like "480x832"'),
    ("seed-string", simple(seed="7"), NOT_A_NUMBER),
    ("seed-bool", simple(seed=True), NOT_A_NUMBER),
    ("seed-2-to-the-70", simple(seed=2**70), "between 0 and"),
    ("seed-negative", simple(seed=-1), "between 0 and"),
    ("steps-fraction", simple(steps=1.5), NOT_A_NUMBER),
    ("length-not-4k+1", simple(length=32), "4k+1 frames"),
    ("width-not-multiple-of-16", simple(size="500x832"), "multiple of 16"),
    ("width-a-million", simple(width=1e6, height=480), "between 16 and 4096"),
    # strings
    ("prompt-1-mb", simple(prompt="a" * MB), "STEADYDANCER_MAX_PROMPT_CHARS"),
    ("negative-prompt-1-mb", simple(negative_prompt="b" * MB), "STEADYDANCER_MAX_PROMPT_CHARS"),
    ("prompt-object", simple(prompt={"a": 1}), "`prompt` must be a string"),
    ("prompt-list", simple(prompt=["a"]), "`prompt` must be a string"),
    ("prompt-lone-surrogate", simple(prompt=j('"\\ud800 dancer"')), REJECTED),
    ("model-number", simple(model=5), "`model` must be a file name"),
    ("model-10000-characters", simple(model="x" * 10000), "`model` must be a file name"),
    ("unknown-key", simple(fps=8), "unknown input ['fps']"),
    ("ten-thousand-unknown-keys", simple(**{f"k{i}": i for i in range(10000)}), "unknown input"),
    # URLs: private addresses (the SDK's guard), and URLs that are not valid at all
    ("url-loopback-comfyui", simple(image="http://127.0.0.1:8188/view?filename=existing.png&type=input"), PRIVATE),
    ("url-cloud-metadata", simple(image="http://169.254.169.254/latest/meta-data/"), PRIVATE),
    ("url-ipv6-loopback", simple(image="http://[::1]:8188/x.png"), PRIVATE),
    ("url-private-network", simple(video="http://10.0.0.1/x.mp4"), PRIVATE),
    ("url-with-password", simple(image="http://user:secret@127.0.0.1/x.png"), PRIVATE),
    ("url-port-99999", simple(image="http://1.1.1.1:99999/x.png"), "could not be downloaded"),
    ("url-broken-ipv6", simple(image="http://[::1/x.png"), "could not be downloaded"),
    ("url-300-character-label", simple(image="https://" + "a" * 300 + ".com/x.png"),
     ("could not be downloaded", PRIVATE)),
    ("url-ftp", simple(image="ftp://1.2.3.4/x.png"), "neither an http(s) URL nor valid base64"),
    ("url-file", simple(image="file:///etc/passwd"), "neither an http(s) URL nor valid base64"),
    # workflow requests
    ("workflow-not-json", workflow_job(workflow="{not json"), "not JSON"),
    ("workflow-100000-brackets", workflow_job(workflow="[" * 100000), "nested too deeply"),
    ("workflow-5000-levels", workflow_job(workflow={"1": {"class_type": "X", "inputs": {"v": deep(5000)}}}),
     "nested too deeply"),
    ("workflow-list", workflow_job(workflow=[]), "must be an API-format workflow"),
    ("workflow-ui-format", workflow_job(workflow={"nodes": [], "links": []}), "UI format"),
    ("workflow-class-type-number", workflow_job(workflow={"1": {"class_type": 5, "inputs": {}}}), "no class_type"),
    ("workflow-inputs-list", workflow_job(workflow={"1": {"class_type": "LoadImage", "inputs": []}}),
     "`inputs` must be an object"),
    ("workflow-nan-literal", workflow_job(workflow={"1": {"class_type": "X", "inputs": {"v": j("NaN")}}}),
     "NaN and Infinity are not allowed"),
    ("workflow-1-mb-prompt", workflow_job(workflow={"1": {"class_type": "CLIPTextEncode",
                                                          "inputs": {"text": "a" * MB, "clip": ["2", 0]}}}),
     "STEADYDANCER_MAX_PROMPT_CHARS"),
    ("workflow-unknown-key", workflow_job(prompt="x"), "unknown input ['prompt']"),
    ("workflow-unknown-node", workflow_job(workflow={"1": {"class_type": "NoSuchNode", "inputs": {}}}), REJECTED),
    ("images-not-a-list", workflow_job(images="x"), "`images` must be a list"),
    ("images-path-traversal", workflow_job([{"name": "../../etc/passwd", "image": b64(JOB_PNG)}]), BAD_NAME),
    ("images-absolute-path", workflow_job([{"name": "/tmp/x.png", "image": b64(JOB_PNG)}]), BAD_NAME),
    ("images-hidden-file", workflow_job([{"name": ".bashrc", "image": b64(JOB_PNG)}]), BAD_NAME),
    ("images-backslash", workflow_job([{"name": "..\\x.png", "image": b64(JOB_PNG)}]), BAD_NAME),
    ("images-output-annotation", workflow_job([{"name": "existing.png [output]", "image": b64(JOB_PNG)}]), BAD_NAME),
    ("images-nul-in-name", workflow_job([{"name": "a\x00.png", "image": b64(JOB_PNG)}]), BAD_NAME),
    ("images-300-character-name", workflow_job([{"name": "a" * 300 + ".png", "image": b64(JOB_PNG)}]), BAD_NAME),
    ("images-name-not-unicode", workflow_job([{"name": j('"\\udc80.png"'), "image": b64(JOB_PNG)}]),
     "not valid Unicode"),
    ("images-name-number", workflow_job([{"name": 5, "image": b64(JOB_PNG)}]), BAD_NAME),
    ("images-duplicate-names", workflow_job([{"name": "a.png", "image": b64(JOB_PNG)},
                                             {"name": "a.png", "image": b64(USERS_PNG)}]), "given twice"),
    ("images-17-entries", workflow_job([{"name": f"{i}.png", "image": b64(JOB_PNG)} for i in range(17)]),
     "STEADYDANCER_MAX_IMAGES"),
    ("images-extra-key", workflow_job([{"name": "a.png", "image": b64(JOB_PNG), "subfolder": ".."}]),
     "must be {\"name\""),
    ("images-image-number", workflow_job([{"name": "a.png", "image": 5}]), "must be a base64 string"),
    ("images-bad-base64", workflow_job([{"name": "a.png", "image": "%%%"}]), "neither an http(s) URL"),
    ("images-private-url", workflow_job([{"name": "a.png", "image": "http://192.168.1.1/a.png"}]), PRIVATE),
    ("images-oversize", workflow_job([{"name": "a.png", "image": b64(JOB_PNG + b"\x00" * (2 * MB))}]),
     "larger than 1 MB"),
    # names of files already in ComfyUI's input folder
    ("existing-name-rejected-workflow", workflow_job([{"name": "existing.png", "image": b64(JOB_PNG)}],
                                                     {"1": {"class_type": "NoSuchNode", "inputs": {}}}), REJECTED),
    ("existing-name-broken-image", workflow_job([{"name": "existing.png", "image": b64(PNG_HEADER_ONLY)}]),
     "node 1 (LoadImage) failed"),
    ("existing-name-runs-on-the-jobs-image", workflow_job([{"name": "existing.png", "image": b64(JOB_PNG)}]), None),
    ("save-outside-the-output-folder", workflow_job(workflow={**IMAGE_WORKFLOW, "3": {
        "class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "../input/existing"}}}),
     "node 3 (SaveImage) failed"),
    ("reads-a-users-file-and-saves", workflow_job(), None),
]


def test_the_list_has_at_least_50_malformed_jobs():
    assert len(JOBS) >= 50
    assert len({name for name, _, _ in JOBS}) == len(JOBS)
    assert sum(expected is not None for _, _, expected in JOBS) >= 50


# --- a stand-in ComfyUI -------------------------------------------------------------------------

class StandInComfy:
    """ComfyUI's upload, validation and execution rules for LoadImage, ImageInvert and SaveImage
    (server.py's image_upload, execution.py's validation, nodes.py's nodes), on real folders."""

    CLASSES = frozenset({"LoadImage", "ImageInvert", "SaveImage"})

    def __init__(self, root: Path) -> None:
        self.input, self.output = root / "input", root / "output"

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        return {}

    def upload(self, name: str, data: bytes, *, subfolder: str = "", overwrite: bool | None = None) -> str:
        if overwrite is None:  # what the worker's ComfyClient sends when it does not say
            overwrite = inspect.signature(cc.ComfyClient.upload).parameters["overwrite"].default
        folder = Path(os.path.abspath(self.input / os.path.normpath(subfolder)))
        path = folder / name
        if os.path.commonpath((self.input, os.path.abspath(path))) != str(self.input):
            raise cc.ComfyError("ComfyUI refused the upload: HTTP 400")
        folder.mkdir(parents=True, exist_ok=True)
        stem, ext = os.path.splitext(name)
        i = 1
        while not overwrite and path.exists():
            if path.read_bytes() == data:  # ComfyUI's duplicate check: the existing name comes back
                return f"{subfolder}/{path.name}" if subfolder else path.name
            path = folder / f"{stem} ({i}){ext}"
            i += 1
        path.write_bytes(data)
        return f"{subfolder}/{path.name}" if subfolder else path.name

    def run(self, workflow: dict[str, Any], on_progress: Any, timeout: float) -> tuple[str, dict[str, Any]]:
        errors = {}
        for node_id, node in workflow.items():
            if node["class_type"] not in self.CLASSES:
                raise cc.WorkflowRejected(f"Cannot execute because node {node['class_type']} does not exist.")
            if node["class_type"] == "LoadImage":
                target = Path(os.path.abspath(self.input / node["inputs"]["image"].removesuffix(" [input]")))
                if not target.is_relative_to(self.input) or not target.is_file():
                    errors[node_id] = {"errors": [{"message": "Invalid image file"}], "class_type": "LoadImage"}
        if errors:
            raise cc.WorkflowRejected(cc.format_node_errors({"node_errors": errors}, workflow),
                                      {"node_errors": errors})
        from PIL import Image, ImageOps

        images: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        for node_id in sorted(workflow, key=int):
            node = workflow[node_id]
            inputs = node["inputs"]
            fail = {"node_id": node_id, "node_type": node["class_type"], "exception_type": "Exception"}
            if node["class_type"] == "LoadImage":
                try:
                    images[node_id] = Image.open(self.input / inputs["image"].removesuffix(" [input]")).convert("RGB")
                except OSError as exc:
                    raise cc.ExecutionFailed(cc.format_execution_error({**fail, "exception_message": str(exc)}),
                                             fail) from None
            elif node["class_type"] == "ImageInvert":
                images[node_id] = ImageOps.invert(images[inputs["image"][0]])
            else:
                folder = Path(os.path.abspath(self.output / os.path.dirname(inputs["filename_prefix"])))
                if not folder.is_relative_to(self.output):
                    message = "Saving image outside the output folder is not allowed."
                    raise cc.ExecutionFailed(cc.format_execution_error({**fail, "exception_message": message}),
                                             fail)
                prefix = os.path.basename(inputs["filename_prefix"])
                counter = 1
                while (folder / f"{prefix}_{counter:05}_.png").exists():
                    counter += 1
                folder.mkdir(parents=True, exist_ok=True)
                images[inputs["images"][0]].save(folder / f"{prefix}_{counter:05}_.png")
                subfolder = os.path.relpath(folder, self.output)
                outputs[node_id] = {"images": [{"filename": f"{prefix}_{counter:05}_.png",
                                                "subfolder": "" if subfolder == "." else subfolder,
                                                "type": "output"}]}
        return "stand-in", {"outputs": outputs}

    def download(self, output: Any) -> bytes:
        return (self.output / output.subfolder / output.filename).read_bytes()

    def wait_stopped(self, prompt_id: str, timeout: float) -> bool:
        return True


# --- the folders before and after ---------------------------------------------------------------

def populate(root: Path) -> None:
    """What a user already has in ComfyUI's folders, including the name SaveImage would pick next."""
    (root / "input").mkdir(parents=True, exist_ok=True)
    (root / "output").mkdir(parents=True, exist_ok=True)
    (root / "input" / "existing.png").write_bytes(USERS_PNG)
    (root / "input" / "notes.txt").write_text("the user's")
    (root / "output" / "worker-test_00001_.png").write_bytes(USERS_PNG)
    (root / "output" / "old.png").write_bytes(USERS_PNG)


def snapshot(root: Path) -> dict[str, tuple[int, str, int]]:
    """Every file under input/ and output/: size, SHA-256 and modification time."""
    files = {}
    for folder in ("input", "output"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                stat = path.stat()
                files[str(path.relative_to(root))] = (stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest(),
                                                      stat.st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def real_comfyui(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy-real")
    populate(root)
    with running_comfyui(root) as url:
        yield root, cc.ComfyClient(url)


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.comfyui)])
def comfy(request, tmp_path):
    if request.param == "fake":
        populate(tmp_path)
        return tmp_path, StandInComfy(tmp_path)
    return request.getfixturevalue("real_comfyui")


def inverted(colour: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(255 - c for c in colour)


@pytest.mark.parametrize(("name", "params", "expected"), JOBS, ids=[name for name, _, _ in JOBS])
def test_a_malformed_job_is_an_error_result_and_touches_no_file(comfy, name, params, expected):
    root, client = comfy
    before = snapshot(root)
    started = time.monotonic()
    result = rh.run_job({"id": name, "input": params}, client=client, send=lambda job, message: None,
                        environ=ENV, cleanup_dir=root)  # an exception fails the test here
    assert time.monotonic() - started < 30
    assert isinstance(result, dict)
    assert "internal error" not in str(result.get("error"))
    if expected is None:
        assert "error" not in result, result
        [output] = result["outputs"]
        from PIL import Image

        pixel = Image.open(io.BytesIO(base64.b64decode(output["base64"]))).convert("RGB").getpixel((0, 0))
        source = GREEN if "jobs-image" in name else RED  # the job's upload, else the user's file
        assert all(abs(a - b) <= 2 for a, b in zip(pixel, inverted(source), strict=True)), pixel
    else:
        assert "error" in result, result
        alternatives = expected if isinstance(expected, tuple) else (expected,)
        assert any(text in result["error"] for text in alternatives), result["error"]
        assert len(result["error"]) < 2000  # huge inputs are not echoed back
        assert "secret" not in json.dumps(result)
    assert snapshot(root) == before  # no file of the user's changed, nothing of the job's left
    leftovers = root / "input" / ji.UPLOAD_ROOT
    assert not leftovers.exists() or not any(leftovers.iterdir())


# --- downloads: time limit and truncation, against a local server ----------------------------------

class _Misbehaving(http.server.BaseHTTPRequestHandler):
    mode = "trickle"

    def do_GET(self):
        body = JOB_PNG
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.mode == "trickle":  # one byte every 0.2 s: never quiet long enough for a read timeout
            self.send_header("Content-Length", str(len(body) * 100))
            self.end_headers()
            try:
                for i in range(len(body) * 100):
                    self.wfile.write(body[i % len(body):i % len(body) + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.mode == "truncated":  # says more than it sends, then closes
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def misbehaving_server(monkeypatch):
    # The SDK refuses loopback addresses; its escape hatch lets these tests use one.
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    pytest.importorskip("runpod")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_slow_download_stops_at_the_jobs_download_time_limit(misbehaving_server, tmp_path):
    _Misbehaving.mode = "trickle"
    populate(tmp_path)
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = rh.run_job({"input": simple(image=f"{misbehaving_server}/slow.png")}, client=StandInComfy(tmp_path),
                        environ={**ENV, "STEADYDANCER_DOWNLOAD_TIMEOUT": "2"}, cleanup_dir=tmp_path)
    elapsed = time.monotonic() - started
    assert "STEADYDANCER_DOWNLOAD_TIMEOUT" in result["error"]
    assert elapsed < 5, elapsed  # the limit, plus at most one read
    assert snapshot(tmp_path) == before


def test_a_download_shorter_than_its_content_length_is_refused(misbehaving_server):
    _Misbehaving.mode = "truncated"
    # urllib3 notices it (IncompleteRead); the worker's own Content-Length check is the second line.
    with pytest.raises(ji.JobInputError, match=r"stopped after \d+ of \d+ bytes|IncompleteRead"):
        ji.fetch_url_safely(f"{misbehaving_server}/short.png", MB, 10)
    _Misbehaving.mode = "good"
    assert ji.fetch_url_safely(f"{misbehaving_server}/good.png", MB, 10) == JOB_PNG


def test_limits_come_from_the_environment_and_bad_values_keep_the_defaults():
    warnings: list[str] = []
    limits = ji.Limits.from_env({"STEADYDANCER_MAX_PROMPT_CHARS": "100", "STEADYDANCER_MAX_INPUT_MB": "500",
                                 "STEADYDANCER_DOWNLOAD_TIMEOUT": "NaN", "STEADYDANCER_MAX_IMAGES": "-1"},
                                warn=warnings.append)
    assert limits.max_prompt_chars == 100
    assert limits.max_media_bytes == 500 * MB and limits.max_total_bytes == 1000 * MB  # two such files fit
    assert limits.download_timeout == ji.Limits().download_timeout and limits.max_images == ji.Limits().max_images
    assert len(warnings) == 2
    assert rh._env_float({"STEADYDANCER_JOB_TIMEOUT": "inf"}, "STEADYDANCER_JOB_TIMEOUT", 3600) == 3600
