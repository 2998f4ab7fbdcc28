from django import forms


class MessageForm(forms.Form):
    to = forms.EmailField(label="To", initial="someone@example.com")
    subject = forms.CharField(max_length=200, initial="Hello over XOAUTH2")
    body = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6}),
        initial="Sent by send_mail() through django_xoauth2_mail.",
    )
