"""What a RunPod job asks for, checked, and turned into an API-format ComfyUI workflow.

A job input is either
- `{"workflow": {...API format...}, "images": [{"name": ..., "image": <media>}]}`: run that
  workflow; the listed files are uploaded to ComfyUI's input folder first, under their names;
- or a simple request that fills in the bundled workflow (workflows/api/steadydancer_api.json;
  for a `length` over 81 frames workflows/api/steadydancer_long_api.json, the same graph
  sampled in overlapping 81-frame context windows):
  `{"image": <media>, "video": <media>, "prompt": ..., "negative_prompt": ...,
    "seed": int, "width": int, "height": int (or "size": "480x832" / [480, 832]),
    "length": int, "steps": int, "model": "<file in diffusion_models>"}`;
  only `image` and `video` are required.
A <media> is base64 (optionally a `data:` URL) or an http(s) URL.

The bundled workflow's inputs are found by what they are (node class, input name and the
links between nodes), not by node ids, so an edited workflow keeps working.

Every upload goes to a folder of its own under ComfyUI's input folder
(`steadydancer-jobs/<random>/`), never over an existing file; a workflow's references to
its `images` names are rewritten to that folder. A job is bounded (`Limits`, set from the
environment by the worker): prompt length, size of each media file and of all together,
number of `images`, and the total time its URL downloads may take.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "api" / "steadydancer_api.json"
# Longer than the model's 81 frames: the same graph sampled in ComfyUI's context windows.
LONG_WORKFLOW = WORKFLOW.with_name("steadydancer_long_api.json")
MODEL_FRAMES = 81
MAX_LENGTH = 1025  # 64 s at 16 fps
MAX_SEED = 2**63 - 1
SIMPLE_FIELDS = frozenset(
    {"image", "video", "prompt", "negative_prompt", "seed", "width", "height", "size", "length",
     "steps", "model"}
)
WORKFLOW_FIELDS = frozenset({"workflow", "images"})
# The folder under ComfyUI's input folder that each job's uploads go to (one folder per job).
UPLOAD_ROOT = "steadydancer-jobs"
# Workflow inputs that hold a prompt (text encoders of ComfyUI and common custom nodes).
PROMPT_INPUTS = frozenset({"text", "prompt", "negative_prompt", "text_g", "text_l", "t5xxl", "clip_l",
                           "positive", "negative", "system_prompt"})


class JobInputError(ValueError):
    """The job input is wrong; the message says what to send instead."""


@dataclass(frozen=True)
class Limits:
    """What one job may ask for. The worker reads them from the environment (`from_env`)."""

    max_media_bytes: int = 200 * 2**20  # each image/video                STEADYDANCER_MAX_INPUT_MB
    max_total_bytes: int = 400 * 2**20  # all media of a job together      STEADYDANCER_MAX_TOTAL_INPUT_MB
    max_images: int = 16  # `images` entries of a workflow request        STEADYDANCER_MAX_IMAGES
    max_prompt_chars: int = 4000  # each prompt                           STEADYDANCER_MAX_PROMPT_CHARS
    download_timeout: float = 120.0  # all URL downloads of a job, s      STEADYDANCER_DOWNLOAD_TIMEOUT

    ENV: ClassVar[dict[str, tuple[str, float]]] = {
        "max_media_bytes": ("STEADYDANCER_MAX_INPUT_MB", 2**20),
        "max_total_bytes": ("STEADYDANCER_MAX_TOTAL_INPUT_MB", 2**20),
        "max_images": ("STEADYDANCER_MAX_IMAGES", 1),
        "max_prompt_chars": ("STEADYDANCER_MAX_PROMPT_CHARS", 1),
        "download_timeout": ("STEADYDANCER_DOWNLOAD_TIMEOUT", 1.0),
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ,
                 warn: Callable[[str], None] | None = None) -> Limits:
        """Limits from the environment; a value that is not a positive number keeps the default."""
        values: dict[str, Any] = {}
        for field_name, (variable, unit) in cls.ENV.items():
            raw = environ.get(variable)
            if raw is None or not str(raw).strip():
                continue
            try:
                number = float(raw)
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or number <= 0:
                if warn is not None:
                    warn(f"{variable}={raw!r} is not a positive number: using the default")
                continue
            default = getattr(cls(), field_name)
            values[field_name] = type(default)(number * unit)
        if "max_media_bytes" in values and "max_total_bytes" not in values:
            # Two files of the allowed size fit unless the total is set too.
            values["max_total_bytes"] = max(cls().max_total_bytes, 2 * values["max_media_bytes"])
        return cls(**values)


@dataclass(frozen=True)
class Upload:
    """A file to put in ComfyUI's input folder before the workflow runs: `name` in `subfolder`."""

    name: str
    data: bytes
    subfolder: str = ""

    @property
    def path(self) -> str:
        """The name the workflow uses for it (relative to ComfyUI's input folder)."""
        return f"{self.subfolder}/{self.name}" if self.subfolder else self.name


