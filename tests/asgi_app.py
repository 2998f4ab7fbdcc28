"""The ASGI application the uvicorn test serves: an async view that calls send_mail().

Its settings module is written by the test (tests/test_asgi_postgres.py)."""

from django.core.asgi import get_asgi_application

application = get_asgi_application()
