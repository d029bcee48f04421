"""Generation: preallocated caches, batched sampling, n samples per prompt, continuous batching (see engine.py)."""

from openseek.engine.engine import Completion, Engine, Request, stop_token_ids

__all__ = ["Completion", "Engine", "Request", "stop_token_ids"]
