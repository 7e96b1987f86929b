"""`tah serve`: an OpenAI-compatible HTTP server with continuous batching and per-token depth.

schemas.py (request bodies, OpenAI-style errors), engine.py (the one thread that owns the model and
steps the running batch), metrics.py (Prometheus), app.py (FastAPI routes), cli.py (`tah serve`).
"""
