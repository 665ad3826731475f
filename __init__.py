"""ComfyUI entry point of comfyui-steadydancer.

ComfyUI imports every custom node package at start-up, so this module does nothing heavy:
no torch import, no model loading, no optional dependency. The nodes (and ComfyUI's own
modules they need) are imported only when ComfyUI asks for the extension.
"""

from __future__ import annotations

__version__ = "0.1.0"


async def comfy_entrypoint():
    """Called by ComfyUI (V3 node API) once, when it loads custom nodes."""
    from .nodes import SteadyDancerExtension

    return SteadyDancerExtension()
