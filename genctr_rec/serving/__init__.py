"""Serving: export a trained run to an artifact, score requests with it, serve it over HTTP.

``artifact`` (export and load), ``model`` (the TorchScript inference model), ``predictor``
(validation, g(s, c) reuse and caching), ``server`` (the FastAPI service).
"""


class ArtifactError(RuntimeError):
    """An artifact is missing, damaged, or failed its export checks; the message says which."""
