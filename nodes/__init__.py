"""ComfyUI nodes of the RCOD extension (classic node API). Each node is a thin wrapper over rcod_core."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
