# SPDX-License-Identifier: Apache-2.0
"""``server init``'s and ``server join``'s data directory: layout, modes, paths relative to
it, re-running destroys nothing, and a database holds one deployment.

SoftHSM2 reads SOFTHSM2_CONF once per process, so each init runs in a fresh interpreter (as
the CLI does) instead of inside the test process, which already uses the shared test token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from sqlalchemy import update

from server.config import Settings
from server.db import make_engine, migrate, session_factory, unit_of_work
from server.hsm.secrets import ServerKeys
from server.hsm.softhsm import SOFTHSM_MODULE
from server.models import Deployment
from server.services import deployment, tokens

SECRETS = ("hsm-pin", "hsm-so-pin", "admin-token", "tls/server.key", "server.json")


def _run(function: str, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
    code = (
        f"import sys; from pathlib import Path; from server.datadir import {function}; "
        f"{function}(sys.argv[1]{''.join(', ' + a for a in args)})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(data)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr


def init(data: Path, *args: str) -> None:
    _run("init_data_dir", data, *args)


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


def test_settings_store_paths_relative_to_the_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Settings.for_data_dir(data, hsm_pin_file="/etc/cardbridge/hsm-pin",
                          softhsm_conf=data / "softhsm2.conf").save()  # fmt: skip
    raw = json.loads((data / "server.json").read_text())
    assert raw["db_url"] == "sqlite:///cardbridge.db"
    assert (raw["tls_cert"], raw["tls_key"], raw["ca_cert"], raw["admin_token_file"]) == (
        "tls/server.pem", "tls/server.key", "ca.pem", "admin-token"
    )  # fmt: skip
    assert raw["softhsm_conf"] == "softhsm2.conf"
    assert raw["hsm_pin_file"] == "/etc/cardbridge/hsm-pin"  # outside: kept absolute
    assert raw["node_name"] == socket.gethostname()

    moved = tmp_path / "moved"
    shutil.move(data, moved)
    settings = Settings.load(moved)
    here = moved.resolve()
    assert settings.db_url == f"sqlite:///{here / 'cardbridge.db'}"
    assert settings.tls_key == here / "tls" / "server.key"
    assert settings.softhsm_conf == here / "softhsm2.conf"
    assert settings.hsm_pin_file == Path("/etc/cardbridge/hsm-pin")


def test_settings_written_with_absolute_paths_still_load(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "server.json").write_text(json.dumps({
        "db_url": f"sqlite:///{old / 'cardbridge.db'}", "hsm_pin_file": str(old / "hsm-pin"),
        "tls_cert": str(old / "tls/server.pem"), "tls_key": str(old / "tls/server.key"),
        "ca_cert": str(old / "ca.pem"), "admin_token_file": str(old / "admin-token"),
    }))  # fmt: skip
    settings = Settings.load(old)
    assert settings.ca_cert == old / "ca.pem" and settings.db_url.endswith(f"{old}/cardbridge.db")
    settings.save()  # what server init does on an old directory: the paths become relative
    raw = json.loads((old / "server.json").read_text())
    assert raw["ca_cert"] == "ca.pem" and raw["db_url"] == "sqlite:///cardbridge.db"


@pytest.mark.hsm
def test_init_refuses_a_database_in_use_without_a_recorded_deployment(
    tmp_path: Path, server_keys: ServerKeys
) -> None:
    """A deployment set up before deployments were recorded: its audit log is not empty."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url)
    engine = make_engine(url)
    with unit_of_work(session_factory(engine, server_keys)()) as s:
        tokens.create_admin_token(s)
    engine.dispose()
    with pytest.raises(AssertionError, match="cardbridge server join"):
        init(tmp_path / "new", f"db_url={url!r}")
    assert not (tmp_path / "new").exists()


