#!/usr/bin/env python3
"""Django's command-line utility for the example project."""

import os
import sys
from pathlib import Path


def main() -> None:
    # The repository root on the path, so that ``example_project`` imports from anywhere.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
