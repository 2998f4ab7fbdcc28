"""``python -m example_project.demo [--serve]``: what ``scripts/demo`` runs."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from example_project.demo.processes import ROOT, DemoError, say
from example_project.demo.steps import Demo


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Send mail over SMTP with OAuth2 (XOAUTH2 and OAUTHBEARER) end to end, "
        "against the bundled development OAuth2 and SMTP server.",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="Then keep the servers running with runserver (port 8000 or a free one) and "
        "an admin/admin superuser, until CONTROL-C.",
    )
    parser.add_argument("--email", default="demo@example.com", help="The mailbox to connect.")
    parser.add_argument(
        "--token-lifetime", type=int, default=20, help="Access token lifetime in seconds."
    )
    return parser.parse_args(argv)


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # runs the finally clauses that stop the children


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    var_dir = Path(os.environ.get("EXAMPLE_VAR_DIR") or ROOT / "example_project" / "var")
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    # Even when started from a script that ignores SIGINT (``&``): Ctrl-C means "stop".
    signal.signal(signal.SIGINT, signal.default_int_handler)
    demo = Demo(var_dir.resolve(), options.email, options.token_lifetime)
    try:
        demo.run(serve=options.serve)
    except DemoError as error:
        say(f"\nscripts/demo failed: {error}")
        return 1
    except KeyboardInterrupt:
        say("\nInterrupted.")
        return 0 if options.serve else 130
    finally:
        say("  Stopping the processes the demo started ...")
        demo.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