@pytest.mark.hsm
def test_a_database_holds_one_deployment_and_join_adds_nodes_to_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = tmp_path / "a", tmp_path / "b"
    init(a, f"db_url={url!r}")
    with pytest.raises(AssertionError, match="cardbridge server join"):
        init(b, f"db_url={url!r}")
    assert not b.exists()

    # Node B reaches node A's SoftHSM2 token through the module and its configuration.
    join = (f"db_url={url!r}", f"hsm_module={SOFTHSM_MODULE!r}",
            f"hsm_pin_file=Path({str(a / 'hsm-pin')!r})", "node_name='node-b'",
            "public_url='https://sign.example.test:9443'")  # fmt: skip
    env = {"SOFTHSM2_CONF": str(a / "softhsm2.conf")}
    _run("join_data_dir", b, *join, env=env)
    assert (b / "ca.pem").read_bytes() == (a / "ca.pem").read_bytes()
    assert not (b / "admin-token").exists() and not (b / "tokens").exists()
    tls = x509.load_pem_x509_certificate((b / "tls/server.pem").read_bytes())
    tls.verify_directly_issued_by(x509.load_pem_x509_certificate((a / "ca.pem").read_bytes()))
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"sign.example.test", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert stat.S_IMODE((b / "tls/server.key").stat().st_mode) == 0o600
    settings_a, settings_b = Settings.load(a), Settings.load(b)
    assert (settings_b.ca_key_id, settings_b.node_name) == (settings_a.ca_key_id, "node-b")
    assert settings_b.db_url == settings_a.db_url and settings_b.softhsm_conf is None
    raw = json.loads((b / "server.json").read_text())
    assert raw["tls_cert"] == "tls/server.pem" and raw["hsm_pin_file"] == str(a / "hsm-pin")

    before = snapshot(b)
    _run("join_data_dir", b, *join, env=env)  # re-run: nothing is replaced
    assert snapshot(b) == before
    out = in_data_dir(a, """
import json
with session_factory(engine, ServerKeys.load(hsm))() as s:
    assert audit.verify(s) is None
    print(json.dumps([(r["event"], r["details"].get("node")) for r in audit.export(s)]))
""")
    events = [tuple(e) for e in json.loads(out)]
    assert events.count(("server.join", "node-b")) == 1
    assert [e for e in events if e[0] == "server.init" and e[1]] == [
        ("server.init", settings_a.node_name)
    ]


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
from server.services import deployment, otp
keys = ServerKeys.load(hsm)
with session_factory(engine, keys)() as s:
    assert audit.verify(s) is None
    row = deployment.find(s)  # the deployment, recorded again, got a TSA
    assert row is not None and row.tsa_key_id and row.tsa_cert_pem
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


@pytest.mark.hsm
def test_init_gives_the_deployment_a_tsa_and_an_upgrade_gets_one(tmp_path: Path) -> None:
    data = tmp_path / "srv"
    init(data, "public_url='https://sign.example.org:9443'")
    settings = Settings.load(data)
    ca_cert = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    engine = make_engine(settings.db_url)
    try:
        with session_factory(engine)() as s:
            row = deployment.find(s)
            assert row is not None and row.tsa_key_id and row.tsa_cert_pem
            first = row.tsa_key_id
            tsa_cert = x509.load_pem_x509_certificate(row.tsa_cert_pem.encode())
        tsa_cert.verify_directly_issued_by(ca_cert)
        eku = tsa_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
        # Issued certificates name the CRL and the CA certificate under the public URL.
        tls = x509.load_pem_x509_certificate((data / "tls/server.pem").read_bytes())
        for cert in (tsa_cert, tls):
            (point,) = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
            assert [n.value for n in point.full_name or []] == ["https://sign.example.org:9443/crl"]

        init(data)  # re-run: the TSA is kept
        with session_factory(engine)() as s:
            assert (row := deployment.find(s)) is not None and row.tsa_key_id == first

        # A deployment set up before timestamps existed gets its TSA from the upgrade.
        with unit_of_work(session_factory(engine)()) as s:
            s.execute(update(Deployment).values(tsa_key_id=None, tsa_key_alg=None,
                                                tsa_cert_pem=None))  # fmt: skip
        init(data)
        with session_factory(engine)() as s:
            row = deployment.find(s)
            assert row is not None and row.tsa_key_id not in (None, first)
    finally:
        engine.dispose()
    # Both TSA keys were audited, MACed with the server's HSM audit key like every record.
    checked = in_data_dir(data, """
with session_factory(engine, ServerKeys.load(hsm))() as s:
    assert audit.verify(s) is None
    print([r["event"] for r in audit.export(s)].count("tsa.key"))
""")
    assert checked == "2\n"


def test_the_base_url_is_the_public_url_else_the_bind_address(tmp_path: Path) -> None:
    assert Settings.for_data_dir(tmp_path).base_url == "https://127.0.0.1:8443"
    assert Settings.for_data_dir(tmp_path, bind="0.0.0.0:9000").base_url == (  # noqa: S104
        "https://127.0.0.1:9000"
    )
    assert Settings.for_data_dir(tmp_path, bind="[::]:9000").base_url == "https://[::1]:9000"
    public = Settings.for_data_dir(tmp_path, public_url="https://lb.example/")
    assert public.base_url == "https://lb.example"
