"""``cardbridge server …`` (set up and run the signing server) and ``cardbridge admin …`` (a
client of its Administration API).

Both apps use :class:`_Group`, the one place where errors become a one-line message and a
non-zero exit; no command prints a traceback. Secrets (passwords, PINs, PUKs, OTP seeds,
enrollment codes) are printed to stdout only when they are the result the user asked for, and
are never logged.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from server.adminclient import SERVER_URL_FILE, AdminApiError, AdminClient
from server.config import DEFAULT_BIND, Settings, local_url
from server.errors import ServerError
from server.schemas import KeyAlgName, Slot

log = logging.getLogger(__name__)

#: The environment variable ``cardbridge admin --token`` falls back to.
TOKEN_ENV = "CARDBRIDGE_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret

ENROLL_JSON_KEYS = ("user", "pin", "puk", "otp_uri", "enrollment_code", "credentials")
CREDENTIAL_JSON_KEYS = ("slot", "credential_id", "alg")


class CliError(Exception):
    """A failure the user can act on, reported as one line."""


class _Group(TyperGroup):
    """Runs a command; the single place where every error becomes one line on stderr
    (``Error: …``) and exit status 1, never a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors and normal exits: typer reports them itself
        except (CliError, AdminApiError, OSError, ValueError) as e:
            message = str(e)
        except ServerError as e:
            message = f"{e.description} ({e.code})"
        except Exception as e:
            log.debug("unexpected error", exc_info=True)
            message = f"unexpected error: {type(e).__name__}: {e}"
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1)


server_app = typer.Typer(
    name="server",
    cls=_Group,
    no_args_is_help=True,
    help="Set up and run the signing server (HSM keys, CA, CSC signing API, admin API).",
)
admin_app = typer.Typer(
    name="admin",
    cls=_Group,
    no_args_is_help=True,
    help="Administer a running server through its Administration API.",
)
user_app = typer.Typer(name="user", no_args_is_help=True, help="Manage users.")
cert_app = typer.Typer(name="cert", no_args_is_help=True, help="Certificates from an external CA.")
audit_app = typer.Typer(name="audit", no_args_is_help=True, help="The hash-chained audit log.")
admin_app.add_typer(user_app)
admin_app.add_typer(cert_app)
admin_app.add_typer(audit_app)

DataOpt = Annotated[
    Path,
    typer.Option("--data", help="The server's data directory.", file_okay=False, resolve_path=True),
]


# -- cardbridge server ---------------------------------------------------------------------

TokenLabelOpt = Annotated[
    str | None, typer.Option("--token-label", help="Label of the PKCS#11 token.")
]
HsmPinFileOpt = Annotated[
    Path | None,
    typer.Option("--hsm-pin-file", help="File holding the token's user PIN.", dir_okay=False),
]
PublicUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--public-url",
        help="https://HOST[:PORT] that clients use (a load balancer); HOST goes into the TLS "
        "certificate, the URL into issued certificates (CRL, CA issuers; default: the bind "
        "address).",
    ),
]
NodeNameOpt = Annotated[
    str | None,
    typer.Option("--node-name", help="This node's name in audit records (default: host name)."),
]


@server_app.command("init")
def server_init(
    data: DataOpt,
    db: Annotated[
        str | None,
        typer.Option("--db", help="Database URL (default: SQLite in DIR), e.g. postgresql://…"),
    ] = None,
    hsm_module: Annotated[
        Path | None,
        typer.Option("--hsm-module", help="PKCS#11 module (default: a SoftHSM2 token in DIR)."),
    ] = None,
    token_label: TokenLabelOpt = None,
    hsm_pin_file: HsmPinFileOpt = None,
    public_url: PublicUrlOpt = None,
    node_name: NodeNameOpt = None,
) -> None:
    """Create (or complete) a data directory: database, HSM token, CA, TLS certificate, admin
    token. Running it again destroys nothing. A database that already holds a deployment is
    refused: add a node to it with server join."""
    from server.datadir import init_data_dir

    if hsm_module is not None and (token_label is None or hsm_pin_file is None):
        raise CliError("--hsm-module needs --token-label and --hsm-pin-file")
    before = _snapshot(data)
    settings = init_data_dir(
        data,
        db_url=db,
        hsm_module=str(hsm_module) if hsm_module else None,
        token_label=token_label,
        hsm_pin_file=hsm_pin_file,
        public_url=public_url,
        node_name=node_name,
    )
    _report(data, settings, before)


