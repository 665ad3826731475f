"""RunPod serverless worker: runs SteadyDancer jobs on the ComfyUI of this container.

A job's input is an API-format `workflow`, or a simple request (reference `image`, driving
`video`, `prompt`, `seed`, size, `length`, `steps`) that fills in the bundled workflow: see
docker/job_input.py. The worker uploads the media to ComfyUI, queues the workflow, follows
it over ComfyUI's websocket (forwarding progress to RunPod) and returns the saved videos and
images: base64 while they fit in RunPod's payload, presigned S3 URLs (rp_upload) when a
bucket is configured. Rejected workflows and failing nodes come back as `{"error": ...}`.

Run:
  python runpod_handler.py                  on RunPod (the entry point's `runpod` mode)
  python runpod_handler.py --test_input     one local job from test_input.json (RunPod SDK)
  python runpod_handler.py --job job.json --save out/   one job, files written to out/
Environment: COMFYUI_URL (http://127.0.0.1:8188), COMFYUI_READY_TIMEOUT (600 s),
STEADYDANCER_JOB_TIMEOUT (3600 s; then the prompt is interrupted), STEADYDANCER_INTERRUPT_GRACE
(60 s: a prompt still running this long after its interrupt makes RunPod replace the worker),
STEADYDANCER_INLINE_LIMIT_MB (15), STEADYDANCER_OUTPUT (auto | base64 | s3),
STEADYDANCER_KEEP_FILES (1: keep each job's files in ComfyUI's input/output folders),
BUCKET_ENDPOINT_URL / BUCKET_ACCESS_KEY_ID / BUCKET_SECRET_ACCESS_KEY (S3 for rp_upload),
and the per-job limits of docker/job_input.py (Limits): STEADYDANCER_MAX_INPUT_MB (200, each
media file), STEADYDANCER_MAX_TOTAL_INPUT_MB (400), STEADYDANCER_MAX_IMAGES (16),
STEADYDANCER_MAX_PROMPT_CHARS (4000), STEADYDANCER_DOWNLOAD_TIMEOUT (120 s for all URLs).

Whatever a job holds, the handler returns {"error": ...} for it rather than raising, and
removes only files the job itself created.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import mimetypes
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_client import (
    ComfyClient,
    ComfyError,
    ExecutionFailed,
    JobTimeout,
    OutputFile,
    Progress,
    WorkflowRejected,
    collect_outputs,
)
from job_input import JobInputError, Limits, PreparedJob, prepare

log = logging.getLogger("steadydancer.worker")
TEST_INPUT = Path(__file__).with_name("test_input.json")
S3_VARIABLES = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")
OUTPUT_MODES = ("auto", "base64", "s3")


def _env_float(environ: dict[str, str] | os._Environ, name: str, default: float) -> float:
    """A positive, finite number from the environment, else `default` (with a warning)."""
    raw = environ.get(name)
    if raw is None or not str(raw).strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        log.warning("%s=%r is not a positive number: using %s", name, raw, default)
        return default
    return value


def s3_configured(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    return all(environ.get(name) for name in S3_VARIABLES)


class ProgressReporter:
    """Turns ComfyUI progress events into RunPod progress updates, at most one per interval."""

    def __init__(
        self, job: dict[str, Any], workflow: dict[str, Any], send: Callable[[dict[str, Any], Any], None],
        interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job, self.workflow, self.send = job, workflow, send
        self.interval, self.clock = interval, clock
        self.last = -float("inf")

    def __call__(self, progress: Progress) -> None:
        now = self.clock()
        finished = progress.max > 0 and progress.value >= progress.max
        if now - self.last < self.interval and not finished:
            return
        self.last = now
        node = self.workflow.get(progress.node or "", {})
        title = node.get("_meta", {}).get("title") or node.get("class_type") or "ComfyUI"
        message = {
            "node": progress.node,
            "title": title,
            "step": progress.value,
            "steps": progress.max,
            "percent": round(100 * progress.value / progress.max) if progress.max else None,
        }
        try:
            self.send(self.job, message)
        except Exception as exc:  # progress is best effort; never fail a job for it
            log.warning("progress update failed: %s", exc)


def send_progress(job: dict[str, Any], message: dict[str, Any]) -> None:
    """runpod.serverless.progress_update on RunPod; a log line when run locally."""
    if os.environ.get("RUNPOD_WEBHOOK_GET_JOB"):
        import runpod

        runpod.serverless.progress_update(job, message)
    else:
        log.info("progress: %s", message)


def upload_to_s3(job_id: str, name: str, data: bytes) -> str:
    from runpod.serverless.utils import rp_upload

    return rp_upload.upload_in_memory_object(name, data, prefix=job_id)


def encode_outputs(
    job_id: str, files: list[tuple[OutputFile, bytes]], *, mode: str, inline_limit: int,
    s3_ready: bool, s3_upload: Callable[[str, str, bytes], str] = upload_to_s3,
) -> list[dict[str, Any]]:
    """The result entries for the saved files: base64, or S3 URLs.

    auto: S3 when a bucket is configured, else base64 if it fits under `inline_limit` bytes
    (of base64), else a JobOutputError saying how to get large results.
    """
    if mode not in OUTPUT_MODES:
        raise JobOutputError(f"STEADYDANCER_OUTPUT={mode!r}: use one of {', '.join(OUTPUT_MODES)}")
    use_s3 = mode == "s3" or (mode == "auto" and s3_ready)
    if use_s3 and not s3_ready:
        raise JobOutputError(f"STEADYDANCER_OUTPUT=s3 needs {', '.join(S3_VARIABLES)}")
    if not use_s3:
        encoded = sum(4 * ((len(data) + 2) // 3) for _, data in files)
        if encoded > inline_limit:
            raise JobOutputError(
                f"the outputs are {encoded / 2**20:.1f} MB as base64, above the "
                f"{inline_limit / 2**20:.0f} MB that fit in a RunPod response: configure an S3 "
                f"bucket ({', '.join(S3_VARIABLES)}) or ask for a shorter or smaller video"
            )
    results = []
    for output, data in files:
        entry: dict[str, Any] = {
            "filename": output.filename,
            "type": "video" if output.is_video else "image",
            "mime": mimetypes.guess_type(output.filename)[0] or "application/octet-stream",
            "node": output.node,
            "bytes": len(data),
        }
        if use_s3:
            entry["url"] = s3_upload(job_id, output.filename, data)
        else:
            entry["base64"] = base64.b64encode(data).decode("ascii")
        results.append(entry)
    return results


class JobOutputError(Exception):
    """The job ran but its outputs cannot be returned as configured."""


def list_files(folder: Path) -> set[Path]:
    """Every file under `folder` (resolved paths); empty if it does not exist."""
    found: set[Path] = set()
    for root, _, names in os.walk(folder):
        found.update(Path(root, name).resolve() for name in names)
    return found


def remove_job_files(
    comfyui_dir: Path, inputs: list[str], outputs: list[OutputFile], *, job_folder: str = "",
    existing_outputs: set[Path] | None = None,
) -> None:
    """Delete what a finished job created in ComfyUI's input and output folders.

    A serverless worker serves job after job; without this its disk fills up. Only the job's
    uploads inside its own input subfolder `job_folder` (when given), and saved files that
    were not in the output folder before the job (`existing_outputs`), are removed: a file
    the job did not create is never touched.
    """
    input_root = (comfyui_dir / "input").resolve()
    output_root = (comfyui_dir / "output").resolve()
    upload_root = (input_root / job_folder).resolve() if job_folder else input_root
    candidates = [(input_root / name, upload_root) for name in inputs]
    candidates += [(output_root / o.subfolder / o.filename, output_root) for o in outputs if o.type == "output"]
    for path, root in candidates:
        resolved = path.resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            log.warning("not removing %s: outside the job's folders", path)
            continue
        if root == output_root and existing_outputs is not None and resolved in existing_outputs:
            log.warning("not removing %s: it was there before the job", path)
            continue
        try:
            resolved.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s: %s", resolved, exc)
    if job_folder and upload_root != input_root:
        with contextlib.suppress(OSError):
            upload_root.rmdir()  # only when empty


def run_job(
    job: dict[str, Any], *, client: ComfyClient | None = None,
    send: Callable[[dict[str, Any], Any], None] = send_progress,
    s3_upload: Callable[[str, str, bytes], str] = upload_to_s3,
    environ: dict[str, str] | os._Environ = os.environ,
    cleanup_dir: Path | None = None,
) -> dict[str, Any]:
    """Run one job; returns RunPod's output ({"outputs": [...]} or {"error": ...}).

    With `cleanup_dir` (ComfyUI's folder), the job's inputs and outputs are deleted from it
    afterwards, whatever the result.
    """
    job_id = str(job.get("id") or "local") if isinstance(job, dict) else "local"
    try:
        prepared: PreparedJob = prepare(
            job.get("input") if isinstance(job, dict) else None,
            limits=Limits.from_env(environ, warn=log.warning),
        )
    except JobInputError as exc:
        return {"error": f"bad input: {exc}"}
    client = client or ComfyClient(environ.get("COMFYUI_URL", "http://127.0.0.1:8188"))
    started = time.monotonic()
    uploaded: list[str] = []
    saved: list[OutputFile] = []
    existing_outputs = list_files(cleanup_dir / "output") if cleanup_dir is not None else None
    try:
        client.wait_ready(timeout=_env_float(environ, "COMFYUI_READY_TIMEOUT", 600))
        for upload in prepared.uploads:
            # Into the job's own new folder, never over a file: ComfyUI stores a clash under
            # another name (caught below), so nothing of anyone else's is replaced.
            stored = client.upload(upload.name, upload.data, subfolder=upload.subfolder)
            if stored != upload.path:
                raise ComfyError(f"ComfyUI stored {upload.path} as {stored}; the job's folder was not empty")
            uploaded.append(stored)
        reporter = ProgressReporter(job, prepared.workflow, send)
        prompt_id, entry = client.run(prepared.workflow, on_progress=reporter,
                                      timeout=_env_float(environ, "STEADYDANCER_JOB_TIMEOUT", 3600))
        log.info("job %s: prompt %s finished", job_id, prompt_id)
        saved = collect_outputs(entry)
        if not saved:
            return {"error": "the workflow finished but saved no file: it needs a SaveVideo or "
                             "SaveImage node", "prompt_id": prompt_id}
        files = [(output, client.download(output)) for output in saved]
        outputs = encode_outputs(
            job_id, files, mode=environ.get("STEADYDANCER_OUTPUT", "auto").strip().lower(),
            inline_limit=int(_env_float(environ, "STEADYDANCER_INLINE_LIMIT_MB", 15) * 2**20),
            s3_ready=s3_configured(environ), s3_upload=s3_upload,
        )
    except JobTimeout as exc:
        grace = _env_float(environ, "STEADYDANCER_INTERRUPT_GRACE", 60)
        if client.wait_stopped(exc.prompt_id, grace):
            return {"error": str(exc), "prompt_id": exc.prompt_id}
        # A node that never checks for interrupts still holds ComfyUI (and the GPU): RunPod
        # replaces this worker after the job instead of giving it the next one.
        log.error("prompt %s still runs %.0f s after its interrupt: asking RunPod for a new worker",
                  exc.prompt_id, grace)
        return {"error": f"{exc}; it did not stop within {grace:.0f} s of its interrupt, so the worker "
                         "is replaced", "prompt_id": exc.prompt_id, "refresh_worker": True}
    except WorkflowRejected as exc:
        return {"error": f"ComfyUI rejected the workflow: {exc}",
                "node_errors": exc.details.get("node_errors") or {}}
    except ExecutionFailed as exc:
        keys = ("node_id", "node_type", "exception_type", "exception_message")
        return {"error": str(exc), "details": {k: exc.details[k] for k in keys if k in exc.details}}
    except (ComfyError, JobOutputError) as exc:
        return {"error": str(exc)}
    finally:
        if cleanup_dir is not None:
            remove_job_files(cleanup_dir, uploaded, saved, job_folder=prepared.folder,
                             existing_outputs=existing_outputs)
    result: dict[str, Any] = {"prompt_id": prompt_id, "outputs": outputs,
                              "seconds": round(time.monotonic() - started, 1)}
    if prepared.seed is not None:
        result["seed"] = prepared.seed
    return result


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod handler. The job's files are removed from ComfyUI's folders afterwards
    (STEADYDANCER_KEEP_FILES=1 keeps them) when ComfyUI runs in this container.

    It never raises: a failure nobody foresaw comes back as {"error": ...} too (and is
    logged with its traceback), not as the SDK's report of an exception.
    """
    try:
        comfyui_dir = Path(os.environ.get("COMFYUI_DIR", "/opt/ComfyUI"))
        keep = os.environ.get("STEADYDANCER_KEEP_FILES", "").strip() in ("1", "true", "yes")
        return run_job(job, cleanup_dir=None if keep or not comfyui_dir.is_dir() else comfyui_dir)
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job.get("id") if isinstance(job, dict) else None)
        return {"error": f"internal error ({type(exc).__name__}): {str(exc)[:300]}"}


