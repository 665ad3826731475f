"""Container health check: ComfyUI answers GET /system_stats on its port.

Used by the image's HEALTHCHECK and the compose file. Exit 0 when healthy, 1 otherwise.
Standard library only: the slim image has no curl.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def healthy(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    """Whether `url` (ComfyUI's /system_stats) answers with its JSON, and why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            stats = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"{url}: {exc}"
    if not isinstance(stats, dict) or "system" not in stats:
        return False, f"{url}: answered, but not with ComfyUI's system stats"
    return True, "ok"


def main() -> int:
    port = os.environ.get("COMFYUI_PORT", "8188")
    ok, why = healthy(f"http://127.0.0.1:{port}/system_stats")
    if not ok:
        print(why, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
