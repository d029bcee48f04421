"""Generation: preallocated caches, batched sampling, n samples per prompt, continuous batching (see engine.py)."""

from openseek.engine.engine import Completion, Engine, Request

__all__ = ["Completion", "Engine", "Request"]
