"""``ddpm serve``: the HTTP API in one process, served by uvicorn as ``service.http_server`` configures it.

``add_common_flags`` and ``SETTINGS_FLAGS`` are the flags ``ddpm serve`` shares with ``ddpm up`` and the settings
they override (``service.settings.settings_from_args``). The app itself (``service.api``, FastAPI) is imported
only when the command runs, so ``ddpm up`` can take the flags without importing the web stack.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from pydantic import ValidationError

from service.settings import describe_validation_error, settings_from_args

__all__ = ["SETTINGS_FLAGS", "add_common_flags", "configure_parser", "main"]

# flag (argparse destination) -> the setting it overrides
SETTINGS_FLAGS = {"host": "host", "port": "port", "redis_url": "redis_url", "checkpoint": "checkpoints"}


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``ddpm serve`` and ``ddpm up`` (each overrides its DDPM_* environment variable)."""
    parser.add_argument("--host", help="address to listen on (DDPM_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="API port (DDPM_PORT; default 8000)")
    parser.add_argument("--redis-url", help="redis://host:port/db (DDPM_REDIS_URL)")
    parser.add_argument("--checkpoint", action="append", metavar="NAME=FILE",
                        help="a model to serve; repeatable, the first is the default (DDPM_CHECKPOINTS)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser)


def main(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM: 0, or 2 for invalid settings, 3 when the server could not start (e.g. the port
    is taken), as ``uvicorn.run`` exits."""
    try:
        settings = settings_from_args(args, SETTINGS_FLAGS)
    except ValidationError as exc:
        print(f"ddpm serve: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    import uvicorn

    from service.api import create_app
    from service.http_server import server_config

    logging.getLogger().setLevel(settings.log_level)
    config = server_config(create_app(settings), settings)
    del settings  # holds the plain API keys; the app has their digests
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3
