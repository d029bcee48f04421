"""Generation: preallocated caches, batched sampling, n samples per prompt, continuous batching (see engine.py)."""

from openseek.engine.engine import Engine, stop_token_ids
from openseek.engine.request import Completion, RequestHandle

__all__ = ["Completion", "Engine", "RequestHandle", "stop_token_ids"]
