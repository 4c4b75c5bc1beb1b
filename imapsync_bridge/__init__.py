"""imapsync-bridge: keep a corporate IMAP inbox and a hosted phone mailbox in step."""
