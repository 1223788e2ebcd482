"""``taemi serve``: an HTTP API (and a web page) over a trained run.

FastAPI and uvicorn come with the ``serve`` extra (``pip install 'taemi[serve]'``); they
are imported only here, so ``import taemi`` and the other commands do not need them.

- :mod:`taemi.serve.app`: the FastAPI app (:func:`~taemi.serve.app.create_app`), routes
  and the error shape;
- :mod:`taemi.serve.service`: the run and encoders loaded once, the request queue, the
  extraction pool, the per-clip response;
- :mod:`taemi.serve.batcher`: micro-batching of the fusion model over clips of several
  requests;
- :mod:`taemi.serve.uploads`: multipart uploads streamed to a private folder;
- ``static/``: the page (``GET /``).
"""

from __future__ import annotations

__all__ = ["require_serve_extra"]


def require_serve_extra() -> None:
    """ImportError naming ``pip install 'taemi[serve]'`` when FastAPI, uvicorn or
    python-multipart is missing."""
    missing = []
    for module, package in (
        ("fastapi", "fastapi"),
        ("uvicorn", "uvicorn"),
        ("python_multipart", "python-multipart"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(f"taemi serve needs {', '.join(missing)}: pip install 'taemi[serve]'")
