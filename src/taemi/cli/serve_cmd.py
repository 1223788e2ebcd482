"""``taemi serve``: an HTTP API (and a web page) over a trained run (:mod:`taemi.serve`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from collections.abc import Callable

from taemi.cli.common import add_run_options, key_value

log = logging.getLogger(__name__)

#: The environment variable that holds the bearer token when --token is not given.
TOKEN_ENV = "TAEMI_SERVE_TOKEN"


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "serve",
        help="HTTP API and web page: upload media, get the run's intensities (taemi[serve])",
    )
    add_run_options(sp)
    sp.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    sp.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    sp.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on /v1/* except /v1/health "
        f"(default: ${TOKEN_ENV} when set; otherwise open)",
    )
    sp.add_argument(
        "--max-upload-mb",
        type=float,
        default=200.0,
        help="largest request body, all its files together, in MiB (413 beyond)",
    )
    sp.add_argument("--batch-size", type=int, default=8, help="clips per fusion-model micro-batch")
    sp.add_argument(
        "--max-wait-ms",
        type=float,
        default=20.0,
        help="how long a clip waits for others to join its fusion micro-batch",
    )
    sp.add_argument(
        "--queue-size",
        type=int,
        default=32,
        help="requests in the server at once (receiving, extracting, fusing); more get 503",
    )
    sp.add_argument(
        "--workers", type=int, default=1, help="extraction threads (requests extracted at once)"
    )
    sp.add_argument(
        "--extract-batch-size", type=int, default=8, help="clips per encoder batch in a request"
    )
    sp.add_argument(
        "--profile",
        choices=("offline", "paper"),
        help="extraction profile; needed when the run has no features.json (e.g. imported weights)",
    )
    sp.add_argument(
        "--model",
        action="append",
        metavar="ROLE=ID_OR_DIR",
        help="the model of a role (asr, audio, vision, text) when it is not the profile's",
    )
    sp.add_argument(
        "--trust-remote-code", action="store_true", help="paper profile: allow GTE's model code"
    )
    sp.add_argument(
        "--allow-download", action="store_true", help="paper profile: let Hugging Face download"
    )
    common(sp)
    sp.set_defaults(func=cmd_serve)


def is_local(host: str) -> bool:
    """Whether ``host`` binds only this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from taemi.serve import require_serve_extra

    try:
        require_serve_extra()
    except ImportError as e:
        raise ValueError(str(e)) from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 0-65535")
    if not args.max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb {args.max_upload_mb}: expected a positive size")
    import uvicorn

    from taemi.runtime import configure_threads
    from taemi.serve.app import create_app
    from taemi.serve.service import ServeSettings

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    settings = ServeSettings(
        run=args.run,
        which=args.which,
        profile=args.profile,
        models=dict(key_value(m, "--model") for m in (args.model or [])),
        device=args.device,
        precision=args.precision,
        token=token,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        workers=args.workers,
        extract_batch_size=args.extract_batch_size,
        trust_remote_code=args.trust_remote_code,
        allow_download=args.allow_download,
    )
    settings.check()  # before any model loads
    if "OMP_NUM_THREADS" not in os.environ:  # one intra-op thread per core this process may use
        configure_threads()
    if not is_local(args.host) and token is None:
        log.warning(
            "binding %s (not only this machine) without a token: anyone who reaches it can "
            "use the API; pass --token or set %s",
            args.host,
            TOKEN_ENV,
        )
    app = create_app(settings)  # loads the run and the encoders, once
    # every request writes a temporary store: its creation and commit lines are noise here
    logging.getLogger("taemi.store.writer").setLevel(logging.WARNING)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info")
    server = uvicorn.Server(config)
    log.info(
        "taemi serve: listening on http://%s:%s/ (API under /v1/, token %s)",
        args.host if ":" not in args.host else f"[{args.host}]",
        args.port,
        "required" if token else "not required",
    )
    server.run()
    return 0
