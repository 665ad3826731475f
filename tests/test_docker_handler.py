"""The RunPod worker: job input -> workflow (docker/job_input.py), the ComfyUI client's
message handling (docker/comfy_client.py), output encoding and error results
(docker/runpod_handler.py).

Logic is tested with plain data and a stand-in client; the tests marked `comfyui` run the
worker against a real ComfyUI (COMFYUI_DIR): uploads, /prompt validation errors, execution
errors over the websocket, and saved files coming back as base64.
"""

from __future__ import annotations

import base64
import json
import random
import re
import sys
import time
from pathlib import Path

import pytest
from docker_modules import load_docker_module, running_comfyui

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
if str(DOCKER) not in sys.path:
    sys.path.insert(0, str(DOCKER))


cc = load_docker_module("comfy_client")
ji = load_docker_module("job_input")
rh = load_docker_module("runpod_handler")

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
MP4 = b"\x00\x00\x00\x20ftypisom" + b"\x00" * 64
WORKFLOW = json.loads((REPO / "workflows" / "api" / "steadydancer_api.json").read_text())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def nodes(workflow, class_type):
    return [n for n in workflow.values() if n["class_type"] == class_type]


def simple(**params):
    request = {"image": b64(PNG), "video": b64(MP4), **params}
    return ji.prepare(request, workflow=WORKFLOW, rng=random.Random(0))


def literal(workflow, node, name):
    """A node's input value, followed through a link to the node it comes from (same input name)."""
    value = node["inputs"][name]
    while isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        value = workflow[value[0]]["inputs"][name]
    return value


# --- simple request -> bundled workflow -----------------------------------------------------

def test_simple_request_fills_in_the_bundled_workflow():
    job = simple(prompt="a dancer", negative_prompt="blurry", seed=7, size="512x768", length=33,
                 steps=12, model="other.gguf")
    wf = job.workflow
    reference, driving = job.uploads
    assert reference.data == PNG and reference.name == "reference.png"
    assert driving.data == MP4 and driving.name == "driving.mp4"
    # Both in the job's own new folder under ComfyUI's input folder.
    assert reference.subfolder == driving.subfolder == job.folder
    assert re.fullmatch(r"steadydancer-jobs/[0-9a-f]{32}", job.folder)
    assert nodes(wf, "LoadImage")[0]["inputs"]["image"] == f"{job.folder}/reference.png" == reference.path
    assert nodes(wf, "LoadVideo")[0]["inputs"]["file"] == driving.path
    # The prompt goes to the text encoder linked as `positive`, the negative to `negative`.
    conditioning = nodes(wf, "SteadyDancerImageToVideo")[0]["inputs"]
    assert wf[conditioning["positive"][0]]["inputs"]["text"] == "a dancer"
    assert wf[conditioning["negative"][0]]["inputs"]["text"] == "blurry"
    assert nodes(wf, "RandomNoise")[0]["inputs"]["noise_seed"] == 7
    assert nodes(wf, "SteadyDancerPoseAlign")[0]["inputs"]["seed"] == 7
    for class_type in ("SteadyDancerImageToVideo", "SteadyDancerPoseAlign"):
        node = nodes(wf, class_type)[0]
        assert (literal(wf, node, "width"), literal(wf, node, "height")) == (512, 768)
    assert conditioning["length"] == 33
    for node in nodes(wf, "ImageFromBatch"):
        assert node["inputs"]["length"] == 1  # not a frame count: untouched
    assert {n["inputs"]["steps"] for n in wf.values() if "steps" in n["inputs"]} == {12}  # the scheduler's
    assert nodes(wf, "SteadyDancerModelLoader")[0]["inputs"]["model_name"] == "other.gguf"
    assert job.seed == 7
    assert json.loads((REPO / "workflows" / "api" / "steadydancer_api.json").read_text()) == WORKFLOW  # not mutated


