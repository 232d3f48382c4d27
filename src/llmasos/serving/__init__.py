"""The OpenAI-compatible HTTP server: routes, schemas, auth, metrics and the web chat page."""

from llmasos.extras import require

require("serve", "llmasos.serving")

from llmasos.serving.app import create_app, serve  # noqa: E402  (after the check, which names the extra)

__all__ = ["create_app", "serve"]
