"""The OpenAI-compatible HTTP server: routes, schemas, auth, metrics and the web chat page."""

from llmasos.serving.app import create_app, serve

__all__ = ["create_app", "serve"]
