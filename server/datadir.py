# SPDX-License-Identifier: Apache-2.0
"""``cardbridge server init``: create (or complete) a data directory without destroying anything.

Layout of DIR (dirs 0700, secrets 0600)::

    server.json        settings (server.config.Settings)
    cardbridge.db      SQLite database (unless --db names another)
    softhsm2.conf      SoftHSM2 config, tokens/ its token store (unless --hsm-module)
    hsm-pin            the token's user PIN; hsm-so-pin its SO PIN (SoftHSM only)
    ca.pem             the built-in CA certificate (key in the HSM)
    tls/server.pem     TLS certificate issued by the CA; tls/server.key its key
    admin-token        the Administration API bearer token
    audit-checkpoints.jsonl  signed audit checkpoints, appended by ``server run``
                       (``Settings.audit_checkpoint_file``: point it outside DIR's host)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server import ca
from server.config import SETTINGS_FILE, Settings
from server.db import make_engine, migrate, session_factory, unit_of_work
from server.errors import Conflict, InvalidRequest
from server.hsm import Hsm, KeyRef, softhsm
from server.hsm.secrets import ServerKeys
from server.services import enrollment, tokens

CA_NAME = "cardbridge CA"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never overwrites: fails if it exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _tls_names(bind: str) -> list[str]:
    host = bind.rpartition(":")[0].strip("[]") or "localhost"
    names = list(LOCAL_NAMES)
    if host not in names and host not in ("0.0.0.0", "::"):  # noqa: S104 -- not bound here
        names.append(host)
    return names


def _settings(
    data: Path,
    db_url: str | None,
    hsm_module: str | None,
    token_label: str | None,
    hsm_pin_file: Path | None,
) -> Settings:
    if (data / SETTINGS_FILE).exists():  # an existing DIR keeps its choices
        settings = Settings.load(data)
        asked = {"db_url": db_url, "hsm_module": hsm_module, "token_label": token_label}
        for key, value in asked.items():
            if value is not None and value != getattr(settings, key):
                raise Conflict(f"{data} is already initialised with another {key}")
        return settings
    overrides: dict[str, object] = {}
    if db_url:
        overrides["db_url"] = db_url
    if token_label:
        overrides["token_label"] = token_label
    if hsm_module:
        if hsm_pin_file is None or not hsm_pin_file.is_file():
            raise InvalidRequest("--hsm-module needs an existing --hsm-pin-file")
        overrides["hsm_module"] = hsm_module
        overrides["hsm_pin_file"] = hsm_pin_file.resolve()
    else:
        overrides["softhsm_conf"] = softhsm.softhsm_conf(data).resolve()
    return Settings.for_data_dir(data, **overrides)


def _open_hsm(settings: Settings) -> Hsm:
    if settings.softhsm_conf is not None:
        pin_file = settings.hsm_pin_file
        so_pin_file = settings.data_dir / "hsm-so-pin"
        if not pin_file.exists():
            write_secret(pin_file, secrets.token_hex(16).encode())
        if not so_pin_file.exists():
            write_secret(so_pin_file, secrets.token_hex(16).encode())
        so_pin = so_pin_file.read_text().strip()
        module = softhsm.init_token(
            settings.data_dir, settings.token_label, so_pin, settings.hsm_pin()
        )
        settings.hsm_module = module
    return Hsm.open(settings.hsm_module, settings.token_label, settings.hsm_pin())


def init_data_dir(
    data_dir: Path | str,
    *,
    db_url: str | None = None,
    hsm_module: str | None = None,
    token_label: str | None = None,
    hsm_pin_file: Path | None = None,
) -> Settings:
    """Create whatever DIR lacks: settings, HSM token, the server's HSM keys, database
    (migrated), CA, TLS certificate, admin token. Idempotent: what exists is kept as it is, so
    running it on an existing directory upgrades it (keys and migrations that need the HSM).

    :param hsm_module: any PKCS#11 module; then ``token_label`` and ``hsm_pin_file`` name an
        existing token. Without it a SoftHSM2 token is created in DIR.
    """
    data = Path(data_dir).expanduser().resolve()
    _mkdir(data)
    settings = _settings(data, db_url, hsm_module, token_label, hsm_pin_file)
    settings.save()
    hsm = _open_hsm(settings)
    try:
        keys = ServerKeys.ensure(hsm)
        migrate(settings.db_url, keys=keys)
        if settings.ca_key_id is None or not settings.ca_cert.exists():
            ca_ref, ca_cert = ca.create_ca(hsm, CA_NAME)
            settings.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
            settings.ca_key_id, settings.ca_key_alg = ca_ref.key_id, str(ca_ref.alg)
            settings.save()
        else:
            ca_ref, ca_cert = enrollment.load_ca(settings)
        if not (settings.tls_cert.exists() and settings.tls_key.exists()):
            _issue_tls(settings, hsm, ca_ref, ca_cert)
        settings.save()
        if not settings.admin_token_file.exists():
            _create_admin_token(settings, keys)
    finally:
        hsm.close()
    return settings


def _issue_tls(settings: Settings, hsm: Hsm, ca_ref: KeyRef, ca_cert: x509.Certificate) -> None:
    _mkdir(settings.tls_cert.parent)
    _mkdir(settings.tls_key.parent)
    cert, key_pem = ca.issue_tls_cert(hsm, ca_ref, ca_cert, _tls_names(settings.bind))
    settings.tls_key.unlink(missing_ok=True)  # a lone key without its certificate is useless
    write_secret(settings.tls_key, key_pem)
    settings.tls_cert.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )


def _create_admin_token(settings: Settings, keys: ServerKeys) -> None:
    engine = make_engine(settings.db_url)
    try:
        with unit_of_work(session_factory(engine, keys)()) as session:
            token = tokens.create_admin_token(session, actor="server-init")
        write_secret(settings.admin_token_file, (token + "\n").encode())
    finally:
        engine.dispose()
