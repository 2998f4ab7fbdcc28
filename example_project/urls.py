from django.contrib import admin
from django.urls import include, path

from example_project import views

urlpatterns = [
    path("", views.send_message, name="home"),
    # Django's own password reset views: their email goes out through the backend too.
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
]