@pytest.mark.parametrize(("length", "windows"), [(81, False), (85, True), (481, True), (1025, True)])
def test_long_videos_use_the_bundled_context_window_workflow(length, windows):
    """Over the model's 81 frames the bundled long-video workflow is filled in (ComfyUI's WAN
    context windows between model and guider); up to 81 the plain one."""
    job = ji.prepare({"image": b64(PNG), "video": b64(MP4), "length": length}, rng=random.Random(0))
    assert bool(nodes(job.workflow, "WanContextWindowsManual")) is windows
    assert nodes(job.workflow, "SteadyDancerImageToVideo")[0]["inputs"]["length"] == length
    guider = nodes(job.workflow, "SteadyDancerGuider")[0]
    assert job.workflow[guider["inputs"]["model"][0]]["class_type"] == ("WanContextWindowsManual" if windows else "SteadyDancerModelSampling")


def test_lengths_past_the_limit_are_refused():
    with pytest.raises(ji.JobInputError, match="length"):
        ji.prepare({"image": b64(PNG), "video": b64(MP4), "length": 1029}, rng=random.Random(0))


def test_simple_request_keeps_the_workflows_defaults_and_draws_a_seed():
    job = simple()
    conditioning = nodes(job.workflow, "SteadyDancerImageToVideo")[0]
    template = nodes(WORKFLOW, "SteadyDancerImageToVideo")[0]
    assert literal(job.workflow, conditioning, "width") == literal(WORKFLOW, template, "width")
    assert conditioning["inputs"]["length"] == template["inputs"]["length"]
    assert isinstance(job.seed, int)
    assert nodes(job.workflow, "RandomNoise")[0]["inputs"]["noise_seed"] == job.seed


def test_media_may_be_data_urls_urlsafe_base64_or_urls():
    fetched = []

    def fetch(url, limit, timeout):
        fetched.append(url)
        return MP4

    job = ji.prepare(
        {"image": "data:image/png;base64," + b64(PNG), "video": "https://example.com/v.mp4"},
        workflow=WORKFLOW, fetch_url=fetch,
    )
    assert job.uploads[0].data == PNG and fetched == ["https://example.com/v.mp4"]
    urlsafe = base64.urlsafe_b64encode(b"\xff\xd8\xff" + b"\xfb" * 30).decode().rstrip("=")
    assert ji.load_media(urlsafe, "image", ji.IMAGE_TYPES, max_bytes=1000)[1] == "jpg"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"video": b64(MP4)}, "`image` is required"),
        ({"image": b64(PNG)}, "`video` is required"),
        ({"image": "not base64 !!", "video": b64(MP4)}, "neither an http(s) URL nor valid base64"),
        ({"image": b64(MP4), "video": b64(MP4)}, "`image` is a mp4 file; send one of: jpg, png, webp"),
        ({"image": b64(PNG), "video": b64(PNG)}, "`video` is a png file"),
        ({"image": b64(b"hello"), "video": b64(MP4)}, "not a file type we recognise"),
        ({"image": b64(PNG), "video": b64(MP4), "size": "500x800"}, "multiple of 16"),
        ({"image": b64(PNG), "video": b64(MP4), "size": "big"}, 'look like "480x832"'),
        ({"image": b64(PNG), "video": b64(MP4), "size": "480x832", "width": 480}, "either `size` or"),
        ({"image": b64(PNG), "video": b64(MP4), "length": 32}, "4k+1 frames"),
        ({"image": b64(PNG), "video": b64(MP4), "steps": 0}, "`steps` must be between 1 and 200"),
        ({"image": b64(PNG), "video": b64(MP4), "seed": "7"}, "`seed` must be an integer"),
        ({"image": b64(PNG), "video": b64(MP4), "seed": True}, "`seed` must be an integer"),
        ({"image": b64(PNG), "video": b64(MP4), "prompt": 3}, "`prompt` must be a string"),
        ({"image": b64(PNG), "video": b64(MP4), "fps": 8}, "unknown input ['fps']"),
        ({}, "must be an object"),
        ({"workflow": {"nodes": [], "links": []}}, "UI format"),
        ({"workflow": {"1": {"inputs": {}}}}, "has no class_type"),
        ({"workflow": "{not json"}, "not JSON"),
        ({"workflow": {"1": {"class_type": "X", "inputs": {}}}, "images": [{"name": "../x.png", "image": b64(PNG)}]},
         "plain file name"),
        ({"workflow": {"1": {"class_type": "X", "inputs": {}}}, "prompt": "x"}, "unknown input ['prompt']"),
    ],
)
def test_bad_input_is_one_clear_message(params, message):
    with pytest.raises(ji.JobInputError) as info:
        ji.prepare(params, workflow=WORKFLOW, max_bytes=10_000)
    assert message in str(info.value)


