"""A keyring backend keeping secrets in one JSON file (``$TEST_KEYRING_FILE``, 0600).

This machine has no desktop keyring (FACTS.md: keyring falls back to its fail backend).
A process started with ``PYTHON_KEYRING_BACKEND=file_keyring.FileKeyring`` (and this
folder on PYTHONPATH) uses this one through keyring's own backend API, as a desktop
session would use its Secret Service. It is only loaded when named: installing it
changes no other test's keyring. A test may also set it in-process
(``keyring.set_keyring(FileKeyring())``); without ``$TEST_KEYRING_FILE`` the class is not
viable, so keyring never picks it as a default just because it was imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaraco.classes import properties
from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError


class FileKeyring(KeyringBackend):
    @properties.classproperty
    def priority(cls) -> float:
        if "TEST_KEYRING_FILE" not in os.environ:
            raise RuntimeError("TEST_KEYRING_FILE names no file")
        return 1

    @property
    def path(self) -> Path:
        return Path(os.environ["TEST_KEYRING_FILE"])

    def _all(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return {}

    def _write(self, secrets: dict[str, str]) -> None:
        self.path.touch(mode=0o600)
        self.path.write_text(json.dumps(secrets))

    def get_password(self, service: str, username: str) -> str | None:
        return self._all().get(f"{service}/{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        self._write(self._all() | {f"{service}/{username}": password})

    def delete_password(self, service: str, username: str) -> None:
        secrets = self._all()
        if secrets.pop(f"{service}/{username}", None) is None:
            raise PasswordDeleteError(username)
        self._write(secrets)
