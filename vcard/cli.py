# SPDX-License-Identifier: Apache-2.0
"""``cardbridge card``: create, run and diagnose the virtual PIV card."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer

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

app = typer.Typer(help="Run and manage the virtual PIV card.", no_args_is_help=True)

logger = logging.getLogger(__name__)


def _fail(message: str) -> NoReturn:
    """The one way this CLI reports a failure: one line on stderr, exit status 1."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
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
def run(
    soft: Annotated[Path, typer.Option(metavar="DIR", help="Card directory made by init-soft.")],
    vpcd: Annotated[
        str, typer.Option(metavar="HOST:PORT", help="vpcd's address.")
    ] = f"{DEFAULT_HOST}:{DEFAULT_PORT}",
    trace: Annotated[
        bool, typer.Option("--trace", "-v", help="Log every APDU (secrets redacted).")
    ] = False,
    apdu_timeout: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            min=0.001,
            help="Longest time the card may take over one APDU; past it the client gets 6400.",
        ),
    ] = DEFAULT_APDU_TIMEOUT,
) -> None:
    """Present the card in vpcd's reader until interrupted."""
    logging.basicConfig(
        level=TRAFFIC if trace else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        host, port = parse_address(vpcd)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--vpcd") from None
    try:
        backend = SoftKeyBackend.open(soft)
    except (OSError, ValueError) as e:
        _fail(str(e))
    link = VpcdLink(VirtualCard(backend), host, port, apdu_timeout=apdu_timeout)

    def _stop(signum: int, frame: FrameType | None) -> None:
        link.stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        link.run()
    except VpcdUnreachable as e:
        _fail(str(e))
    logger.info("card stopped")


@app.command()
def doctor(
    reader: Annotated[
        str | None, typer.Option(help="Substring of the reader name (default: any vpcd).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
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