def test_media_size_is_capped():
    with pytest.raises(ji.JobInputError, match=r"larger than 0.000477 MB \(STEADYDANCER_MAX_INPUT_MB\)"):
        ji.prepare({"image": b64(PNG * 100), "video": b64(MP4)}, workflow=WORKFLOW, max_bytes=500)


def test_urls_to_private_addresses_are_refused():
    pytest.importorskip("runpod")
    with pytest.raises(ji.JobInputError, match="cannot be fetched"):
        ji.fetch_url_safely("http://127.0.0.1:8188/view?filename=x", 1000)


def test_a_workflow_request_uploads_its_named_files_into_a_folder_of_its_own():
    workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": "mine.png"}},
                "2": {"class_type": "LoadImage", "inputs": {"image": "mine.png [input]"}},
                "3": {"class_type": "LoadImage", "inputs": {"image": "other.png"}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "mine"}}}
    original = json.loads(json.dumps(workflow))
    job = ji.prepare({"workflow": workflow, "images": [{"name": "mine.png", "image": b64(PNG)}]}, folder="f/1")
    assert job.uploads == [ji.Upload("mine.png", PNG, "f/1")]
    # References to the upload point at the job's folder; everything else is as sent.
    assert job.workflow["1"]["inputs"]["image"] == "f/1/mine.png"
    assert job.workflow["2"]["inputs"]["image"] == "f/1/mine.png [input]"
    assert job.workflow["3"] == original["3"] and job.workflow["4"] == original["4"]
    assert workflow == original  # the job's own object is not modified
    assert job.seed is None


def test_inputs_are_found_by_role_even_with_other_node_ids():
    renumbered = {f"n{k}": v for k, v in json.loads(json.dumps(WORKFLOW)).items()}
    for node in renumbered.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2:
                node["inputs"][key] = [f"n{value[0]}", value[1]]
    job = ji.prepare({"image": b64(PNG), "video": b64(MP4), "prompt": "p"}, workflow=renumbered)
    assert renumbered["n8"]["inputs"]["text"] != "p"  # the template is untouched
    assert job.workflow["n8"]["inputs"]["text"] == "p"


def test_a_workflow_without_the_needed_node_says_which():
    workflow = {k: v for k, v in WORKFLOW.items() if v["class_type"] != "LoadVideo"}
    with pytest.raises(ji.JobInputError, match="no single node for the driving video: found none"):
        ji.prepare({"image": b64(PNG), "video": b64(MP4)}, workflow=workflow)


# --- ComfyUI messages ------------------------------------------------------------------------

def test_node_errors_become_one_readable_message():
    response = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": ""},
        "node_errors": {"16": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                           "details": "model_name: 'x.gguf' not in ['a.gguf']"}],
                               "class_type": "SteadyDancerModelLoader"}},
    }
    workflow = {"16": {"class_type": "SteadyDancerModelLoader", "inputs": {}, "_meta": {"title": "DiT"}}}
    message = cc.format_node_errors(response, workflow)
    assert message.splitlines() == [
        "Prompt outputs failed validation",
        "node 16 (SteadyDancerModelLoader, 'DiT'): Value not in list: model_name: 'x.gguf' not in ['a.gguf']",
    ]


def test_execution_errors_name_the_node_and_exception():
    data = {"prompt_id": "p", "node_id": "5", "node_type": "SteadyDancerPoseExtract",
            "exception_type": "pose.errors.MissingPersonError", "exception_message": "no person in frame 3\n"}
    assert cc.format_execution_error(data) == (
        "node 5 (SteadyDancerPoseExtract) failed: pose.errors.MissingPersonError: no person in frame 3"
    )


