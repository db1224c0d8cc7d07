"""ComfyUI custom node package: link or copy this folder into ComfyUI/custom_nodes (docs/use-in-pipeline.md).

ComfyUI imports this file under a name of its own (the folder's path or name), so everything here is imported
absolutely from the pip-installed `s3search`; `comfy` itself is imported only when a SAMPLER is built.
"""

from s3search.integrations.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
