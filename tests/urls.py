from django.conf import settings
from django.contrib import admin
from django.core import mail
from django.http import HttpRequest, HttpResponse
from django.urls import path


def boom(request: HttpRequest) -> HttpResponse:
    """A view that fails: Django mails the report to ADMINS (AdminEmailHandler)."""
    raise RuntimeError("boom")


async def send_from_async_view(request: HttpRequest) -> HttpResponse:
    """send_mail() called from an async view, as sites do (it blocks, by its contract)."""
    sent = mail.send_mail(
        "From an async view", "Body", settings.DEFAULT_FROM_EMAIL, ["to@example.org"]
    )
    return HttpResponse(str(sent))


urlpatterns = [
    path("admin/", admin.site.urls),
    path("boom/", boom),
    path("send-from-async-view/", send_from_async_view),
]