@dataclass(frozen=True)
class PreparedJob:
    workflow: dict[str, Any]
    uploads: list[Upload]
    seed: int | None = None
    folder: str = ""  # the job's own folder under ComfyUI's input folder


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value for a message, cut to `limit` characters (inputs may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _mb(size: float) -> str:
    return f"{size / 2**20:.3g}"


def _short_url(url: str, limit: int = 120) -> str:
    """A URL for a message: without user:password@, cut to `limit` characters."""
    url = re.sub(r"^(\w+://)[^/@]*@", r"\1", url)
    return url if len(url) <= limit else url[:limit] + "..."


class _Budget:
    """What is left of a job's media allowance: bytes of all media, time for all downloads."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self.bytes_left = limits.max_total_bytes
        self.deadline = clock() + limits.download_timeout

    def seconds_left(self, what: str) -> float:
        left = self.deadline - self.clock()
        if left <= 0:
            raise JobInputError(
                f"`{what}`: the job's URL downloads took longer than {self.limits.download_timeout:.0f} s "
                "(STEADYDANCER_DOWNLOAD_TIMEOUT): use a faster host or send base64"
            )
        return left

    def max_bytes(self) -> int:
        return min(self.limits.max_media_bytes, self.bytes_left)

    def spend(self, size: int, what: str, check_only: bool = False) -> None:
        if size > self.bytes_left:
            raise JobInputError(
                f"`{what}`: the job's media add up to more than {_mb(self.limits.max_total_bytes)} MB "
                "(STEADYDANCER_MAX_TOTAL_INPUT_MB)"
            )
        if not check_only:
            self.bytes_left -= size


# --- media -----------------------------------------------------------------------------

_SIGNATURES: list[tuple[int, bytes, str]] = [
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpg"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"\x1a\x45\xdf\xa3", "webm"),
    (4, b"ftypqt", "mov"),
    (4, b"ftyp", "mp4"),
]
IMAGE_TYPES = frozenset({"png", "jpg", "webp", "gif"})
VIDEO_TYPES = frozenset({"mp4", "webm", "mov", "gif"})
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(;[\w=.-]+)*;base64,", re.IGNORECASE)


def sniff_type(data: bytes) -> str | None:
    """File type from its first bytes: png, jpg, gif, webp, webm, mov, mp4, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for offset, magic, kind in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return kind
    return None


def decode_base64(text: str, field: str) -> bytes:
    """Bytes of a base64 string or `data:` URL (whitespace and missing padding tolerated)."""
    payload = _DATA_URL.sub("", text.strip(), count=1)
    payload = re.sub(r"\s+", "", payload)
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, altchars=b"-_" if "-" in payload or "_" in payload else None,
                                validate=True)
    except (binascii.Error, ValueError):
        raise JobInputError(
            f"`{field}` is neither an http(s) URL nor valid base64 (data: URLs are accepted too)"
        ) from None


# Per read: how long a silent server may keep a download (the job's total is checked between reads).
READ_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


def _read_body(response: Any, max_bytes: int, deadline: float, url: str) -> bytes:
    """The body of a streamed requests response, stopped at `max_bytes` and at `deadline`.

    read1 returns what has arrived, so a server that trickles bytes cannot hold the download
    past the deadline by more than one read timeout.
    """
    raw = response.raw
    read = getattr(raw, "read1", None)
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise JobInputError(f"{_short_url(url)}: the download did not finish in time "
                                "(STEADYDANCER_DOWNLOAD_TIMEOUT)")
        chunk = read(1 << 20, decode_content=True) if read else raw.read(1 << 16, decode_content=True)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise JobInputError(f"{_short_url(url)} is larger than {_mb(max_bytes)} MB")
        chunks.append(chunk)
    data = b"".join(chunks)
    declared = response.headers.get("Content-Length")
    encoded = response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
    if declared is not None and declared.strip().isdigit() and not encoded and int(declared) != len(data):
        raise JobInputError(f"{_short_url(url)}: the download stopped after {len(data)} of {declared} bytes")
    return data


