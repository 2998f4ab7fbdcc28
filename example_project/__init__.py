"""A small Django site that sends its mail through django_xoauth2_mail (see docs/demo.rst)."""