def save_outputs(result: dict[str, Any], folder: Path) -> list[Path]:
    """Write a result's base64 outputs to `folder`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for entry in result.get("outputs", []):
        if "base64" in entry:
            path = folder / Path(entry["filename"]).name
            path.write_bytes(base64.b64decode(entry["base64"]))
            paths.append(path)
    return paths


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without base64 payloads, for printing."""
    return {**result, "outputs": [{k: v for k, v in e.items() if k != "base64"}
                                  for e in result.get("outputs", [])]}


def _run_file(job_file: str, save: Path | None) -> int:
    text = sys.stdin.read() if job_file == "-" else Path(job_file).read_text(encoding="utf-8")
    job = json.loads(text)
    job.setdefault("id", "local")
    result = run_job(job)
    if save is not None and "error" not in result:
        for path in save_outputs(result, save):
            log.info("wrote %s", path)
    print(json.dumps(_summary(result), indent=1, ensure_ascii=False))
    return 1 if "error" in result else 0


def _runpod_argv(argv: list[str]) -> list[str]:
    """`--test_input` with no JSON after it means test_input.json next to this file."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--test_input" and (i + 1 == len(out) or out[i + 1].startswith("--")):
            out.insert(i + 1, TEST_INPUT.read_text(encoding="utf-8"))
            break
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[worker] %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if "--job" in args:
        parser = argparse.ArgumentParser(description="run one job without the RunPod SDK")
        parser.add_argument("--job", required=True, help="job JSON file ({\"input\": ...}), or - for stdin")
        parser.add_argument("--save", type=Path, help="write the returned files here")
        options = parser.parse_args(args)
        return _run_file(options.job, options.save)
    import runpod

    if not os.environ.get("RUNPOD_WEBHOOK_GET_JOB") and not {"--test_input", "--rp_serve_api"} & set(args):
        # Off RunPod the SDK runs one local job from ./test_input.json: use the one next to this file.
        log.info("not on RunPod (no RUNPOD_WEBHOOK_GET_JOB): running %s once", TEST_INPUT)
        args = ["--test_input", *args]
    sys.argv = [sys.argv[0], *_runpod_argv(args)]
    runpod.serverless.start({"handler": handler})
    return 0


if __name__ == "__main__":
    sys.exit(main())
