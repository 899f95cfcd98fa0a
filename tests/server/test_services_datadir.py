# SPDX-License-Identifier: Apache-2.0
"""``server init``'s data directory: layout, modes, and re-running destroys nothing.

SoftHSM2 reads SOFTHSM2_CONF once per process, so each init runs in a fresh interpreter (as
the CLI does) instead of inside the test process, which already uses the shared test token.
"""

from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from server.config import Settings

SECRETS = ("hsm-pin", "hsm-so-pin", "admin-token", "tls/server.key", "server.json")


def init(data: Path, *args: str) -> None:
    code = (
        "import sys; from server.datadir import init_data_dir; "
        f"init_data_dir(sys.argv[1]{''.join(', ' + a for a in args)})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(data)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def in_data_dir(data: Path, code: str) -> str:
    """Run ``code`` in a fresh interpreter with ``data``'s HSM (``hsm``) and database
    (``engine``) open; returns its stdout."""
    prelude = (
        "import os, sys; from pathlib import Path\n"
        "from server.config import Settings\n"
        "from server.db import make_engine, session_factory\n"
        "from server.hsm import Hsm\n"
        "from server.hsm.secrets import ServerKeys\n"
        "from server.services import audit, tokens\n"
        "data = Path(sys.argv[1]); settings = Settings.load(data)\n"
        "os.environ['SOFTHSM2_CONF'] = str(settings.softhsm_conf)\n"
        "hsm = Hsm.open(settings.hsm_module, settings.token_label, settings.hsm_pin())\n"
        "engine = make_engine(settings.db_url)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code, str(data)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def snapshot(data: Path) -> dict[str, str]:
    return {
        str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data.rglob("*"))
        if p.is_file()
        and p.suffix not in (".db-wal", ".db-shm")
        and "tokens" not in p.parts
        and p.name != "cardbridge.db"
    }


@pytest.mark.hsm
def test_init_creates_everything_once(tmp_path: Path) -> None:
    data = tmp_path / "srv"
    init(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "tls").stat().st_mode) == 0o700
    for rel in SECRETS:
        assert stat.S_IMODE((data / rel).stat().st_mode) == 0o600, rel
    for rel in ("cardbridge.db", "softhsm2.conf", "ca.pem", "tls/server.pem"):
        assert (data / rel).is_file(), rel
    assert any((data / "tokens").iterdir())

    settings = Settings.load(data)
    assert settings.db_url == f"sqlite:///{data.resolve() / 'cardbridge.db'}"
    assert settings.ca_key_id and settings.ca_key_alg == "p256"
    ca_cert = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    tls = x509.load_pem_x509_certificate((data / "tls/server.pem").read_bytes())
    tls.verify_directly_issued_by(ca_cert)
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)

    assert stat.S_IMODE((data / "cardbridge.db").stat().st_mode) == 0o600
    # The data directory's own token (this process uses the shared test token): its server
    # keys exist, the admin token works and the audit chain verifies with its MACs.
    checked = in_data_dir(data, """
token = (data / "admin-token").read_text().strip()
with session_factory(engine, ServerKeys.load(hsm))() as s:
    assert tokens.authenticate(s, token).kind == "admin"
    assert audit.verify(s) is None
    assert token not in str(list(audit.export(s)))
print("checked")
""")
    assert checked == "checked\n"

    before = snapshot(data)
    init(data)  # re-run: nothing is replaced
    assert snapshot(data) == before
    with pytest.raises(AssertionError, match="already initialised with another db_url"):
        init(data, "db_url='sqlite:////tmp/elsewhere.db'")
    assert snapshot(data) == before

    (data / "admin-token").unlink()  # a lost piece is recreated, the rest kept
    (data / "tls" / "server.pem").unlink()
    init(data)
    after = snapshot(data)
    assert after["ca.pem"] == before["ca.pem"] and after["hsm-pin"] == before["hsm-pin"]
    assert after["admin-token"] != before["admin-token"]
    assert stat.S_IMODE((data / "admin-token").stat().st_mode) == 0o600


@pytest.mark.hsm
def test_init_upgrades_a_data_directory_of_the_previous_release(tmp_path: Path) -> None:
    """A data directory from before the server keys: its token lacks them, its database is at
    revision 0002 with an audit chain and a clear TOTP seed. ``server init`` creates the keys
    (sensitive, never extractable), seals the seed, MACs the chain; ``ServerKeys.load`` (what a
    server process does) failed before and works after."""
    data = tmp_path / "old"
    init(data)
    in_data_dir(data, """
import pkcs11
from alembic import command
from sqlalchemy import text
from server.db import alembic_config
from server.hsm.secrets import KEYS
command.downgrade(alembic_config(settings.db_url), "0002")
with engine.begin() as c:
    c.execute(text("INSERT INTO users (id, name, disabled, created_at, pin_retries, puk_retries, "
                   "otp_failures, otp_secret) VALUES (5, 'old', 0, '2025-01-01 00:00:00', 0, 0, "
                   "0, 'JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP')"))
hsm.close()
token = pkcs11.lib(settings.hsm_module).get_token(token_label=settings.token_label)
with token.open(rw=True, user_pin=settings.hsm_pin()) as s:
    for label in KEYS:
        for obj in s.get_objects({pkcs11.Attribute.LABEL: label}):
            obj.destroy()
""")
    refused = subprocess.run(
        [sys.executable, "-c", "import sys; from server.app import create_app; "
         "from fastapi.testclient import TestClient; from server.config import Settings; "
         "TestClient(create_app(Settings.load(sys.argv[1]))).__enter__()", str(data)],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert refused.returncode != 0 and "run `cardbridge server init`" in refused.stderr
    init(data)
    checked = in_data_dir(data, """
import pkcs11
from server.hsm.secrets import KEYS
from server.models import User
from server.services import otp
keys = ServerKeys.load(hsm)
with session_factory(engine, keys)() as s:
    assert audit.verify(s) is None
    user = s.get(User, 5)
    assert otp.open_seed(keys, 5, user.otp_seed) == 'JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP'
hsm.close()
token = pkcs11.lib(settings.hsm_module).get_token(token_label=settings.token_label)
with token.open(user_pin=settings.hsm_pin()) as s:
    for label in KEYS:
        (key,) = s.get_objects({pkcs11.Attribute.LABEL: label})
        assert key[pkcs11.Attribute.SENSITIVE] and not key[pkcs11.Attribute.EXTRACTABLE]
print("upgraded")
""")
    assert checked == "upgraded\n"
