# SPDX-License-Identifier: Apache-2.0
"""``cardbridge server init`` and ``server join``: create (or complete) a data directory without
destroying anything.

``init`` sets up a deployment: its CA, recorded in the database (:mod:`server.services.deployment`)
and refused on a database that already holds one. ``join`` adds a node to an existing
deployment: the data directory of a node that reaches the same database and HSM token.

Layout of DIR (dirs 0700, secrets 0600; a joined node has no admin token and no HSM token of
its own)::

    server.json        settings (server.config.Settings)
    cardbridge.db      SQLite database (unless --db names another)
    softhsm2.conf      SoftHSM2 config, tokens/ its token store (unless --hsm-module)
    hsm-pin            the token's user PIN; hsm-so-pin its SO PIN (SoftHSM only)
    ca.pem             the built-in CA certificate (key in the HSM)
    tls/server.pem     TLS certificate issued by the CA; tls/server.key its key
    admin-token        the Administration API bearer token
    metrics-token      this node's bearer token for GET /metrics (the admin token reads it too)
    audit-checkpoints.jsonl  signed audit checkpoints, appended by ``server run``
                       (``Settings.audit_checkpoint_file``: point it outside DIR's host)
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import inspect, make_url
from sqlalchemy.orm import Session

from server import ca
from server.config import SETTINGS_FILE, Settings
from server.db import make_engine, migrate, session_factory, unit_of_work
from server.errors import Conflict, InvalidRequest, NotFound
from server.hsm import Hsm, KeyRef, softhsm
from server.hsm.secrets import ServerKeys
from server.models import Deployment
from server.services import deployment, enrollment, tokens, tsa
from server.services.hashing import new_token

CA_NAME = "cardbridge CA"
TSA_LABEL = "cardbridge/tsa"
"""Label prefix of the time-stamping authority's key on the token."""
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never overwrites: fails if it exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _tls_names(bind: str, public_url: str | None) -> list[str]:
    """The names of a node's TLS certificate: loopback, the bound host, the public URL's host
    (a load balancer that passes TLS through to the nodes)."""
    hosts = [bind.rpartition(":")[0].strip("[]") or "localhost"]
    if public_url is not None:
        hosts.append(urlsplit(public_url).hostname or "")
    names = list(LOCAL_NAMES)
    for host in hosts:
        if host not in names and host not in ("0.0.0.0", "::"):  # noqa: S104 -- not bound here
            names.append(host)
    return names


def _settings(
    data: Path,
    db_url: str | None,
    hsm_module: str | None,
    token_label: str | None,
    hsm_pin_file: Path | None,
    *,
    public_url: str | None = None,
    node_name: str | None = None,
) -> Settings:
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme != "https" or not parts.hostname:
            raise InvalidRequest(f"--public-url wants https://HOST[:PORT], got {public_url!r}")
    asked = {
        "db_url": db_url,
        "hsm_module": hsm_module,
        "token_label": token_label,
        "public_url": public_url,
        "node_name": node_name,
    }
    if (data / SETTINGS_FILE).exists():  # an existing DIR keeps its choices
        settings = Settings.load(data)
        for key, value in asked.items():
            if value is not None and value != getattr(settings, key):
                raise Conflict(f"{data} is already initialised with another {key}")
        return settings
    overrides: dict[str, object] = {
        k: v for k, v in asked.items() if v is not None and k != "hsm_module"
    }
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


@contextmanager
def _database(db_url: str, keys: ServerKeys | None = None) -> Iterator[Session]:
    """One unit of work on ``db_url``, on an engine of its own, with the server's HSM keys."""
    engine = make_engine(db_url)
    try:
        with unit_of_work(session_factory(engine, keys)()) as session:
            yield session
    finally:
        engine.dispose()


