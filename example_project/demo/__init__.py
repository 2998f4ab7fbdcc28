"""The end-to-end demo that ``scripts/demo`` runs (``python -m example_project.demo``).

It drives the example project the way a person would, one ``manage.py`` command at a time:
migrate, start ``xoauth2_devserver``, ``connect_mailbox dev`` through the real consent
flow, send with ``send_mail()``, wait for the access token to expire, send again. Every
process it starts is stopped when it ends, however it ends. Standard library plus
requests (a dependency of the package) only.
"""
