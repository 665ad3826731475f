"""Count what the malformed RunPod jobs of test_docker_jobs_malformed.JOBS do to a worker.

    .venv/bin/python tests/docker_malformed_census.py                # stand-in ComfyUI
    COMFYUI_DIR=/tmp/ComfyUI-033 .venv/bin/python tests/docker_malformed_census.py --real
    .venv/bin/python tests/docker_malformed_census.py --worker /tmp/old   # another worker's docker/

Each job goes through run_job with ComfyUI's input/output folders holding a user's files;
printed: error results, successes, exceptions out of the worker (by type), jobs after which
a user's file changed or disappeared, jobs that left files behind. The figures in
docs/reliability.md come from here; --worker DIR runs DIR/docker/*.py instead (e.g. an older
commit's, exported with `git archive`), which is how the "before" figures were taken.
"""

from __future__ import annotations

import argparse
import collections
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docker_modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="a real ComfyUI (COMFYUI_DIR) instead of the stand-in")
    parser.add_argument("--worker", type=Path, help="a folder whose docker/ holds the worker to measure")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each exception and touched file")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)
    if args.worker:
        docker_modules.DOCKER = args.worker.resolve() / "docker"
    import test_docker_jobs_malformed as cases  # loads the worker's modules

    rh = docker_modules.load_docker_module("runpod_handler")
    cc = sys.modules["comfy_client"]
    exceptions: collections.Counter[str] = collections.Counter()
    touched, leftover, errors, successes = [], [], 0, 0
    root = Path(tempfile.mkdtemp(prefix="census-"))
    cases.populate(root)
    comfyui = docker_modules.running_comfyui(root) if args.real else None
    url = comfyui.__enter__() if comfyui else None
    started = time.monotonic()
    try:
        for name, params, _ in cases.JOBS:
            shutil.rmtree(root / "input" / "steadydancer-jobs", ignore_errors=True)
            for rel in ("input/existing.png", "output/worker-test_00001_.png", "output/old.png"):
                (root / rel).write_bytes(cases.USERS_PNG)
            (root / "input" / "notes.txt").write_text("the user's")
            before = cases.snapshot(root)
            client = cc.ComfyClient(url) if args.real else cases.StandInComfy(root)
            try:
                result = rh.run_job({"id": name, "input": params}, client=client, send=lambda job, message: None,
                                    environ=cases.ENV, cleanup_dir=root)
                if "error" in result:
                    errors += 1
                else:
                    successes += 1
            except Exception as exc:
                exceptions[type(exc).__name__] += 1
                if args.verbose:
                    print(f"exception: {name}: {type(exc).__name__}: {str(exc)[:120]}")
            after = cases.snapshot(root)
            changed = sorted(k for k in before if before[k] != after.get(k))
            extra = sorted(k for k in after if k not in before)
            if changed:
                touched.append(name)
                if args.verbose:
                    print(f"user's file changed or removed: {name}: {changed}")
            if extra:
                leftover.append(name)
                for rel in extra:
                    (root / rel).unlink()
    finally:
        if comfyui is not None:
            comfyui.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'real ComfyUI' if args.real else 'stand-in ComfyUI'}: {len(cases.JOBS)} jobs in "
          f"{time.monotonic() - started:.0f} s: {errors} error results, {successes} successes, "
          f"{sum(exceptions.values())} exceptions {dict(exceptions)}, {len(touched)} jobs changed or removed "
          f"a user's file {touched}, {len(leftover)} jobs left files behind")
    return 1 if exceptions or touched or leftover else 0


if __name__ == "__main__":
    sys.exit(main())