@server_app.command("join")
def server_join(
    data: DataOpt,
    db: Annotated[
        str, typer.Option("--db", help="The deployment's database URL, e.g. postgresql://…")
    ],
    hsm_module: Annotated[
        Path | None,
        typer.Option(
            "--hsm-module",
            help="PKCS#11 module that reaches the deployment's token, e.g. p11-kit-client.so "
            "(required, with --hsm-pin-file).",
        ),
    ] = None,
    token_label: TokenLabelOpt = None,
    hsm_pin_file: HsmPinFileOpt = None,
    public_url: PublicUrlOpt = None,
    node_name: NodeNameOpt = None,
) -> None:
    """Add a node to the deployment in the database: check that the token holds its CA key,
    issue this node's TLS certificate from that CA and write DIR. The token label defaults to
    the deployment's."""
    from server.datadir import join_data_dir

    if hsm_module is None or hsm_pin_file is None:
        raise CliError(
            "server join needs --hsm-module and --hsm-pin-file: the PKCS#11 module that reaches "
            "the deployment's HSM token, and the token's PIN"
        )
    before = _snapshot(data)
    settings = join_data_dir(
        data,
        db_url=db,
        hsm_module=str(hsm_module),
        hsm_pin_file=hsm_pin_file,
        token_label=token_label,
        public_url=public_url,
        node_name=node_name,
    )
    _report(data, settings, before)


def _report(data: Path, settings: Settings, before: set[str]) -> None:
    """What ``init`` and ``join`` print: where things are and what was created."""
    from sqlalchemy import make_url

    created = sorted(_snapshot(data) - before)
    typer.echo(f"data directory: {data}")
    typer.echo(f"database:       {make_url(settings.db_url).render_as_string(hide_password=True)}")
    typer.echo(f"HSM:            {settings.hsm_module} (token {settings.token_label!r})")
    typer.echo(f"node:           {settings.node_name}")
    if created:
        typer.echo("created:")
        for rel in created:
            typer.echo(f"  {rel}")
    else:
        typer.echo("nothing to create: the data directory was already complete")


