"""Private OpenAI-compatible serving: app.py (FastAPI routes, responses, CLI), gate.py (host, API key and body-size
checks; the error envelope), server.py (requests to jobs on the Engine; no web framework, so `openseek chat` uses
it too), metrics.py (Prometheus), protocol.py (wire shapes), reasoning.py, detokenize.py, static/ (chat page)."""
