"""Sphinx configuration for django-xoauth2-mail.

The build imports neither the package nor Django: the version is read from the package's
``__init__.py`` as text, so the docs build needs only Sphinx (and the theme).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read_version() -> str:
    """``__version__`` from django_xoauth2_mail/__init__.py, without importing it."""
    source = (ROOT / "django_xoauth2_mail" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", source, re.MULTILINE)
    if match is None:
        raise RuntimeError("django_xoauth2_mail/__init__.py defines no __version__ string")
    return match.group(1)


project = "django-xoauth2-mail"
author = "django-xoauth2-mail contributors"
copyright = f"{dt.date.today().year}, {author}"
release = read_version()
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.intersphinx",
]

# Intersphinx fetches the Python and Django inventories over the internet, which CI does
# not have: links to them are made on Read the Docs, or when XOAUTH2_MAIL_DOCS_INTERSPHINX
# is set. Without them, references such as :class:`django.core.mail.EmailMessage` render
# as plain code (nitpicky is off), and the build stays green offline.
if os.environ.get("XOAUTH2_MAIL_DOCS_INTERSPHINX") or os.environ.get("READTHEDOCS"):
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "django": (
            "https://docs.djangoproject.com/en/stable/",
            "https://docs.djangoproject.com/en/stable/_objects/",
        ),
    }
else:
    intersphinx_mapping = {}

nitpicky = False
exclude_patterns = ["_build", "requirements.txt"]
root_doc = "index"

html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = f"django-xoauth2-mail {release}"
