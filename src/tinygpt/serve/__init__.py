"""Serving a trained model over HTTP: an OpenAI-compatible completions API and a playground page.

``options`` (the limits) imports nothing heavy; ``app`` and ``server`` need FastAPI and
uvicorn (``pip install 'tinygpt[serve]'``).
"""
