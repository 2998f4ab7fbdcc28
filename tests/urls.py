from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import path


def boom(request: HttpRequest) -> HttpResponse:
    """A view that fails: Django mails the report to ADMINS (AdminEmailHandler)."""
    raise RuntimeError("boom")


urlpatterns = [
    path("admin/", admin.site.urls),
    path("boom/", boom),
]
