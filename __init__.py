"""ComfyUI entry point of the RCOD extension (custom_nodes/comfyui-rcod).

ComfyUI imports this file as a package. The nodes live in ``nodes/`` and stay thin: all logic is in
``rcod_core`` (which never imports ComfyUI).
"""

try:
    import folder_paths  # noqa: F401  (ComfyUI's; always there when ComfyUI loads the extension)
except ImportError:  # imported outside ComfyUI (e.g. pytest collecting the repo root): no nodes
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
