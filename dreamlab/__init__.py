"""dreamlab core: device/AMP, safetensors IO, offline datasets, metrics and the CLI.

This package sits at the bottom of the import graph: it never imports `generators`, `worlds`,
`envs`, `agents` or `multimodal` at module level (the CLI loads their sub-commands by name).
"""
from dreamlab.errors import DreamlabError
from dreamlab.runtime import set_thread_env

set_thread_env()  # before anything imports torch: OpenMP reads its wait policy once, when torch loads it

__version__ = "0.1.0"
__all__ = ["DreamlabError", "__version__"]
