"""What a RunPod job asks for, checked, and turned into an API-format ComfyUI workflow.

A job input is either
- `{"workflow": {...API format...}, "images": [{"name": ..., "image": <media>}]}`: run that
  workflow; the listed files are uploaded to ComfyUI's input folder first, under their names;
- or a simple request that fills in the bundled workflow (workflows/api/steadydancer_api.json):
  `{"image": <media>, "video": <media>, "prompt": ..., "negative_prompt": ...,
    "seed": int, "width": int, "height": int (or "size": "480x832" / [480, 832]),
    "length": int, "steps": int, "model": "<file in diffusion_models>"}`;
  only `image` and `video` are required.
A <media> is base64 (optionally a `data:` URL) or an http(s) URL.

The bundled workflow's inputs are found by what they are (node class, input name and the
links between nodes), not by node ids, so an edited workflow keeps working.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "api" / "steadydancer_api.json"
MAX_SEED = 2**63 - 1
SIMPLE_FIELDS = frozenset(
    {"image", "video", "prompt", "negative_prompt", "seed", "width", "height", "size", "length",
     "steps", "model"}
)
WORKFLOW_FIELDS = frozenset({"workflow", "images"})


class JobInputError(ValueError):
    """The job input is wrong; the message says what to send instead."""


@dataclass(frozen=True)
class Upload:
    """A file to put in ComfyUI's input folder before the workflow runs."""

    name: str
    data: bytes


@dataclass(frozen=True)
class PreparedJob:
    workflow: dict[str, Any]
    uploads: list[Upload]
    seed: int | None = None


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


def fetch_url_safely(url: str, max_bytes: int, timeout: float = 60.0) -> bytes:
    """Download a job's URL with the RunPod SDK's SSRF guard (no private or metadata addresses)."""
    try:
        from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped, safe_get
    except ImportError:
        raise JobInputError(
            f"{url}: URL inputs need the runpod SDK >= 1.12 (its SSRF-safe download); send base64"
        ) from None

    try:
        response = safe_get(url, timeout=int(timeout), max_bytes=max_bytes)
        with response:
            if response.status_code != 200:
                raise JobInputError(f"{url}: HTTP {response.status_code}")
            return b"".join(iter_content_capped(response, 1 << 20, max_bytes))
    except SSRFError as exc:
        raise JobInputError(f"{url} cannot be fetched: {exc}") from None
    except OSError as exc:  # requests' errors are OSErrors
        raise JobInputError(f"{url} could not be downloaded: {exc}") from None


def load_media(
    value: Any, field: str, allowed: frozenset[str], *, max_bytes: int,
    fetch_url: Callable[[str, int], bytes] = fetch_url_safely,
) -> tuple[bytes, str]:
    """(bytes, file type) of a media field given as base64 or URL; checks the type."""
    if not isinstance(value, str) or not value.strip():
        raise JobInputError(f"`{field}` must be a base64 string or an http(s) URL")
    text = value.strip()
    if text.lower().startswith(("http://", "https://")):
        data = fetch_url(text, max_bytes)
    else:
        if len(text) * 3 // 4 > max_bytes:
            raise JobInputError(f"`{field}` is larger than {max_bytes // 2**20} MB")
        data = decode_base64(text, field)
    if len(data) > max_bytes:
        raise JobInputError(f"`{field}` is larger than {max_bytes // 2**20} MB")
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
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise JobInputError(f"`{key}` must be an integer, got {value!r}")
    value = int(value)
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
        if isinstance(size, str) and re.fullmatch(r"\s*\d+\s*[x×*]\s*\d+\s*", size):
            w, h = (int(v) for v in re.split(r"[x×*]", size))
        elif isinstance(size, list | tuple) and len(size) == 2:
            w, h = size
        else:
            raise JobInputError(f"`size` must look like \"480x832\" or [480, 832], got {size!r}")
        params = {"width": w, "height": h}
    return _int(params, "width", 16, 4096, 16), _int(params, "height", 16, 4096, 16)


