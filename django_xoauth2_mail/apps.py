from django.apps import AppConfig


class XOAuth2MailConfig(AppConfig):
    name = "django_xoauth2_mail"
    verbose_name = "XOAUTH2 mail"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks (xoauth2_mail.E001 ...).
        from django_xoauth2_mail import checks, setup_checks  # noqa: F401