def test_outputs_are_the_saved_files_not_previews():
    entry = {"outputs": {
        "25": {"images": [{"filename": "steadydancer_00001_.mp4", "subfolder": "video", "type": "output"}],
               "animated": [True]},
        "9": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]},
        "30": {"images": [{"filename": "still.png", "subfolder": "", "type": "output"}]},
    }}
    files = cc.collect_outputs(entry)
    assert [(f.node, f.filename, f.is_video) for f in files] == [
        ("25", "steadydancer_00001_.mp4", True), ("30", "still.png", False),
    ]


class FakeWebSocket:
    def __init__(self, messages):
        self.messages = list(messages)

    def recv(self):
        if not self.messages:
            raise ConnectionError("closed")
        item = self.messages.pop(0)
        return item if isinstance(item, bytes) else json.dumps(item)

    def close(self):
        pass


class HistoryClient(cc.ComfyClient):
    def __init__(self, entries):
        super().__init__("http://comfy.invalid")
        self.entries = entries

    def history(self, prompt_id):
        return self.entries.pop(0) if self.entries else None


def test_wait_reports_progress_and_returns_the_history():
    events = [
        {"type": "execution_start", "data": {"prompt_id": "p"}},
        b"\x00\x01binary preview",
        {"type": "progress", "data": {"prompt_id": "other", "value": 9, "max": 9, "node": "1"}},
        {"type": "progress", "data": {"prompt_id": "p", "value": 1, "max": 2, "node": "22"}},
        {"type": "progress", "data": {"prompt_id": "p", "value": 2, "max": 2, "node": "22"}},
        {"type": "executing", "data": {"prompt_id": "p", "node": None}},
    ]
    seen = []
    client = HistoryClient([{"outputs": {}, "status": {"status_str": "success"}}])
    entry = client.wait("p", on_progress=seen.append, ws=FakeWebSocket(events))
    assert entry["status"]["status_str"] == "success"
    assert seen == [cc.Progress("22", 1, 2), cc.Progress("22", 2, 2)]


def test_wait_raises_the_execution_error():
    events = [{"type": "execution_error", "data": {"prompt_id": "p", "node_id": "23", "node_type": "VAEDecode",
                                                   "exception_type": "torch.OutOfMemoryError",
                                                   "exception_message": "CUDA out of memory"}}]
    client = HistoryClient([])
    with pytest.raises(cc.ExecutionFailed, match=r"node 23 \(VAEDecode\) failed: torch.OutOfMemoryError"):
        client.wait("p", ws=FakeWebSocket(events))


def test_wait_falls_back_to_the_history_when_the_websocket_fails():
    error_entry = {"status": {"status_str": "error", "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_id": "5", "node_type": "X", "exception_type": "ValueError",
                             "exception_message": "bad"}],
    ]}}
    client = HistoryClient([None, error_entry])
    client.queue = lambda workflow: "p"

    def refuse(url):
        raise OSError("connection refused")

    with pytest.raises(cc.ExecutionFailed, match=r"node 5 \(X\) failed: ValueError: bad"):
        client.run({}, connect=refuse)


def test_run_listens_before_it_queues():
    order = []
    client = HistoryClient([{"outputs": {}}])
    client.queue = lambda workflow: order.append("queue") or "p"

    def connect(url):
        order.append("connect")
        assert url.startswith("ws://comfy.invalid/ws?clientId=")
        return FakeWebSocket([{"type": "execution_success", "data": {"prompt_id": "p"}}])

    assert client.run({}, connect=connect) == ("p", {"outputs": {}})
    assert order == ["connect", "queue"]


# --- outputs --------------------------------------------------------------------------------

VIDEO = cc.OutputFile("25", "steadydancer_00001_.mp4", "video", "output", "images")


def test_small_outputs_come_back_as_base64():
    [entry] = rh.encode_outputs("job", [(VIDEO, b"video bytes")], mode="auto", inline_limit=1000, s3_ready=False)
    assert base64.b64decode(entry["base64"]) == b"video bytes"
    assert entry | {"base64": None} == {"filename": "steadydancer_00001_.mp4", "type": "video", "mime": "video/mp4",
                                        "node": "25", "bytes": 11, "base64": None}


