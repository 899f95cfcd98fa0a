# SPDX-License-Identifier: Apache-2.0
"""``cardbridge card``: enroll this workstation, run the card (the enrolled user's remote keys,
or a standalone software card), open, inspect and end the user's session in it, and create and
diagnose software cards."""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from relay import config as cfg
from relay import control
from relay.client import RelayError, Timeouts
from relay.enroll import enroll as enroll_device
from relay.service import CardService
from relay.session import read_password
from vcard import doctor as doctor_checks
from vcard.apdu import TRAFFIC
from vcard.card import VirtualCard
from vcard.constants import DEFAULT_PIN, DEFAULT_PUK, KeyType
from vcard.provision import init_soft as provision_soft
from vcard.softkeys import SoftKeyBackend
from vcard.vpcd import (
    DEFAULT_APDU_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_PORT,
    VpcdLink,
    VpcdUnreachable,
    parse_address,
)

app = typer.Typer(help="Enroll, run and use the virtual PIV card.", no_args_is_help=True)

logger = logging.getLogger(__name__)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _fail(message: str) -> NoReturn:
    """The one way these commands report a failure: one line on stderr, exit status 1."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def _socket() -> Path:
    return cfg.runtime_dir() / cfg.CONTROL_SOCKET


def _ask(what: str, request: dict[str, Any], op: str, timeout: float = 30.0) -> dict[str, Any]:
    try:
        return control.request(_socket(), op, timeout=timeout, **request)
    except control.ControlError as e:
        _fail(f"{what}: {e}")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "unknown"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _key_type(name: str) -> KeyType:
    try:
        return KeyType.from_name(name)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command("init-soft")
def init_soft(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Card directory to create.")],
    alg: Annotated[
        str, typer.Option(help=f"Key algorithm: {', '.join(KeyType.cli_names())}.")
    ] = "p256",
    pin: Annotated[str, typer.Option(help="Initial PIN (6-8 digits).")] = DEFAULT_PIN.decode(),
    puk: Annotated[str, typer.Option(help="Initial PUK (8 digits).")] = DEFAULT_PUK.decode(),
    as_json: JsonOpt = False,
) -> None:
    """Create a software-key card: keys and certificates in 9A/9C/9D/9E, CA in DIR/ca.pem."""
    key_type = _key_type(alg)
    try:
        card = provision_soft(directory, key_type, pin.encode(), puk.encode())
    except (OSError, ValueError) as e:
        _fail(f"cannot create a card in {directory}: {e}")
    if as_json:
        typer.echo(json.dumps(card.as_dict(), indent=2))
        return
    typer.echo(f"Created a {key_type.cli_name} card in {card.path}")
    for issued in card.slots:
        typer.echo(f"  slot {issued.slot.value:02X}  {issued.subject}  sha256 {issued.fingerprint}")
    typer.echo(f"CA certificate: {card.ca_path} (its private key was discarded)")
    typer.echo("Run it with: cardbridge card run --soft " + str(card.path))


@app.command()
def doctor(
    reader: Annotated[
        str | None, typer.Option(help="Substring of the reader name (default: any vpcd).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check pcscd, the vpcd reader and the card, and say what to fix."""
    checks = doctor_checks.run_checks(reader)
    if as_json:
        typer.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for check in checks:
            mark = "ok  " if check.ok else "FAIL"
            typer.echo(f"[{mark}] {check.name}: {check.detail}")
            if check.fix:
                typer.echo(f"       fix: {check.fix}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command()
def enroll(
    server: Annotated[
        list[str],
        typer.Option(
            "--server", metavar="URL", help="Server URL; repeat for fail-over (first preferred)."
        ),
    ],
    code: Annotated[
        str, typer.Option("--code", help="The enrollment code `cardbridge admin enroll` printed.")
    ],
    config: cfg.ConfigOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a card already enrolled here.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make this workstation a device of the user: check the server against the CA the code
    pins, register a new device key, and store the card's configuration."""
    directory = cfg.config_dir(config)
    try:
        enrolled = enroll_device(server, code, directory, force=force)
    except (RelayError, OSError, ValueError) as e:
        _fail(f"enrollment failed: {e}")
    card = enrolled.config
    slots = {c.slot: c.alg for c in card.credentials}
    if as_json:
        _print_json({"user": card.user, "device_id": card.device_id, "servers": card.servers,
                     "config": str(directory), "slots": slots})  # fmt: skip
        return
    typer.echo(f"Enrolled {card.user} (device {card.device_id}) in {directory}")
    for slot, alg in slots.items():
        typer.echo(f"  slot {slot}: {alg}")
    typer.echo("Next: cardbridge card run   (then: cardbridge card login)")


_M_MMAP_THRESHOLD = -3
"""mallopt(3)'s parameter number in glibc's malloc.h."""


def _steady_heap() -> None:
    """Keep the card process's heap at its working size on glibc: after a large block is freed,
    glibc raises its mmap threshold (mallopt(3), M_MMAP_THRESHOLD, dynamic by default), so the
    4 MiB scrypt buffer of a soft card's PIN check and the largest APDUs' buffers stayed in the
    heap for good (``scripts/fuzz-card``: +9.8 MB of RSS over 60,000 APDUs, +2.0 MB with the
    threshold fixed at glibc's default of 128 KiB). Elsewhere (another libc) nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


@app.command()
def run(
    soft: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Run a standalone software card made by init-soft."),
    ] = None,
    config: cfg.ConfigOption = None,
    vpcd: Annotated[
        str, typer.Option(metavar="HOST:PORT", help="vpcd's address.")
    ] = f"{DEFAULT_HOST}:{DEFAULT_PORT}",
    apdu_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            min=0.001,
            help="Longest time the card may take over one APDU; past it the client gets 6400 "
            f"(default {DEFAULT_APDU_TIMEOUT:g} s, for an enrolled card 5 s more than a "
            "sole-control signature may take).",
        ),
    ] = None,
    approval_timeout: Annotated[
        float,
        typer.Option(min=1, help="Seconds a sole-control signature waits for `card approve`."),
    ] = 60.0,
    server_timeout: Annotated[
        float, typer.Option(min=0.5, help="Seconds to wait for the server's answer.")
    ] = 10.0,
    failback_after: Annotated[
        float,
        typer.Option(min=0, help="Seconds before a server that failed is tried first again."),
    ] = 30.0,
    trace: Annotated[
        bool, typer.Option("--trace", "-v", help="Log every APDU (secrets redacted).")
    ] = False,
) -> None:
    """Present the card in vpcd's reader until interrupted: the enrolled user's card (keys in
    the server's HSM), or with --soft a local software card."""
    logging.basicConfig(
        level=TRAFFIC if trace else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise
    _steady_heap()
    try:
        host, port = parse_address(vpcd)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--vpcd") from None
    service: CardService | None = None
    server: control.ControlServer | None = None
    bound = apdu_timeout or DEFAULT_APDU_TIMEOUT
    try:
        if soft is not None:
            card = VirtualCard(SoftKeyBackend.open(soft))
        else:
            enrolled = cfg.Enrolled.load(cfg.config_dir(config))
            service = CardService(
                enrolled,
                timeouts=Timeouts(read=server_timeout),
                approval_timeout=approval_timeout,
                failback_after=failback_after,
            )
            needed = service.longest_operation
            if apdu_timeout is None:
                bound = max(bound, needed + 5)
            elif apdu_timeout <= needed:
                raise typer.BadParameter(
                    f"must exceed {needed:g} s (--approval-timeout, the connect timeout and "
                    "--server-timeout), or the card answers 6400 while it waits",
                    param_hint="--apdu-timeout",
                )
            card = VirtualCard(service.backend)
            cfg.private_dir(cfg.runtime_dir())
            server = control.ControlServer(_socket(), service.handle)
    except (OSError, ValueError, control.ControlError) as e:
        _fail(str(e))
    link = VpcdLink(card, host, port, apdu_timeout=bound)

    def _stop(signum: int, frame: FrameType | None) -> None:
        link.stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    if server is not None and service is not None:
        server.start()
        logger.info(
            "card of %s ready; log in with `cardbridge card login`", service.session.user
        )
    try:
        link.run()
    except VpcdUnreachable as e:
        _fail(str(e))
    finally:
        if server is not None:
            server.close()
        if service is not None:
            service.close()
    logger.info("card stopped")


@app.command()
def login(
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin's first line.")
    ] = False,
    otp: Annotated[
        str | None, typer.Option("--otp", help="The current one-time password (TOTP).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Open the user's session in the running card: password and TOTP."""
    try:
        password = read_password(password_stdin, "Password: ")
    except ValueError as e:
        _fail(str(e))
    if otp is None:
        otp = typer.prompt("One-time password").strip()
    answer = _ask("login failed", {"password": password, "otp": otp}, "login")
    if as_json:
        _print_json({"user": answer["user"], "expires_at": answer["expires_at"]})
        return
    typer.echo(f"Logged in as {answer['user']}; the session ends {_when(answer['expires_at'])}")


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """The running card: server, session, PIN tries, waiting approvals, last error."""
    answer = _ask("status", {}, "status")
    answer.pop("ok", None)
    if as_json:
        _print_json(answer)
        return
    session = answer["session"]
    typer.echo(f"user:       {answer['user']} (device {answer['device_id']})")
    typer.echo(f"servers:    {', '.join(answer['servers'])}")
    typer.echo(f"server:     {answer['server'] or 'none reached yet'}")
    state = f"active, ends {_when(session['expires_at'])}" if session["active"] else "none"
    typer.echo(f"session:    {state}")
    pin = answer["pin"]
    typer.echo(f"PIN tries:  {pin['retries']} (PUK {pin['puk_retries']})")
    typer.echo(f"last error: {answer['last_error'] or 'none'}")
    for waiting in answer["pending"]:
        typer.echo(
            f"waiting:    #{waiting['id']} slot {waiting['slot']} {waiting['what']} "
            f"{waiting['digest']} ({waiting['waiting']} s)"
        )


@app.command()
def logout() -> None:
    """End the user's session in the running card (and on the server)."""
    _ask("logout", {}, "logout")
    typer.echo("Logged out")


@app.command()
def approve(
    otp: Annotated[
        str | None, typer.Option("--otp", help="A fresh one-time password (TOTP).")
    ] = None,
    approval_id: Annotated[
        int | None, typer.Option("--id", help="Which waiting signature (default: the oldest).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a waiting signature with a sole-control key: show it, then sign it with a
    fresh TOTP."""
    pending = _ask("approve", {}, "status")["pending"]
    if not pending:
        _fail("no signature waits for approval")
    if not as_json:
        for waiting in pending:
            typer.echo(
                f"#{waiting['id']}: slot {waiting['slot']}, {waiting['what']}, "
                f"digest {waiting['digest']}, waiting {waiting['waiting']} s"
            )
    if otp is None:
        otp = typer.prompt("One-time password to approve").strip()
    request: dict[str, Any] = {"otp": otp}
    if approval_id is not None:
        request["id"] = approval_id
    answer = _ask("approval failed", request, "approve", timeout=120)
    if as_json:
        _print_json({"outcome": answer["outcome"], "approval": answer["approval"]})
        return
    typer.echo(f"Approved #{answer['approval']['id']}: {answer['outcome']}")
