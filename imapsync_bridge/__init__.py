"""imapsync-bridge: keep a corporate IMAP inbox and a hosted phone mailbox in step."""

__version__ = "0.1.0"  # the one place the version is written (setup.cfg reads it)
