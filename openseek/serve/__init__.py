"""Private OpenAI-compatible serving: app.py (routes, auth, limits), protocol.py, reasoning.py, static/ (chat page)."""