@server_app.command("status")
def server_status(
    data: DataOpt, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Print the data directory's configuration and the security policy the server enforces
    (``policy`` in DIR/server.json), e.g. whether CSC authorizations need a TOTP."""
    from sqlalchemy import make_url

    settings = Settings.load(data)
    policy = settings.policy.model_dump(mode="json")
    status: dict[str, Any] = {
        "data_dir": str(settings.data_dir),
        "database": make_url(settings.db_url).render_as_string(hide_password=True),
        "hsm_module": settings.hsm_module,
        "token_label": settings.token_label,
        "bind": settings.bind,
        "audit_checkpoint_file": str(settings.audit_checkpoint_file),
        "audit_checkpoint_syslog": settings.audit_checkpoint_syslog,
        "audit_checkpoint_interval": settings.audit_checkpoint_interval,
        "policy": policy,
    }
    if as_json:
        _print_json(status)
        return
    for key, value in status.items():
        if key != "policy":
            typer.echo(f"{key + ':':27}{value if isinstance(value, str) else json.dumps(value)}")
    typer.echo("policy:")
    for key, value in policy.items():
        typer.echo(f"  {key + ':':25}{json.dumps(value)}")


@server_app.command("run")
def server_run(
    data: DataOpt,
    bind: Annotated[
        str | None, typer.Option("--bind", help=f"HOST:PORT (default {DEFAULT_BIND}).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, help="Worker processes; each opens its own HSM session."),
    ] = 1,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve HTTPS with the TLS certificate from DIR until SIGTERM or Ctrl-C."""
    from server.serving import metrics_dir

    settings = Settings.load(data)
    host, port = parse_bind(bind or settings.bind)
    # The workers' metric files: set before anything imports the app (and prometheus-client).
    with metrics_dir():
        _serve(data, settings, host, port, workers, log_level)


def _serve(
    data: Path, settings: Settings, host: str, port: int, workers: int, log_level: str
) -> None:
    import uvicorn

    from server.app import DATA_DIR_ENV, open_hsm
    from server.serving import PROTOCOL

    open_hsm(settings).close()  # a token without the deployment's CA key: one line, exit 1
    os.environ[DATA_DIR_ENV] = str(data)  # each worker's create_app() reads it
    url_file = data / SERVER_URL_FILE
    url_file.write_text(local_url(host, port) + "\n")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal with the handler it
    # found; this one turns that into exit status 0, so a service manager sees a clean stop.
    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    try:
        uvicorn.run(
            "server.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            ssl_certfile=str(settings.tls_cert),
            ssl_keyfile=str(settings.tls_key),
            ssl_ciphers=TLS12_CIPHERS,
            log_level=log_level,
            http=PROTOCOL,
            proxy_headers=False,
            server_header=False,
            # The audit log records every security event; a line per request on top of it costs
            # CPU on the signing path and says nothing the audit log does not.
            access_log=False,
            # Longer than clients keep idle connections (httpx 5 s, aiohttp 15 s): with uvicorn's
            # default of 5 s, a client reusing a connection as the server closes it gets
            # "Server disconnected without sending a response".
            timeout_keep_alive=75,
            # For requests in flight; idle connections are dropped at once (server.serving).
            timeout_graceful_shutdown=10,
        )
    finally:
        url_file.unlink(missing_ok=True)


TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""The TLS 1.2 suites ``server run`` offers: forward secret (authenticated ECDHE) and AEAD only,
no CBC (RFC 9325 §4.2); Python's server context accepts nothing older than TLS 1.2, and TLS 1.3
suites are all AEAD."""


def _exit_after_shutdown(signum: int, frame: object) -> None:
    raise SystemExit(0)


def parse_bind(bind: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8443`` for IPv6)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--bind wants HOST:PORT, got {bind!r}")
    return host.strip("[]"), int(port)


def _snapshot(data: Path) -> set[str]:
    if not data.is_dir():
        return set()
    return {str(p.relative_to(data)) for p in data.iterdir()}


# -- cardbridge admin ----------------------------------------------------------------------


@dataclass
class _Target:
    """Where ``cardbridge admin`` sends its requests; the client is opened on first use."""

    data: Path | None
    server: str | None
    token: str | None
    ca: Path | None
    _client: AdminClient | None = None

    def client(self) -> AdminClient:
        if self._client is None:
            self._client = self._open()
        return self._client

    def _open(self) -> AdminClient:
        if self.data is not None:
            return client_for_data_dir(self.data, server=self.server, token=self.token)
        if self.server is None or self.token is None:
            raise CliError(f"give --data DIR, or --server URL with --token T (or ${TOKEN_ENV})")
        return AdminClient(self.server, self.token, ca_file=self.ca)


def client_for_data_dir(
    data: Path, *, server: str | None = None, token: str | None = None
) -> AdminClient:
    """An admin client of the local server of ``data``: its URL (from ``server run``), its
    admin token and its CA."""
    settings = Settings.load(data)
    if server is None:
        url_file = data / SERVER_URL_FILE
        if url_file.is_file():
            server = url_file.read_text().strip()
        else:
            server = local_url(*parse_bind(settings.bind))
    if token is None:
        token = settings.admin_token_file.read_text().strip()
    return AdminClient(server, token, ca_file=settings.ca_cert)


@admin_app.callback()
def admin_main(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Data directory of a local server.", file_okay=False),
    ] = None,
    server: Annotated[str | None, typer.Option("--server", help="Server URL.")] = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar=TOKEN_ENV, help="Admin API token.")
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option("--ca", help="CA certificate to trust (with --server).", dir_okay=False),
    ] = None,
) -> None:
    """Administer a running server (``--data DIR`` locally, or ``--server URL --token T``)."""
    target = _Target(data=data, server=server, token=token, ca=ca)
    ctx.obj = target
    ctx.call_on_close(lambda: target._client.close() if target._client else None)


def _client(ctx: typer.Context) -> AdminClient:
    target = ctx.find_object(_Target)
    if target is None:
        raise CliError("internal: no admin target")
    return target.client()


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    name: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin's first line.")
    ] = False,
    email: Annotated[str | None, typer.Option("--email")] = None,
    upn: Annotated[
        str | None, typer.Option("--upn", help="User principal name (card logon).")
    ] = None,
) -> None:
    """Add a user. Without --password-stdin, prompt (hidden) on a terminal; with no password
    given the server generates one, printed once."""
    password = _read_password(password_stdin)
    result = _client(ctx).add_user(name, password=password, email=email, upn=upn)
    typer.echo(f"user {name} added")
    if password is None and result.get("password"):
        typer.echo(f"password: {result['password']}")


def _read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise CliError("--password-stdin: stdin holds no password")
        return line
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass("Password (empty: generate one): ")
    if not first:
        return None
    if getpass.getpass("Repeat password: ") != first:
        raise CliError("the passwords do not match")
    return first


@user_app.command("list")
def user_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List users and their state."""
    users = _client(ctx).list_users()
    if as_json:
        _print_json(users)
        return
    if not users:
        typer.echo("no users")
        return
    columns = list(dict.fromkeys(k for u in users for k in u))
    rows = [[_cell(u.get(c)) for c in columns] for u in users]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


@user_app.command("disable")
def user_disable(ctx: typer.Context, name: str) -> None:
    """Disable a user: no login, no key use."""
    _client(ctx).disable_user(name)
    typer.echo(f"user {name} disabled")


@user_app.command("unlock")
def user_unlock(ctx: typer.Context, name: str) -> None:
    """Lift NAME's failed-login lock (``login_locked`` in ``user list``) before its window
    ends."""
    _client(ctx).unlock_user(name)
    typer.echo(f"user {name} unlocked")


@admin_app.command("enroll")
def enroll(
    ctx: typer.Context,
    name: str,
    alg: Annotated[KeyAlgName, typer.Option("--alg", help="Key algorithm.")] = KeyAlgName.p256,
    otp_per_signature: Annotated[
        bool, typer.Option("--otp-per-signature", help="Ask for a TOTP with every signature.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Enroll NAME: 9A/9C/9D/9E keys and certificates, PIN, PUK, TOTP, enrollment code.

    The keys are generated in the HSM; the secrets are printed once, with a QR code of the
    otpauth URI for an authenticator app.
    """
    result = _client(ctx).enroll(name, alg=alg.value, otp_per_signature=otp_per_signature)
    missing = [k for k in ENROLL_JSON_KEYS if k not in result]
    if missing:
        raise CliError(f"the server's enrollment answer lacks {', '.join(missing)}")
    creds = [{k: c.get(k) for k in CREDENTIAL_JSON_KEYS} for c in result["credentials"]]
    if as_json:
        _print_json({**{k: result[k] for k in ENROLL_JSON_KEYS}, "credentials": creds})
        return
    typer.echo(f"user:            {result['user']}")
    typer.echo(f"PIN:             {result['pin']}")
    typer.echo(f"PUK:             {result['puk']}")
    typer.echo(f"enrollment code: {result['enrollment_code']}")
    for c in creds:
        typer.echo(f"slot {c['slot']}: {c['alg']} credential {c['credential_id']}")
    typer.echo(f"TOTP:            {result['otp_uri']}")
    _print_qr(str(result["otp_uri"]))


def _print_qr(uri: str) -> None:
    import segno

    segno.make(uri, error="m").terminal(out=sys.stdout, compact=True)


@admin_app.command("revoke")
def revoke(ctx: typer.Context, name: str) -> None:
    """Revoke NAME's credentials and enrolled devices."""
    _client(ctx).revoke(name)
    typer.echo(f"user {name}: credentials revoked")


@admin_app.command("unblock")
def unblock(ctx: typer.Context, name: str) -> None:
    """Reset NAME's blocked PIN (and PIN retry counter)."""
    result = _client(ctx).unblock(name)
    typer.echo(f"user {name}: PIN unblocked")
    if result.get("pin"):
        typer.echo(f"new PIN: {result['pin']}")


SlotArg = Annotated[Slot, typer.Argument(case_sensitive=False)]


@cert_app.command("csr")
def cert_csr(
    ctx: typer.Context,
    name: str,
    slot: SlotArg,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the CSR here (default stdout).")
    ] = None,
) -> None:
    """Write a CSR for NAME's key in SLOT, signed in the HSM, for an external CA."""
    pem = _client(ctx).cert_csr(name, slot.value)
    if output is None:
        typer.echo(pem.rstrip("\n"))
    else:
        output.write_text(pem)
        typer.echo(f"CSR written to {output}")


@cert_app.command("import")
def cert_import(
    ctx: typer.Context,
    name: str,
    slot: SlotArg,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
) -> None:
    """Install the certificate in FILE (PEM or DER) for NAME's key in SLOT, after the server
    checks it matches the key."""
    pem = _as_pem_certificate(file.read_bytes())
    _client(ctx).cert_import(name, slot.value, pem)
    typer.echo(f"user {name}: certificate installed in slot {slot.value}")


def _as_pem_certificate(raw: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw else (
            x509.load_der_x509_certificate(raw)
        )
    except ValueError as e:
        raise CliError(f"not an X.509 certificate: {e}") from e
    return cert.public_bytes(Encoding.PEM).decode()


CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="A file of signed checkpoints (the server's audit-checkpoints.jsonl, or what "
        "`audit checkpoint --append` wrote): the chain must still hold the latest one.",
        exists=True,
        dir_okay=False,
    ),
]


@audit_app.command("verify")
def audit_verify(ctx: typer.Context, checkpoint: CheckpointOpt = None) -> None:
    """Check the audit log's hash chain and HSM MACs (and, with --checkpoint, that it was not
    cut back or wiped since); exit 1 and name the first bad record if broken."""
    checkpoints = [latest_checkpoint(checkpoint)] if checkpoint is not None else None
    result = _client(ctx).audit_verify(checkpoints)
    if result.get("ok"):
        against = f", checkpoint {checkpoints[0]['seq']} held" if checkpoints else ""
        typer.echo(f"audit log OK: {result.get('records')} records{against}")
        return
    reason = result.get("reason") or "broken"
    raise CliError(f"audit log BROKEN at record {result.get('first_bad')}: {reason}")


def latest_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint of ``path`` (JSON lines) with the highest seq: it covers every record
    before it (the chain links them)."""
    found: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            cp = json.loads(line)
            int(cp["seq"])
        except (ValueError, TypeError, KeyError) as e:
            raise CliError(f"{path}:{number}: not a checkpoint") from e
        found.append(cp)
    if not found:
        raise CliError(f"{path} holds no checkpoint")
    return max(found, key=lambda cp: int(cp["seq"]))


@audit_app.command("checkpoint")
def audit_checkpoint(
    ctx: typer.Context,
    append: Annotated[
        Path | None,
        typer.Option("--append", help="Append it to this file (default: print it).",
                     dir_okay=False),
    ] = None,
) -> None:
    """Get a checkpoint of the audit chain signed by the server's HSM, to keep outside the
    database."""
    line = json.dumps(_client(ctx).audit_checkpoint(), sort_keys=True, separators=(",", ":"))
    if append is None:
        typer.echo(line)
        return
    with append.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    typer.echo(f"checkpoint appended to {append}")


@audit_app.command("export")
def audit_export(
    ctx: typer.Context,
    user: Annotated[
        str | None,
        typer.Option("--user", help="Only the records NAME acted in or that are about NAME.",
                     metavar="NAME"),
    ] = None,
    event: Annotated[
        str | None,
        typer.Option("--event", help="Only this event, e.g. sign, login.failed, key.refused.",
                     metavar="EVENT"),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only the records from this time on: ISO 8601, e.g. "
                     "2026-01-31T08:00:00Z (UTC without an offset).", metavar="ISO-TIME"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the audit records, oldest first (one JSON object per line, or --json): all of
    them, or those that match every filter given."""
    records = _client(ctx).audit_export(user=user, event=event, since=since)
    if isinstance(records, dict) and "records" in records:
        records = records["records"]
    if as_json:
        _print_json(records)
        return
    for rec in records:
        typer.echo(json.dumps(rec, separators=(",", ":")))