def fetch_url_safely(url: str, max_bytes: int, timeout: float = 60.0) -> bytes:
    """Download a job's URL with the RunPod SDK's SSRF guard (no private or metadata addresses),
    at most `max_bytes`, within `timeout` seconds in all."""
    try:
        from runpod.serverless.utils.rp_ssrf import SSRFError, safe_get
    except ImportError:
        raise JobInputError(
            f"{_short_url(url)}: URL inputs need the runpod SDK >= 1.12 (its SSRF-safe download); send base64"
        ) from None

    deadline = time.monotonic() + timeout
    try:
        response = safe_get(url, timeout=(min(CONNECT_TIMEOUT, timeout), min(READ_TIMEOUT, timeout)),
                            max_bytes=max_bytes)
        with response:
            if response.status_code != 200:
                raise JobInputError(f"{_short_url(url)}: HTTP {response.status_code}")
            return _read_body(response, max_bytes, deadline, url)
    except JobInputError:
        raise
    except SSRFError as exc:
        raise JobInputError(f"{_short_url(url)} cannot be fetched: {str(exc)[:300]}") from None
    except Exception as exc:  # requests' errors, bad ports or host names (ValueError), timeouts
        raise JobInputError(
            f"{_short_url(url)} could not be downloaded: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None


def load_media(
    value: Any, field: str, allowed: frozenset[str], *, max_bytes: int | None = None,
    fetch_url: Callable[[str, int, float], bytes] = fetch_url_safely, budget: _Budget | None = None,
) -> tuple[bytes, str]:
    """(bytes, file type) of a media field given as base64 or URL; checks the type.

    `budget` (the job's) bounds the size of this file and what is left of the job's bytes
    and download time; without it, `max_bytes` bounds the file.
    """
    if budget is None:
        budget = _Budget(Limits(max_media_bytes=max_bytes or Limits.max_media_bytes,
                                max_total_bytes=max_bytes or Limits.max_media_bytes))
    per_file = budget.limits.max_media_bytes
    if not isinstance(value, str) or not value.strip():
        raise JobInputError(f"`{field}` must be a base64 string or an http(s) URL")
    text = value.strip()
    if text.lower().startswith(("http://", "https://")):
        data = fetch_url(text, budget.max_bytes(), budget.seconds_left(field))
        budget.seconds_left(field)  # a download that ended past the deadline counts as too slow
    else:
        estimate = len(text) * 3 // 4 - 3
        if estimate > per_file:
            raise JobInputError(f"`{field}` is larger than {_mb(per_file)} MB (STEADYDANCER_MAX_INPUT_MB)")
        budget.spend(max(0, estimate), field, check_only=True)
        data = decode_base64(text, field)
    if len(data) > per_file:
        raise JobInputError(f"`{field}` is larger than {_mb(per_file)} MB (STEADYDANCER_MAX_INPUT_MB)")
    budget.spend(len(data), field)
    kind = sniff_type(data)
    if kind not in allowed:
        seen = f"a {kind} file" if kind else "not a file type we recognise"
        raise JobInputError(f"`{field}` is {seen}; send one of: {', '.join(sorted(allowed))}")
    return data, kind


# --- finding the inputs of the bundled workflow ----------------------------------------

def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def literal_inputs(workflow: dict[str, Any], name: str, class_types: set[str] | None = None) -> list[str]:
    """Ids of nodes whose input `name` is a literal value (not a link), optionally by class."""
    return [
        node_id for node_id, node in workflow.items()
        if isinstance(node, dict) and name in node.get("inputs", {})
        and not _is_link(node["inputs"][name])
        and (class_types is None or node.get("class_type") in class_types)
    ]


def linked_text_nodes(workflow: dict[str, Any], input_name: str) -> list[str]:
    """CLIPTextEncode nodes that feed an input called `input_name` (positive / negative)."""
    found = []
    for node in workflow.values():
        value = node.get("inputs", {}).get(input_name) if isinstance(node, dict) else None
        if _is_link(value):
            source = workflow.get(value[0], {})
            if source.get("class_type") == "CLIPTextEncode" and "text" in source.get("inputs", {}):
                found.append(value[0])
    return sorted(set(found), key=lambda n: (len(n), n))


def _one(workflow: dict[str, Any], ids: list[str], what: str, title_hint: str | None = None) -> str:
    if title_hint and len(ids) > 1:
        titled = [i for i in ids if title_hint in workflow[i].get("_meta", {}).get("title", "").lower()]
        if len(titled) == 1:
            return titled[0]
    if len(ids) != 1:
        found = f"{len(ids)} candidates ({', '.join(ids)})" if ids else "none"
        raise JobInputError(f"the workflow has no single node for {what}: found {found}")
    return ids[0]


VIDEO_LOADERS = {"LoadVideo": "file", "VHS_LoadVideo": "video"}


def _set(workflow: dict[str, Any], ids: list[str], name: str, value: Any, what: str) -> None:
    if not ids:
        raise JobInputError(f"the workflow has no `{name}` input to set {what}")
    for node_id in ids:
        workflow[node_id]["inputs"][name] = value


# --- the request ------------------------------------------------------------------------

def _int(params: dict[str, Any], key: str, low: int, high: int, multiple: int = 1) -> int | None:
    if key not in params or params[key] is None:
        return None
    value = params[key]
    # JSON gives floats for 7.0, 1e309 (inf) and NaN: only finite whole numbers are integers.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobInputError(f"`{key}` must be an integer, got {_short(value)}")
    if not low <= value <= high or value % multiple:
        rule = f" and a multiple of {multiple}" if multiple > 1 else ""
        raise JobInputError(f"`{key}` must be between {low} and {high}{rule}, got {value}")
    return value


def parse_size(params: dict[str, Any]) -> tuple[int | None, int | None]:
    """(width, height) from width/height or size ("480x832" or [480, 832]); multiples of 16."""
    size = params.get("size")
    if size is not None:
        if "width" in params or "height" in params:
            raise JobInputError("give either `size` or `width`/`height`, not both")
        match = re.fullmatch(r"\s*([0-9]{1,6})\s*[x×*]\s*([0-9]{1,6})\s*", size) if isinstance(size, str) else None
        if match:
            w, h = (int(v) for v in match.groups())
        elif isinstance(size, list | tuple) and len(size) == 2:
            w, h = size
        else:
            raise JobInputError(f"`size` must look like \"480x832\" or [480, 832], got {_short(size)}")
        params = {"width": w, "height": h}
    return _int(params, "width", 16, 4096, 16), _int(params, "height", 16, 4096, 16)


def _check_keys(params: dict[str, Any], allowed: frozenset[str], mode: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        shown = _short(unknown[:5], 200)
        raise JobInputError(f"unknown input {shown} for a {mode}; accepted: {', '.join(sorted(allowed))}")


def _check_prompt(value: Any, what: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise JobInputError(f"`{what}` must be a string")
    if len(value) > limits.max_prompt_chars:
        raise JobInputError(
            f"`{what}` has {len(value)} characters, more than the {limits.max_prompt_chars} allowed "
            "(STEADYDANCER_MAX_PROMPT_CHARS)"
        )
    return value


def _job_folder() -> str:
    return f"{UPLOAD_ROOT}/{uuid.uuid4().hex}"


# A name ComfyUI stores as is: no folders, no hidden files, no control characters, no
# " [output]" annotation (which would make ComfyUI read another folder), at most 128 characters.
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]|^[.\s]|\s$|\[(input|output|temp)\]$", re.IGNORECASE)


def check_upload_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or _BAD_NAME.search(name):
        raise JobInputError(
            f"`{where}` must be a plain file name (no folders, not starting with a dot, at most 128 "
            f"characters), got {_short(name)}"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise JobInputError(f"`{where}` is not valid Unicode: {_short(name)}") from None
    return name


def _plain_copy(workflow: Any) -> Any:
    """A JSON copy of the workflow (no shared objects), refusing NaN/Infinity and deep nesting."""
    try:
        return json.loads(json.dumps(workflow, allow_nan=False))
    except RecursionError:
        raise JobInputError("`workflow` is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise JobInputError(f"`workflow` is not plain JSON (NaN and Infinity are not allowed): {exc}") from None


def load_workflow(path: Path = WORKFLOW) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JobInputError(f"the bundled workflow {path} cannot be read: {exc}") from None


def prepare(
    params: Any, *, workflow: dict[str, Any] | None = None, max_bytes: int | None = None,
    limits: Limits | None = None, fetch_url: Callable[[str, int, float], bytes] = fetch_url_safely,
    rng: random.Random | None = None, folder: str | None = None,
) -> PreparedJob:
    """Check a job's input and build the workflow and the uploads it needs.

    `limits` bound the job (`max_bytes`, when given, replaces its per-file size); the uploads
    go to `folder` under ComfyUI's input folder (default: a new `steadydancer-jobs/<random>`).
    """
    limits = limits or Limits()
    if max_bytes is not None:
        limits = replace(limits, max_media_bytes=max_bytes, max_total_bytes=max(max_bytes, limits.max_total_bytes))
    if not isinstance(params, dict) or not params:
        raise JobInputError("the job input must be an object with `workflow`, or `image` and `video`")
    budget = _Budget(limits)
    folder = folder or _job_folder()
    if "workflow" in params:
        return _prepare_workflow(params, limits, budget, fetch_url, folder)
    return _prepare_simple(params, workflow, limits, budget, fetch_url, rng or random.Random(), folder)


def _rename_references(workflow: dict[str, Any], renames: dict[str, str]) -> None:
    """Point the workflow's literal inputs naming an uploaded file at where it was stored."""
    for node in workflow.values():
        inputs = node.get("inputs", {})
        for key, value in inputs.items():
            if not isinstance(value, str):
                continue
            base, annotation = value, ""
            if value.endswith(" [input]"):
                base, annotation = value[:-len(" [input]")], " [input]"
            if base in renames:
                inputs[key] = renames[base] + annotation


def _prepare_workflow(
    params: dict[str, Any], limits: Limits, budget: _Budget, fetch_url: Callable[[str, int, float], bytes],
    folder: str,
) -> PreparedJob:
    _check_keys(params, WORKFLOW_FIELDS, "workflow request")
    workflow = params["workflow"]
    if isinstance(workflow, str):
        try:
            workflow = json.loads(workflow)
        except RecursionError:
            raise JobInputError("`workflow` is nested too deeply") from None
        except ValueError:
            raise JobInputError("`workflow` is a string but not JSON") from None
    if not isinstance(workflow, dict) or not workflow:
        raise JobInputError("`workflow` must be an API-format workflow (an object of nodes)")
    if "nodes" in workflow and "links" in workflow:
        raise JobInputError(
            "`workflow` is in the UI format: export it with \"Export (API)\" in ComfyUI instead"
        )
    workflow = _plain_copy(workflow)
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise JobInputError(f"`workflow` node {_short(node_id)} has no class_type: is this the API format?")
        if not isinstance(node.setdefault("inputs", {}), dict):
            raise JobInputError(f"`workflow` node {_short(node_id)}: `inputs` must be an object")
        for key, value in node["inputs"].items():
            if key in PROMPT_INPUTS and isinstance(value, str):
                _check_prompt(value, f"workflow node {_short(node_id, 20)} input {key}", limits)
    uploads = []
    images = params.get("images")
    images = [] if images is None else images
    if not isinstance(images, list):
        raise JobInputError("`images` must be a list of {\"name\": ..., \"image\": <base64 or URL>}")
    if len(images) > limits.max_images:
        raise JobInputError(f"`images` has {len(images)} entries, more than the {limits.max_images} allowed "
                            "(STEADYDANCER_MAX_IMAGES)")
    seen: set[str] = set()
    for i, item in enumerate(images):
        if not isinstance(item, dict) or "image" not in item or set(item) - {"name", "image"}:
            raise JobInputError(f"`images[{i}]` must be {{\"name\": ..., \"image\": <base64 or URL>}}")
        name = check_upload_name(item.get("name"), f"images[{i}].name")
        if name in seen:
            raise JobInputError(f"`images[{i}].name` {_short(name)} is given twice")
        seen.add(name)
    for i, item in enumerate(images):
        data, _ = load_media(item["image"], f"images[{i}]", IMAGE_TYPES | VIDEO_TYPES,
                             fetch_url=fetch_url, budget=budget)
        uploads.append(Upload(item["name"], data, folder))
    _rename_references(workflow, {u.name: u.path for u in uploads})
    return PreparedJob(workflow, uploads, folder=folder)


def _prepare_simple(
    params: dict[str, Any], template: dict[str, Any] | None, limits: Limits, budget: _Budget,
    fetch_url: Callable[[str, int, float], bytes], rng: random.Random, folder: str,
) -> PreparedJob:
    _check_keys(params, SIMPLE_FIELDS, "simple request (or send `workflow`)")
    for key in ("image", "video"):
        if key not in params:
            raise JobInputError(f"`{key}` is required (base64 or an http(s) URL), or send a full `workflow`")
    # Everything that costs nothing is checked before any download.
    prompts = {key: _check_prompt(params[key], key, limits)
               for key in ("prompt", "negative_prompt") if params.get(key) is not None}
    seed = _int(params, "seed", 0, MAX_SEED)
    width, height = parse_size(params)
    length = _int(params, "length", 1, MAX_LENGTH)
    if length is not None and (length - 1) % 4:
        raise JobInputError(f"`length` must be 4k+1 frames (5, 9, ..., 81, ..., 481, ...), got {length}")
    steps = _int(params, "steps", 1, 200)
    model = params.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 255):
        raise JobInputError("`model` must be a file name in diffusion_models")

    if template is None:  # the bundled workflow; a long video is sampled in context windows
        template = load_workflow(LONG_WORKFLOW if (length or 0) > MODEL_FRAMES else WORKFLOW)
    workflow = copy.deepcopy(template)
    image, image_type = load_media(params["image"], "image", IMAGE_TYPES - {"gif"},
                                   fetch_url=fetch_url, budget=budget)
    video, video_type = load_media(params["video"], "video", VIDEO_TYPES,
                                   fetch_url=fetch_url, budget=budget)
    uploads = [Upload(f"reference.{image_type}", image, folder),
               Upload(f"driving.{video_type}", video, folder)]
    node = _one(workflow, literal_inputs(workflow, "image", {"LoadImage"}), "the reference image", "reference")
    workflow[node]["inputs"]["image"] = uploads[0].path
    loaders = [i for cls, name in VIDEO_LOADERS.items() for i in literal_inputs(workflow, name, {cls})]
    node = _one(workflow, loaders, "the driving video", "driving")
    workflow[node]["inputs"][VIDEO_LOADERS[workflow[node]["class_type"]]] = uploads[1].path

    for key, link in (("prompt", "positive"), ("negative_prompt", "negative")):
        if key in prompts:
            node = _one(workflow, linked_text_nodes(workflow, link), f"the {link} prompt")
            workflow[node]["inputs"]["text"] = prompts[key]

    if seed is None:
        seed = rng.randrange(0, 2**32)
    # The sampler's noise seed, and the seed of the pose augmentation, if the workflow has one.
    seed_inputs = [(n, "noise_seed") for n in literal_inputs(workflow, "noise_seed")]
    seed_inputs += [(n, "seed") for n in literal_inputs(workflow, "seed")]
    if not seed_inputs:
        raise JobInputError("the workflow has no `noise_seed` or `seed` input to set the seed")
    for node_id, name in seed_inputs:
        workflow[node_id]["inputs"][name] = seed

    if width is not None:
        _set(workflow, literal_inputs(workflow, "width"), "width", width, "the width")
        _set(workflow, literal_inputs(workflow, "height"), "height", height, "the height")
    if length is not None:
        _set(workflow, literal_inputs(workflow, "length", _LENGTH_NODES), "length", length, "the length")
    if steps is not None:
        _set(workflow, literal_inputs(workflow, "steps"), "steps", steps, "the steps")
    if model is not None:
        _set(workflow, literal_inputs(workflow, "model_name"), "model_name", model.strip(), "the model")
    return PreparedJob(workflow, uploads, seed, folder)


# Nodes whose `length` is the number of frames generated (ImageFromBatch's is not).
_LENGTH_NODES = {"SteadyDancerImageToVideo", "WanImageToVideo", "EmptyHunyuanLatentVideo"}