def test_outputs_too_large_for_the_payload_say_how_to_get_them():
    with pytest.raises(rh.JobOutputError, match="BUCKET_ENDPOINT_URL") as info:
        rh.encode_outputs("job", [(VIDEO, b"x" * 3000)], mode="auto", inline_limit=1000, s3_ready=False)
    assert "above the 0 MB" in str(info.value) or "above the" in str(info.value)


def test_outputs_go_to_s3_when_a_bucket_is_configured():
    uploaded = []

    def upload(job_id, name, data):
        uploaded.append((job_id, name, data))
        return f"https://bucket/{job_id}/{name}"

    [entry] = rh.encode_outputs("job1", [(VIDEO, b"x" * 3000)], mode="auto", inline_limit=1000, s3_ready=True,
                                s3_upload=upload)
    assert entry["url"] == "https://bucket/job1/steadydancer_00001_.mp4" and "base64" not in entry
    assert uploaded == [("job1", "steadydancer_00001_.mp4", b"x" * 3000)]
    with pytest.raises(rh.JobOutputError, match="needs BUCKET_ENDPOINT_URL"):
        rh.encode_outputs("job", [(VIDEO, b"x")], mode="s3", inline_limit=1000, s3_ready=False)


def test_s3_needs_all_three_variables():
    full = {"BUCKET_ENDPOINT_URL": "https://s3", "BUCKET_ACCESS_KEY_ID": "a", "BUCKET_SECRET_ACCESS_KEY": "b"}
    assert rh.s3_configured(full)
    assert not rh.s3_configured({**full, "BUCKET_SECRET_ACCESS_KEY": ""})


def test_progress_updates_are_throttled_but_the_last_step_is_sent():
    sent, now = [], [0.0]
    reporter = rh.ProgressReporter({"id": "j"}, WORKFLOW, lambda job, m: sent.append(m), interval=2.0,
                                   clock=lambda: now[0])
    for step in range(1, 6):
        now[0] += 0.5
        reporter(cc.Progress("22", step, 5))
    assert [m["step"] for m in sent] == [1, 5]
    assert sent[-1] == {"node": "22", "title": "Sample", "step": 5, "steps": 5, "percent": 100}


# --- the whole job with a stand-in client -------------------------------------------------------

class FakeClient:
    def __init__(self, *, reject=None, fail=None, outputs=None):
        self.reject, self.fail = reject, fail
        self.outputs = outputs if outputs is not None else {"25": {"images": [
            {"filename": "steadydancer_00001_.mp4", "subfolder": "video", "type": "output"}]}}
        self.uploaded, self.queued = {}, None

    def wait_ready(self, timeout):
        return {}

    def upload(self, name, data, subfolder=""):
        self.uploaded[name] = data
        return f"{subfolder}/{name}" if subfolder else name

    def run(self, workflow, on_progress, timeout):
        if self.reject:
            raise self.reject
        self.queued = workflow
        if self.fail:
            raise self.fail
        on_progress(cc.Progress("22", 1, 1))
        return "prompt-1", {"outputs": self.outputs}

    def download(self, output):
        return b"mp4 bytes"


def test_a_job_runs_end_to_end():
    client, progress = FakeClient(), []
    result = rh.run_job({"id": "j1", "input": {"image": b64(PNG), "video": b64(MP4), "seed": 3}}, client=client,
                        send=lambda job, m: progress.append(m), environ={})
    assert result["prompt_id"] == "prompt-1" and result["seed"] == 3
    assert [o["filename"] for o in result["outputs"]] == ["steadydancer_00001_.mp4"]
    assert base64.b64decode(result["outputs"][0]["base64"]) == b"mp4 bytes"
    assert set(client.uploaded.values()) == {PNG, MP4}
    assert progress and progress[-1]["percent"] == 100


