"""Getting a grant: state and PKCE, the CLI's loopback, paste and device flows, and saving
the result as a Mailbox. The admin's views and ``connect_mailbox`` drive it."""
