# SPDX-License-Identifier: Apache-2.0
"""The enrolled card's configuration on this workstation, and where the running card listens.

``cardbridge card enroll`` writes, in the user's config directory (platformdirs; a directory
named by ``--config`` or ``$CARDBRIDGE_CONFIG`` instead)::

    card.json       servers, the pinned CA, the user, the device id, the credentials with
                    their certificates, the card's GUID and management key          (0600)
    device-key.pem  the device key whose DPoP proofs go with every request          (0600)

The directory is 0700 and every write is atomic (a temporary sibling, fsync, rename), so a
crash never leaves half a configuration. Nothing here is a session: tokens live only in the
running card's memory.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import platformdirs
import typer

from relay.dpop import DeviceKey

APP: Final = "cardbridge"
CONFIG_ENV: Final = "CARDBRIDGE_CONFIG"
RUNTIME_ENV: Final = "CARDBRIDGE_RUNTIME_DIR"
CARD_FILE: Final = "card.json"
DEVICE_KEY_FILE: Final = "device-key.pem"
CONTROL_SOCKET: Final = "control.sock"
FORMAT: Final = "cardbridge-remote-card"
FORMAT_VERSION: Final = 1


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="DIR",
        envvar=CONFIG_ENV,
        help="The card's configuration directory (default: the user's config directory).",
        file_okay=False,
    ),
]
"""``--config DIR``, for every command that reads the stored configuration."""


class NotEnrolled(FileNotFoundError):
    """No card is enrolled in the configuration directory."""


def config_dir(override: Path | str | None = None) -> Path:
    """The configuration directory: ``override``, ``$CARDBRIDGE_CONFIG``, or platformdirs'."""
    chosen = override or os.environ.get(CONFIG_ENV)
    return Path(chosen) if chosen else Path(platformdirs.user_config_dir(APP))


def runtime_dir(override: Path | str | None = None) -> Path:
    """Where the running card's control socket lives: ``override``, ``$CARDBRIDGE_RUNTIME_DIR``,
    ``$XDG_RUNTIME_DIR/cardbridge``, else a per-user directory under the temporary directory."""
    chosen = override or os.environ.get(RUNTIME_ENV)
    if chosen:
        return Path(chosen)
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(platformdirs.user_runtime_dir(APP))
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"{APP}-{os.getuid()}"  # noqa: S108


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as a 0700 directory owned by this user.

    :raises PermissionError: it exists but belongs to someone else or others may enter it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (a temporary sibling, synced, then renamed), with
    ``mode`` (0600 unless the caller publishes the file, as a signed document is)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class CredentialInfo:
    """One of the user's keys as the server described it at enrollment."""

    slot: str
    """``9a``, ``9c``, ``9d`` or ``9e``."""
    credential_id: str
    alg: str
    """The server's name: ``p256``, ``p384``, ``rsa2048`` ... ``ed25519``."""
    certificate: str
    """PEM."""
    pin_always: bool
    otp_per_signature: bool


@dataclass
class CardConfig:
    """What ``card enroll`` stored: enough to present the card and reach the server."""

    servers: list[str]
    ca_pem: str
    ca_pin: str
    """base64url SHA-256 of the CA certificate, as the enrollment code carried it."""
    user: str
    device_id: str
    credentials: list[CredentialInfo]
    card_guid: str = field(default_factory=lambda: secrets.token_hex(16))
    """The card's GUID (CHUID), hex: stable, as Windows and macOS cache it."""
    management_key: str = field(default_factory=lambda: secrets.token_hex(32))
    """The 9B key (AES-256, hex): random, so nobody can use a well-known default on it."""

    def credential(self, slot: str) -> CredentialInfo | None:
        """The credential in ``slot``, if any."""
        return next((c for c in self.credentials if c.slot == slot), None)

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CardConfig:
        """:raises ValueError: not a card configuration of this version."""
        if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
            raise ValueError("not a cardbridge card configuration (or another version)")
        fields = {k: v for k, v in raw.items() if k not in ("format", "version")}
        try:
            fields["credentials"] = [CredentialInfo(**c) for c in fields["credentials"]]
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed card configuration: {e}") from e


@dataclass(frozen=True)
class Enrolled:
    """An enrolled card: its configuration and its device key."""

    directory: Path
    config: CardConfig
    device: DeviceKey

    @classmethod
    def load(cls, directory: Path) -> Enrolled:
        """Read the configuration of ``directory``.

        :raises NotEnrolled: nothing is enrolled there.
        :raises ValueError: the files are damaged.
        """
        card = directory / CARD_FILE
        if not card.exists():
            raise NotEnrolled(
                f"no card is enrolled in {directory}: run `cardbridge card enroll`"
            )
        try:
            config = CardConfig.from_dict(json.loads(card.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{card} is not valid JSON: {e}") from e
        device = DeviceKey.from_pem((directory / DEVICE_KEY_FILE).read_bytes())
        return cls(directory, config, device)

    def save(self) -> None:
        """Write both files (device key first: a card.json never names a missing key)."""
        private_dir(self.directory)
        write_atomic(self.directory / DEVICE_KEY_FILE, self.device.private_pem())
        self.save_config()

    def save_config(self) -> None:
        """Write ``card.json`` alone (the management key changed)."""
        data = json.dumps(self.config.as_dict(), indent=2, sort_keys=True) + "\n"
        write_atomic(self.directory / CARD_FILE, data.encode())
