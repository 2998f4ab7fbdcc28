from django.conf import settings
from django.contrib import messages
from django.core.mail import send_mail
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from django_xoauth2_mail.exceptions import XOAuth2MailError
from django_xoauth2_mail.models import Mailbox
from example_project.forms import MessageForm


def send_message(request: HttpRequest) -> HttpResponse:
    """A form that sends one message with send_mail(), from DEFAULT_FROM_EMAIL."""
    form = MessageForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            sent = send_mail(data["subject"], data["body"], None, [data["to"]])
        except XOAuth2MailError as error:
            # The package's errors say what to do (connect a mailbox, reconnect, retry).
            messages.error(request, str(error))
        else:
            messages.success(
                request, f"Sent {sent} message from {settings.DEFAULT_FROM_EMAIL} to {data['to']}."
            )
            return redirect("home")
    context = {
        "form": form,
        "from_email": settings.DEFAULT_FROM_EMAIL,
        "mailboxes": Mailbox.objects.all(),
    }
    return render(request, "example/home.html", context)
