"""Signals sent while mail goes out and tokens change.

Each signal's ``sender`` is the class named in its comment; receivers get the
keyword arguments listed. No argument ever carries a token.
"""

from django.dispatch import Signal

# Sent by EmailBackend before a message is handed to the SMTP server.
# Arguments: message (the EmailMessage), mailbox (the Mailbox).
# An exception raised by a receiver fails that message (it is reported like an
# SMTP refusal) without stopping the rest of the batch.
pre_send = Signal()

# Sent by EmailBackend after each message was handled.
# Arguments: message, mailbox, sent (bool), error (str or None),
# refused_recipients (dict address -> (code, reply)), undetermined (bool).
# From TaskEmailBackend's workers the sender is OutboxMessage, ``message`` is the
# message as sent (an email.message.EmailMessage parsed from the stored bytes), and
# an extra argument, outbox_message, is the OutboxMessage row.
post_send = Signal()

# Sent by the Mailbox class after a new access token was saved.
# Arguments: mailbox (the Mailbox), expires_at (aware datetime),
# refresh_token_rotated (bool).
token_refreshed = Signal()

# Sent by the Mailbox class when the provider refused the grant for good.
# Arguments: mailbox (the Mailbox, already saved with status
# "reconnect_required"), error (the provider's error text).
mailbox_reconnect_required = Signal()
