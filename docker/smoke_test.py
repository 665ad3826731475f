"""Build-time smoke test: start ComfyUI once on the CPU and fail if any node failed to import.

`main.py --quick-test-for-ci` imports ComfyUI's own nodes and every custom node, then exits,
with status 0 even when a node package failed to import. This script reads the log instead:
the build fails when a line says "IMPORT FAILED" or when this package is not in ComfyUI's
list of loaded custom nodes.

usage: python smoke_test.py --comfyui /opt/ComfyUI --package comfyui-steadydancer
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

_IMPORT_LINE = re.compile(r"^\s*[\d.]+ seconds(?P<failed> \(IMPORT FAILED\))?: (?P<path>.+?)\s*$")
# ComfyUI 0.33.0 writes every console line as "<colour>[LEVEL]<reset> message", colours
# always on; 0.3.64 writes the bare message. Both are read the same after this is removed.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL_TAG = re.compile(r"^\[(?:DEBUG|DETAIL|INFO|WARNING|ERROR|CRITICAL)\] ?")


def _plain_lines(log: str) -> list[str]:
    return [_LEVEL_TAG.sub("", _ANSI.sub("", line)) for line in log.splitlines()]


def check_log(log: str, package: str) -> list[str]:
    """Problems found in a ComfyUI start-up log (empty when the start was clean).

    `package` is the folder name of the custom node under custom_nodes/.
    """
    lines = _plain_lines(log)
    problems = [line.strip() for line in lines if "IMPORT FAILED" in line]
    loaded = [
        m for m in map(_IMPORT_LINE.match, lines)
        if m and Path(m.group("path")).name == package
    ]
    if not loaded:
        problems.append(f"custom node {package!r} is not in ComfyUI's import list (was it copied?)")
    return problems


def run(comfyui: Path, package: str, timeout: float) -> int:
    cmd = [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--disable-auto-launch"]
    try:
        proc = subprocess.run(
            cmd, cwd=comfyui, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"smoke test: ComfyUI did not finish within {timeout:.0f} s", file=sys.stderr)
        return 1
    log = proc.stdout + proc.stderr
    print(log)
    problems = check_log(log, package)
    if proc.returncode != 0:
        problems.insert(0, f"ComfyUI exited with status {proc.returncode}")
    for problem in problems:
        print(f"smoke test: {problem}", file=sys.stderr)
    if not problems:
        print(f"smoke test: ComfyUI started and imported every node, {package} included")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder (has main.py)")
    parser.add_argument("--package", required=True, help="folder name under custom_nodes/")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    return run(args.comfyui, args.package, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