def _check_keys(params: dict[str, Any], allowed: frozenset[str], mode: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise JobInputError(f"unknown input {unknown} for a {mode}; accepted: {', '.join(sorted(allowed))}")


def load_workflow(path: Path = WORKFLOW) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JobInputError(f"the bundled workflow {path} cannot be read: {exc}") from None


def prepare(
    params: Any, *, workflow: dict[str, Any] | None = None, max_bytes: int = 200 * 2**20,
    fetch_url: Callable[[str, int], bytes] = fetch_url_safely, rng: random.Random | None = None,
) -> PreparedJob:
    """Check a job's input and build the workflow and the uploads it needs."""
    if not isinstance(params, dict) or not params:
        raise JobInputError("the job input must be an object with `workflow`, or `image` and `video`")
    if "workflow" in params:
        return _prepare_workflow(params, max_bytes, fetch_url)
    return _prepare_simple(params, workflow if workflow is not None else load_workflow(),
                           max_bytes, fetch_url, rng or random.Random())


def _prepare_workflow(params: dict[str, Any], max_bytes: int, fetch_url: Callable[[str, int], bytes]) -> PreparedJob:
    _check_keys(params, WORKFLOW_FIELDS, "workflow request")
    workflow = params["workflow"]
    if isinstance(workflow, str):
        try:
            workflow = json.loads(workflow)
        except ValueError:
            raise JobInputError("`workflow` is a string but not JSON") from None
    if not isinstance(workflow, dict) or not workflow:
        raise JobInputError("`workflow` must be an API-format workflow (an object of nodes)")
    if "nodes" in workflow and "links" in workflow:
        raise JobInputError(
            "`workflow` is in the UI format: export it with \"Export (API)\" in ComfyUI instead"
        )
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise JobInputError(f"`workflow` node {node_id!r} has no class_type: is this the API format?")
    uploads = []
    images = params.get("images") or []
    if not isinstance(images, list):
        raise JobInputError("`images` must be a list of {\"name\": ..., \"image\": <base64 or URL>}")
    for i, item in enumerate(images):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or "image" not in item:
            raise JobInputError(f"`images[{i}]` must be {{\"name\": ..., \"image\": <base64 or URL>}}")
        name = item["name"]
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise JobInputError(f"`images[{i}].name` must be a plain file name, got {name!r}")
        data, _ = load_media(item["image"], f"images[{i}]", IMAGE_TYPES | VIDEO_TYPES,
                             max_bytes=max_bytes, fetch_url=fetch_url)
        uploads.append(Upload(name, data))
    return PreparedJob(copy.deepcopy(workflow), uploads)


def _prepare_simple(
    params: dict[str, Any], template: dict[str, Any], max_bytes: int,
    fetch_url: Callable[[str, int], bytes], rng: random.Random,
) -> PreparedJob:
    _check_keys(params, SIMPLE_FIELDS, "simple request (or send `workflow`)")
    for key in ("image", "video"):
        if key not in params:
            raise JobInputError(f"`{key}` is required (base64 or an http(s) URL), or send a full `workflow`")
    workflow = copy.deepcopy(template)
    tag = uuid.uuid4().hex[:8]

    image, image_type = load_media(params["image"], "image", IMAGE_TYPES - {"gif"},
                                   max_bytes=max_bytes, fetch_url=fetch_url)
    video, video_type = load_media(params["video"], "video", VIDEO_TYPES,
                                   max_bytes=max_bytes, fetch_url=fetch_url)
    uploads = [Upload(f"steadydancer_{tag}_reference.{image_type}", image),
               Upload(f"steadydancer_{tag}_driving.{video_type}", video)]
    node = _one(workflow, literal_inputs(workflow, "image", {"LoadImage"}), "the reference image", "reference")
    workflow[node]["inputs"]["image"] = uploads[0].name
    loaders = [i for cls, name in VIDEO_LOADERS.items() for i in literal_inputs(workflow, name, {cls})]
    node = _one(workflow, loaders, "the driving video", "driving")
    workflow[node]["inputs"][VIDEO_LOADERS[workflow[node]["class_type"]]] = uploads[1].name

    for key, link in (("prompt", "positive"), ("negative_prompt", "negative")):
        if params.get(key) is not None:
            if not isinstance(params[key], str):
                raise JobInputError(f"`{key}` must be a string")
            node = _one(workflow, linked_text_nodes(workflow, link), f"the {link} prompt")
            workflow[node]["inputs"]["text"] = params[key]

    seed = _int(params, "seed", 0, MAX_SEED)
    if seed is None:
        seed = rng.randrange(0, 2**32)
    # The sampler's noise seed, and the seed of the pose augmentation, if the workflow has one.
    seed_inputs = [(n, "noise_seed") for n in literal_inputs(workflow, "noise_seed")]
    seed_inputs += [(n, "seed") for n in literal_inputs(workflow, "seed")]
    if not seed_inputs:
        raise JobInputError("the workflow has no `noise_seed` or `seed` input to set the seed")
    for node_id, name in seed_inputs:
        workflow[node_id]["inputs"][name] = seed

    width, height = parse_size(params)
    if width is not None:
        _set(workflow, literal_inputs(workflow, "width"), "width", width, "the width")
        _set(workflow, literal_inputs(workflow, "height"), "height", height, "the height")
    length = _int(params, "length", 1, 1025)
    if length is not None:
        if (length - 1) % 4:
            raise JobInputError(f"`length` must be 4k+1 frames (5, 9, ..., 81), got {length}")
        _set(workflow, literal_inputs(workflow, "length", _LENGTH_NODES), "length", length, "the length")
    steps = _int(params, "steps", 1, 200)
    if steps is not None:
        _set(workflow, literal_inputs(workflow, "steps"), "steps", steps, "the steps")
    if params.get("model") is not None:
        if not isinstance(params["model"], str) or not params["model"].strip():
            raise JobInputError("`model` must be a file name in diffusion_models")
        _set(workflow, literal_inputs(workflow, "model_name"), "model_name", params["model"].strip(), "the model")
    return PreparedJob(workflow, uploads, seed)


# Nodes whose `length` is the number of frames generated (ImageFromBatch's is not).
_LENGTH_NODES = {"SteadyDancerImageToVideo", "WanImageToVideo", "EmptyHunyuanLatentVideo"}
