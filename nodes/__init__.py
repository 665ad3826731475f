"""ComfyUI nodes of comfyui-steadydancer (V3 schema, `comfy_api.latest`).

Imported only when ComfyUI calls the package's `comfy_entrypoint`, so ComfyUI's own modules
are available here; importing this module registers the `dwpose` model folder.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .clip_encode import CLIP_NODES
from .conditioning import CONDITIONING_NODES
from .guider import MODEL_NODES as GUIDER_NODES
from .model_loader import MODEL_NODES as LOADER_NODES
from .pose_nodes import POSE_NODES, register_dwpose_folder
from .sampling import SAMPLING_NODES

register_dwpose_folder()


class SteadyDancerExtension(ComfyExtension):
    """Every node of the package, in the order the "Add Node" menu shows them."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            *LOADER_NODES,
            *POSE_NODES,
            *CLIP_NODES,
            *CONDITIONING_NODES,
            *GUIDER_NODES,
            *SAMPLING_NODES,
        ]