def test_bad_input_never_reaches_comfyui():
    client = FakeClient()
    result = rh.run_job({"id": "j", "input": {"image": b64(PNG)}}, client=client, environ={})
    assert result == {"error": "bad input: `video` is required (base64 or an http(s) URL), or send a full `workflow`"}
    assert client.uploaded == {}


def test_rejected_workflows_return_the_node_errors():
    details = {"node_errors": {"16": {"errors": [{"message": "Value not in list"}]}}}
    client = FakeClient(reject=cc.WorkflowRejected("node 16: Value not in list", details))
    result = rh.run_job({"input": {"image": b64(PNG), "video": b64(MP4)}}, client=client, environ={})
    assert result["error"] == "ComfyUI rejected the workflow: node 16: Value not in list"
    assert result["node_errors"] == details["node_errors"]


def test_execution_errors_return_the_failing_node():
    data = {"node_id": "5", "node_type": "SteadyDancerPoseExtract", "exception_type": "MissingPersonError",
            "exception_message": "no person", "traceback": ["..."]}
    client = FakeClient(fail=cc.ExecutionFailed("node 5 failed", data))
    result = rh.run_job({"input": {"image": b64(PNG), "video": b64(MP4)}}, client=client, environ={})
    assert result == {"error": "node 5 failed", "details": {k: data[k] for k in list(data)[:4]}}


def test_a_workflow_that_saves_nothing_is_an_error():
    result = rh.run_job({"input": {"image": b64(PNG), "video": b64(MP4)}}, client=FakeClient(outputs={}), environ={})
    assert "saved no file" in result["error"]


def _store_in(folder):
    """An upload function that writes where ComfyUI would (input/<subfolder>/<name>)."""
    def upload(name, data, subfolder=""):
        path = folder / "input" / subfolder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"{subfolder}/{name}"
    return upload


class SavingClient(FakeClient):
    """Saves its output file for real, as ComfyUI would, when the workflow runs."""

    def __init__(self, folder, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder
        self.upload = _store_in(folder)

    def run(self, workflow, on_progress, timeout):
        result = super().run(workflow, on_progress, timeout)
        (self.folder / "output" / "video").mkdir(parents=True, exist_ok=True)
        (self.folder / "output" / "video" / "steadydancer_00001_.mp4").write_bytes(b"v")
        return result


def test_job_files_are_removed_from_comfyuis_folders_afterwards(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "users-own.png").write_bytes(b"kept")
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "other.png").write_bytes(b"kept")
    result = rh.run_job({"input": {"image": b64(PNG), "video": b64(MP4)}}, client=SavingClient(tmp_path),
                        environ={}, cleanup_dir=tmp_path)
    assert "error" not in result
    assert [p.name for p in (tmp_path / "input").iterdir()] == ["users-own.png", "steadydancer-jobs"]
    assert list((tmp_path / "input" / "steadydancer-jobs").iterdir()) == []  # the job's folder is gone
    assert not (tmp_path / "output" / "video" / "steadydancer_00001_.mp4").exists()
    assert (tmp_path / "output" / "other.png").exists()


def test_an_output_that_was_there_before_the_job_is_not_removed(tmp_path):
    """A workflow may report a file it did not create (a custom node's `ui`): it stays."""
    (tmp_path / "output" / "video").mkdir(parents=True)
    (tmp_path / "output" / "video" / "steadydancer_00001_.mp4").write_bytes(b"older work")
    client = FakeClient()
    client.upload = _store_in(tmp_path)
    rh.run_job({"input": {"image": b64(PNG), "video": b64(MP4)}}, client=client, environ={}, cleanup_dir=tmp_path)
    assert (tmp_path / "output" / "video" / "steadydancer_00001_.mp4").read_bytes() == b"older work"


def test_job_files_are_removed_after_a_failure_too(tmp_path):
    (tmp_path / "input").mkdir()
    client = FakeClient(fail=cc.ExecutionFailed("node 5 failed", {}))
    client.upload = _store_in(tmp_path)
    result = rh.run_job({"input": {"image": b64(PNG), "video": b64(MP4)}}, client=client, environ={},
                        cleanup_dir=tmp_path)
    assert result["error"] == "node 5 failed"
    assert list((tmp_path / "input" / "steadydancer-jobs").iterdir()) == []


