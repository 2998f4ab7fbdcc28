"""The wire: SMTP sessions, pipelined transactions, the process-wide mail loop, keep-alive
and rate limits. Nothing here knows Django's backend API; ``backends`` drives it."""