def _deployment(db_url: str) -> tuple[Deployment | None, bool]:
    """The database's deployment row, and whether the database holds a deployment's records
    (read before any migration: a database made by an older release may have no row yet)."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        return None, False  # a new SQLite file: no deployment, and nothing to create yet
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if "audit_head" not in tables:
        return None, False
    with _database(db_url) as session:
        found = deployment.find(session) if "deployment" in tables else None
        return found, deployment.in_use(session)


def init_data_dir(
    data_dir: Path | str,
    *,
    db_url: str | None = None,
    hsm_module: str | None = None,
    token_label: str | None = None,
    hsm_pin_file: Path | None = None,
    public_url: str | None = None,
    node_name: str | None = None,
) -> Settings:
    """Create whatever DIR lacks: settings, HSM token, the server's HSM keys, database
    (migrated), CA (recorded as the database's deployment), TLS certificate, the time-stamping
    authority (recorded with the deployment), admin token. Idempotent: what exists is kept as
    it is, so running it on an existing directory upgrades it (keys, migrations that need the
    HSM, a TSA for a deployment set up before timestamps).

    :param hsm_module: any PKCS#11 module; then ``token_label`` and ``hsm_pin_file`` name an
        existing token. Without it a SoftHSM2 token is created in DIR.
    :raises Conflict: the database already holds a deployment that is not this DIR's (nothing
        is written then: ``server join`` adds a node to it).
    """
    data = Path(data_dir).expanduser().resolve()
    settings = _settings(
        data, db_url, hsm_module, token_label, hsm_pin_file,
        public_url=public_url, node_name=node_name,
    )  # fmt: skip
    row, in_use = _deployment(settings.db_url)
    if (row is None and in_use and settings.ca_key_id is None) or (
        row is not None and row.ca_key_id != settings.ca_key_id
    ):
        raise Conflict(deployment.FORK_REFUSED)
    _mkdir(data)
    settings.save()
    hsm = _open_hsm(settings)
    try:
        keys = ServerKeys.ensure(hsm)
        migrate(settings.db_url, keys=keys)
        if row is not None:  # this DIR set the deployment up
            ca_ref, ca_cert = deployment.ca_of(row)
        elif settings.ca_key_id is None or not settings.ca_cert.exists():
            ca_ref, ca_cert = ca.create_ca(hsm, CA_NAME)
            _record(settings, hsm, keys, ca_ref, ca_cert)
        else:  # set up before deployments were recorded
            ca_ref, ca_cert = enrollment.load_ca(settings)
            _record(settings, hsm, keys, ca_ref, ca_cert)
        _write_ca(settings, ca_ref, ca_cert)
        if not (settings.tls_cert.exists() and settings.tls_key.exists()):
            _issue_tls(settings, hsm, ca_ref, ca_cert)
        _ensure_tsa(settings, hsm, keys, ca_ref, ca_cert)
        if not settings.admin_token_file.exists():
            _create_admin_token(settings, keys)
        _create_metrics_token(settings)
    finally:
        hsm.close()
    return settings


def _record(
    settings: Settings, hsm: Hsm, keys: ServerKeys, ca_ref: KeyRef, ca_cert: x509.Certificate
) -> None:
    """Record the deployment; a CA key made for a deployment that lost the race is destroyed."""
    try:
        with _database(settings.db_url, keys) as session:
            deployment.record(
                session, ca_ref, ca_cert, settings.token_label, node=settings.node_name
            )
    except Conflict:
        if settings.ca_key_id != ca_ref.key_id:
            hsm.destroy_key(ca_ref)
        raise


def _ensure_tsa(
    settings: Settings, hsm: Hsm, keys: ServerKeys, ca_ref: KeyRef, ca_cert: x509.Certificate
) -> None:
    """Give the deployment its time-stamping authority (RFC 3161) if it has none yet: a key
    generated in the HSM (labelled beside the server keys of :mod:`server.hsm.secrets`) and a
    certificate from the CA, recorded with the deployment so that every node serves ``/tsa``
    with it. A deployment set up before timestamps gets it when ``server init`` runs on its
    data directory again (the upgrade); ``server join`` never makes one. Its audit record is
    MACed with the server keys like every other; a key made for a deployment that got its TSA
    meanwhile is destroyed."""
    with _database(settings.db_url, keys) as session:
        row = deployment.find(session)
        if row is None or row.tsa_key_id is not None:
            return
    ref = hsm.generate_key(tsa.KEY_ALG, f"{TSA_LABEL}/{secrets.token_hex(8)}", sign_only=True)
    try:
        cert = ca.issue_tsa_cert(
            hsm, ca_ref, ca_cert, hsm.public_key(ref), base_url=settings.base_url
        )
        with _database(settings.db_url, keys) as session:
            deployment.record_tsa(session, row, ref, cert, node=settings.node_name)
    except Conflict:
        hsm.destroy_key(ref)  # another init gave it one: that one stays
    except BaseException:
        hsm.destroy_key(ref)
        raise


def _write_ca(settings: Settings, ca_ref: KeyRef, ca_cert: x509.Certificate) -> None:
    settings.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    settings.ca_key_id, settings.ca_key_alg = ca_ref.key_id, str(ca_ref.alg)
    settings.save()


def join_data_dir(
    data_dir: Path | str,
    *,
    db_url: str,
    hsm_module: str,
    hsm_pin_file: Path,
    token_label: str | None = None,
    public_url: str | None = None,
    node_name: str | None = None,
) -> Settings:
    """Add a node to the deployment recorded in ``db_url``: check that the token holds the
    deployment's CA key, then write DIR (settings with relative paths, the CA certificate, this
    node's own TLS certificate issued by the CA, its metrics token). No HSM token, CA or admin
    token is created.
    Idempotent like :func:`init_data_dir`.

    :param token_label: the token's label; by default the deployment's.
    :raises NotFound: the database holds no deployment (``server init`` first).
    :raises Conflict: the token lacks the CA key, or DIR belongs to another deployment.
    """
    data = Path(data_dir).expanduser().resolve()
    migrate(db_url)
    row, _ = _deployment(db_url)
    if row is None:
        raise NotFound("the database holds no deployment: set one up with `cardbridge server init`")
    settings = _settings(
        data, db_url, hsm_module, token_label or row.token_label, hsm_pin_file,
        public_url=public_url, node_name=node_name,
    )  # fmt: skip
    if settings.ca_key_id not in (None, row.ca_key_id):
        raise Conflict(f"{data} belongs to another deployment")
    ca_ref, ca_cert = deployment.ca_of(row)
    with Hsm.open(settings.hsm_module, settings.token_label, settings.hsm_pin()) as hsm:
        ca.require_ca_key(hsm, ca_ref, ca_cert)
        _mkdir(data)
        first = settings.ca_key_id is None
        _write_ca(settings, ca_ref, ca_cert)
        if not (settings.tls_cert.exists() and settings.tls_key.exists()):
            _issue_tls(settings, hsm, ca_ref, ca_cert)
        _create_metrics_token(settings)
        if first:  # the deployment's server keys are in the shared token
            with _database(settings.db_url, ServerKeys.load(hsm)) as session:
                deployment.joined(session, row, node=settings.node_name)
    return settings


def _issue_tls(settings: Settings, hsm: Hsm, ca_ref: KeyRef, ca_cert: x509.Certificate) -> None:
    _mkdir(settings.tls_cert.parent)
    _mkdir(settings.tls_key.parent)
    names = _tls_names(settings.bind, settings.public_url)
    cert, key_pem = ca.issue_tls_cert(hsm, ca_ref, ca_cert, names, base_url=settings.base_url)
    settings.tls_key.unlink(missing_ok=True)  # a lone key without its certificate is useless
    write_secret(settings.tls_key, key_pem)
    settings.tls_cert.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )


def _create_metrics_token(settings: Settings) -> None:
    """This node's token for ``GET /metrics``, unless it has one (an operator may put the same
    token on every node, so that one scrape job reads them all)."""
    if not settings.metrics_token_file.exists():
        write_secret(settings.metrics_token_file, (new_token() + "\n").encode())


def _create_admin_token(settings: Settings, keys: ServerKeys) -> None:
    with _database(settings.db_url, keys) as session:
        token = tokens.create_admin_token(session, actor="server-init")
    write_secret(settings.admin_token_file, (token + "\n").encode())
