"""The ``ddpm`` command: one console script, one subcommand per task.

Each subcommand lives in the module that owns the work and exposes ``configure_parser(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs, so ``ddpm --help`` is fast and
``ddpm train`` never imports the web stack. Logging is set up here, once, for every subcommand: the level is
``DDPM_LOG_LEVEL`` (INFO by default; ``-v`` means DEBUG), so the worker and training honour it as the API does.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("model.train", "train a DDPM and write checkpoints (resumable)"),
    "sample": ("model.sample_cli", "sample images or a progressive x0-hat strip from a checkpoint"),
    "eval": ("model.evaluate", "bits/dim and sample-quality figures of a checkpoint"),
    "import-diffusers": ("model.convert", "convert a diffusers-format DDPM folder into a checkpoint"),
    "serve": ("service.serve", "run the HTTP API"),
    "worker": ("service.worker", "run a generation worker (keeps the U-Net loaded)"),
    "up": ("service.stack", "run the whole stack locally: Redis, a worker and the API"),
    "webhooks": ("service.webhooks.process", "deliver webhooks (every worker does too); --new-secret makes a "
                                                "signing secret"),
}


def build_parser(argv: Sequence[str] | None = None, *, load_all: bool = False) -> argparse.ArgumentParser:
    """The full parser. Only the subcommand named in ``argv`` gets its flags, unless ``load_all``."""
    parser = argparse.ArgumentParser(prog="ddpm", description="DDPM training, sampling and serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv or () if a in COMMANDS), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if load_all or name == wanted:
            importlib.import_module(module).configure_parser(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    from service.settings import log_level

    try:
        level = "DEBUG" if args.verbose else log_level()
    except ValidationError as exc:
        parser.error(f"DDPM_LOG_LEVEL: {exc.errors()[0]['msg']}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
