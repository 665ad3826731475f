"""Import the scripts under docker/ as modules, the way they run in the image.

They are standalone files (not a package): each runs with docker/ as its own folder on
sys.path, so sibling imports (`import comfy_client`) resolve the same way here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def load_docker_module(name: str) -> ModuleType:
    """docker/<name>.py as module `name` (registered in sys.modules for sibling imports)."""
    if str(DOCKER) not in sys.path:
        sys.path.insert(0, str(DOCKER))
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