def test_cleanup_never_leaves_comfyuis_folders(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("keep me")
    (tmp_path / "comfy" / "output").mkdir(parents=True)
    rh.remove_job_files(tmp_path / "comfy", ["../secret.txt"],
                        [cc.OutputFile("1", "../../secret.txt", "", "output", "images")])
    assert outside.read_text() == "keep me"


def test_the_handler_turns_an_unforeseen_failure_into_an_error_result(monkeypatch, tmp_path):
    def broken(job, **kwargs):
        raise KeyError("something nobody foresaw")

    monkeypatch.setattr(rh, "run_job", broken)
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))
    assert rh.handler({"id": "j", "input": {}}) == {"error": "internal error (KeyError): 'something nobody foresaw'"}


def test_test_input_flag_without_a_value_reads_test_input_json():
    argv = rh._runpod_argv(["--test_input", "--rp_log_level", "INFO"])
    assert json.loads(argv[1]) == json.loads((DOCKER / "test_input.json").read_text())
    assert argv[2:] == ["--rp_log_level", "INFO"]
    assert rh._runpod_argv(["--test_input", '{"input": {}}']) == ["--test_input", '{"input": {}}']


def test_test_input_json_is_a_valid_simple_request():
    job = json.loads((DOCKER / "test_input.json").read_text())
    fetched = []
    ji.prepare(job["input"], workflow=WORKFLOW,
               fetch_url=lambda url, limit, timeout: fetched.append(url) or (PNG if url.endswith(".png") else MP4))
    assert len(fetched) == 2


# --- against a real ComfyUI ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """A real ComfyUI (COMFYUI_DIR, core nodes only) on a free port, for the worker's client."""
    with running_comfyui(tmp_path_factory.mktemp("comfy")) as url:
        yield cc.ComfyClient(url)


IMAGE_WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "upload.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "worker-test"}},
}


def _png(width=8, height=8) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.comfyui
def test_real_comfyui_runs_a_workflow_request_and_returns_the_image(comfyui):
    job = {"id": "t1", "input": {"workflow": IMAGE_WORKFLOW, "images": [{"name": "upload.png", "image": b64(_png())}]}}
    result = rh.run_job(job, client=comfyui, send=lambda j, m: None, environ={})
    assert "error" not in result, result
    [output] = result["outputs"]
    assert output["type"] == "image" and output["mime"] == "image/png"
    import io

    from PIL import Image

    pixel = Image.open(io.BytesIO(base64.b64decode(output["base64"]))).getpixel((0, 0))
    assert all(abs(a - b) <= 1 for a, b in zip(pixel, (245, 55, 225), strict=True))  # inverted by ComfyUI


@pytest.mark.comfyui
def test_real_comfyui_validation_errors_come_back_with_the_node(comfyui):
    workflow = json.loads(json.dumps(IMAGE_WORKFLOW))
    workflow["1"]["inputs"]["image"] = "missing-file.png"
    result = rh.run_job({"input": {"workflow": workflow}}, client=comfyui, environ={})
    assert result["error"].startswith("ComfyUI rejected the workflow")
    assert "node 1 (LoadImage)" in result["error"]
    assert "1" in result["node_errors"]


@pytest.mark.comfyui
def test_real_comfyui_unknown_nodes_are_rejected_clearly(comfyui):
    workflow = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    result = rh.run_job({"input": {"workflow": workflow}}, client=comfyui, environ={})
    assert "NoSuchNode" in result["error"]


@pytest.mark.comfyui
def test_real_comfyui_execution_errors_name_the_failing_node(comfyui):
    job = {"input": {"workflow": IMAGE_WORKFLOW, "images": [{"name": "upload.png", "image": b64(PNG)}]}}
    started = time.monotonic()
    result = rh.run_job(job, client=comfyui, environ={})  # a PNG header without an image
    assert result["error"].startswith("node 1 (LoadImage) failed:"), result
    assert result["details"]["node_type"] == "LoadImage"
    assert time.monotonic() - started < 60
