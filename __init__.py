"""LiveTalk for ComfyUI: real-time talking-avatar video from a portrait, speech and a prompt.

ComfyUI imports this file as the pack. The nodes use the V3 schema (``comfy_api.latest``); on a
ComfyUI without it the pack logs one line and registers nothing, instead of failing to import.
"""

import logging
import sys

MIN_COMFYUI_VERSION = "0.3.75"
# Modules every ComfyUI has loaded before it imports custom nodes: their presence tells an old
# ComfyUI (warn the user) from a plain Python process such as pytest, which imports this file
# because the repository root is a package (nothing to warn about there).
COMFYUI_MODULES = ("folder_paths", "comfy")
# The front-end extension (the LiveTalk Live node's panel): ComfyUI serves it under /extensions/<pack folder>/
# and the front end loads every .js file in it.
WEB_DIRECTORY = "./nodes/web"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:
    inside_comfyui = any(name in sys.modules for name in COMFYUI_MODULES)
    logging.getLogger(__name__).log(
        logging.ERROR if inside_comfyui else logging.DEBUG,
        "LiveTalk needs ComfyUI %s or newer (comfy_api.latest is missing); its nodes are not registered. "
        "Update ComfyUI.",
        MIN_COMFYUI_VERSION,
    )
    NODE_CLASS_MAPPINGS: dict = {}
else:
    from .nodes.comfy_models import register_model_folders
    from .nodes.live_routes import mount as mount_live_routes
    from .nodes.node_list import NODES

    register_model_folders()
    mount_live_routes()  # the live socket and page on ComfyUI's own server (only inside a running one)

    class LiveTalkExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> ComfyExtension:
        return LiveTalkExtension()
