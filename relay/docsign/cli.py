# SPDX-License-Identifier: Apache-2.0
"""``cardbridge sign IN... --format pades|cades|xades``: sign documents with the enrolled user's
9C key. Only digests go to the server (CSC ``signHash``); the documents never leave.

The signatures go through the running card's session when a card runs and is logged in, else
through a session of this command's own (the password, and the device key of the card's
configuration for DPoP). Every run asks for the PIN and, when the credential's authorization
needs one (``credentials/info``), a fresh TOTP; they authorize up to the credential's
``multisign`` documents at once, and the PIN alone each further group when no TOTP is needed.
A file that cannot be read, parsed or signed gets one line and the others are still signed; the
exit status is 0 only when every file was signed.
Outputs are written next to their inputs (or to ``--out``/``--out-dir``), atomically, never
over an input.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from relay import config as cfg
from relay.client import RelayError, ServerClient
from relay.docsign.cades import Cades
from relay.docsign.document import Appearance, Format, InputError, Run
from relay.docsign.longterm import Level, ValidationData, timestamper
from relay.docsign.pades import Pades
from relay.docsign.remote import Batch, CardChannel, Credential, CscChannel, OwnSession, SignError
from relay.docsign.xades import Xades
from relay.session import read_password

FORMATS: Final[dict[str, Format]] = {f.name: f for f in (Pades(), Cades(), Xades())}
SIGNATURE_SLOT: Final = "9c"
QUIET_LIBRARIES: Final = ("pyhanko", "pyhanko_certvalidator", "signxml")
"""Their log lines would repeat what the one line per file says, in their words."""

app = typer.Typer(
    invoke_without_command=True,
    subcommand_metavar="",
    context_settings={"allow_interspersed_args": True},
    help="Sign documents (PAdES, CAdES, XAdES) with the enrolled user's 9C key.",
)


class _Failed(Exception):
    """The whole run stops: one line, exit status 1."""


@dataclass
class Job:
    """One input and what became of it."""

    source: Path
    out: Path | None = None
    data: bytes = b""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        signed = self.error is None
        return {"input": str(self.source), "output": str(self.out) if signed else None,
                "ok": signed, "error": self.error}  # fmt: skip


def _fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


@dataclass(frozen=True)
class Options:
    """What the command line asks for, checked to go together."""

    format: Format
    level: Level
    packaging: str
    appearance: Appearance
    tsa: str | None
    pin_file: Path | None
    password_stdin: bool
    otp: str | None
    config: Path | None
    as_json: bool


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        x1, y1, x2, y2 = (int(v) for v in text.split(","))
    except ValueError:
        raise _Failed(f"--box wants X1,Y1,X2,Y2 in PDF points, got {text!r}") from None
    if x2 <= x1 or y2 <= y1:
        raise _Failed("--box: X2 and Y2 must be greater than X1 and Y1")
    return x1, y1, x2, y2


def _choices(
    fmt: str, level: str, packaging: str | None, tsa: str | None, pdf_options: bool
) -> tuple[Format, Level, str]:
    """The format, level and packaging, or why they do not go together."""
    chosen = FORMATS.get(fmt.lower())
    if chosen is None:
        raise _Failed(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    lvl = Level.parse(level)
    pack = (packaging or chosen.packagings[0]).lower()
    if pack not in chosen.packagings:
        raise _Failed(f"{chosen.name} signs {' or '.join(chosen.packagings)}, not {pack!r}")
    if pdf_options and chosen.name != "pades":
        raise _Failed("--field, --page and --box are for --format pades")
    if tsa is not None and lvl is Level.B_B:
        raise _Failed("--tsa is for --level B-T (a B-B signature has no timestamp)")
    if tsa is not None and lvl is Level.B_LT:
        raise _Failed(
            "--level B-LT uses the deployment's own TSA, whose revocation data the server "
            "publishes; use --tsa with --level B-T"
        )
    return chosen, lvl, pack


def _outputs(
    jobs: list[Job], fmt: Format, packaging: str, out: Path | None, out_dir: Path | None
) -> None:
    """Where each signed file goes; never over an input, never two to one place."""
    if out is not None and len(jobs) > 1:
        raise _Failed("--out takes one input; give --out-dir DIR for several")
    if out is not None and out_dir is not None:
        raise _Failed("give --out or --out-dir, not both")
    inputs = {j.source.resolve() for j in jobs}
    taken: set[Path] = set()
    for job in jobs:
        name = fmt.output_name(job.source, packaging)
        job.out = out or (out_dir or job.source.parent) / name
        target = job.out.resolve()
        if target in inputs:
            job.error = f"the output {job.out} would overwrite an input"
        elif target in taken:
            job.error = f"another input is signed into {job.out} already"
        taken.add(target)


def _read(job: Job, fmt: Format, packaging: str) -> None:
    try:
        job.data = job.source.read_bytes()
        fmt.check(job.data, packaging)
    except OSError as e:
        job.error = f"cannot read it: {e.strerror or e}"
    except InputError as e:
        job.error = str(e)


def _write(path: Path, data: bytes) -> None:
    """Write a signed document atomically, readable as its input's directory allows (0666 less
    the umask, as any program writes a document)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_atomic(path, data, 0o666)


def _secret_line(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise _Failed(f"cannot read {what} from {path}: {e.strerror or e}") from e
    if not value:
        raise _Failed(f"{path} holds no {what}")
    return value


def _channel(
    enrolled: cfg.Enrolled, client: ServerClient, password_stdin: bool
) -> tuple[CscChannel, str]:
    """The running card's session, else a login of this command's own."""
    card = CardChannel.find(cfg.runtime_dir() / cfg.CONTROL_SOCKET)
    if card is not None:
        return card, "card"
    user = enrolled.config.user
    try:
        password = read_password(password_stdin, f"Password of {user}: ")
    except ValueError as e:
        raise _Failed(str(e)) from None
    return OwnSession(client, user, password), "login"


@contextmanager
def _progress(total: int, quiet: bool) -> Iterator[Progress]:
    """A progress bar on stderr when it is a terminal (nothing otherwise, not even a line)."""
    console = Console(stderr=True)
    columns = (TextColumn("signing"), BarColumn(), MofNCompleteColumn())
    quiet = quiet or not console.is_terminal
    progress = Progress(*columns, console=console, transient=True, disable=quiet)
    with progress:
        progress.add_task("signing", total=total)
        yield progress


def _chunks(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def _describe(error: OSError) -> str:
    """An I/O error in one line, with what caused it (pyHanko wraps its HTTP client's)."""
    text = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    cause = error.__cause__
    return f"{text} ({type(cause).__name__}: {cause})" if cause else text


async def _sign_one(
    job: Job, fmt: Format, run: Run, batch: Batch, done: Callable[[Job], None]
) -> None:
    """Sign one document in ``batch`` and write it; its error, if any, goes on the job."""
    assert job.out is not None  # noqa: S101 -- set for every job that is signed
    participant = batch.participant()
    try:
        signed = await fmt.sign(job.data, job.source, job.out, run, participant)
        await asyncio.to_thread(_write, job.out, signed)
    except RelayError as e:
        job.error = str(e)
    except OSError as e:  # writing the output, or reaching another TSA (--tsa)
        job.error = _describe(e)
    except Exception as e:  # noqa: BLE001 -- one document's failure, reported
        job.error = f"unexpected error: {type(e).__name__}: {e}"
    finally:
        participant.leave()
    done(job)


async def _sign_jobs(
    jobs: list[Job],
    fmt: Format,
    run: Run,
    channel: CscChannel,
    credential: Credential,
    pin: str,
    otp: Callable[[int], str | None],
    done: Callable[[Job], None],
) -> None:
    """Every job, ``multisign`` at a time, each group under one authorization; after a failed
    authorization (a wrong PIN) nothing more is tried."""
    if run.timestamper is not None:
        # pyHanko sizes a signature with a timestamp it asks for once per digest algorithm and
        # keeps; asked here, before the documents run at once, it is one request instead of one
        # per document. A TSA that fails here fails each document again, in its own line.
        with suppress(Exception):
            await run.timestamper.async_dummy_response(credential.digest)
    failure: RelayError | None = None
    for number, group in enumerate(_chunks(jobs, credential.multisign)):
        if failure is None:
            try:
                code = otp(number)
            except SignError as e:
                failure = e
        if failure is not None:
            for job in group:
                job.error = f"not signed: {failure}"
                done(job)
            continue
        batch = Batch(channel, credential, pin, code, len(group))

        await asyncio.gather(*(_sign_one(job, fmt, run, batch, done) for job in group))
        failure = batch.failure


@app.callback()
def sign(
    inputs: Annotated[list[Path], typer.Argument(metavar="IN", help="Files to sign.")],
    fmt: Annotated[
        str, typer.Option("--format", metavar="pades|cades|xades", help="Signature format.")
    ],
    level: Annotated[
        str, typer.Option("--level", metavar="B-B|B-T|B-LT", help="Baseline level.")
    ] = "B-B",
    packaging: Annotated[
        str | None,
        typer.Option(
            "--packaging",
            metavar="detached|enveloping|enveloped",
            help="CAdES: detached (default) or enveloping; XAdES: enveloped (default) or "
            "detached.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", metavar="OUT", help="The signed file (one input).")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", metavar="DIR", help="Where the signed files go.",
                     file_okay=False),
    ] = None,  # fmt: skip
    field: Annotated[
        str | None, typer.Option("--field", help="PAdES: the signature field's name.")
    ] = None,
    page: Annotated[
        int, typer.Option("--page", help="PAdES: the page of a visible signature (-1: last).")
    ] = 1,
    box: Annotated[
        str | None,
        typer.Option(
            "--box", metavar="X1,Y1,X2,Y2", help="PAdES: a visible signature in this box."
        ),
    ] = None,
    tsa: Annotated[
        str | None,
        typer.Option("--tsa", metavar="URL", help="B-T: another RFC 3161 TSA than the server's."),
    ] = None,
    pin_file: Annotated[
        Path | None,
        typer.Option("--pin-file", help="Read the PIN from this file.", dir_okay=False),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Without a running card: read the password from stdin's first line.",
        ),
    ] = False,
    otp: Annotated[
        str | None, typer.Option("--otp", help="A fresh one-time password (TOTP).")
    ] = None,
    config: cfg.ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Sign IN... with the enrolled user's 9C key (the PIN, and a fresh TOTP where the
    credential asks for one); only digests go to the server. Levels: B-B, B-T (the server's
    timestamp, or --tsa), B-LT (and the CRL and chain, to validate without the network)."""
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        if page == 0:
            raise _Failed("--page counts from 1 (or back from -1, the last page)")
        pdf_options = field is not None or page != 1 or box is not None
        chosen, lvl, pack = _choices(fmt, level, packaging, tsa, pdf_options)
        look = Appearance(field, page, _box(box) if box is not None else None)
        options = Options(chosen, lvl, pack, look, tsa, pin_file, password_stdin, otp, config,
                          as_json)  # fmt: skip
        jobs = [Job(p) for p in inputs]
        _outputs(jobs, chosen, pack, out, out_dir)
        _main(jobs, options)
    except (_Failed, RelayError, OSError, ValueError) as e:  # OSError, ValueError: the card's
        _fail(str(e))  # configuration is missing or damaged


def _main(jobs: list[Job], options: Options) -> None:
    """Check every input, sign those that can be, report each, exit 1 unless all were."""
    for job in jobs:
        if job.error is None:
            _read(job, options.format, options.packaging)
        if job.error is not None and not options.as_json:
            typer.echo(f"Error: {job.source}: {job.error}", err=True)
    todo = [j for j in jobs if j.error is None]
    session = _sign_all(todo, options) if todo else None
    if options.as_json:
        report = {
            "session": session,
            "format": options.format.name,
            "level": options.level.value,
            "packaging": options.packaging,
            "results": [j.as_dict() for j in jobs],
        }
        typer.echo(json.dumps(report, indent=2))
    if any(j.error is not None for j in jobs):
        raise typer.Exit(1)


def _sign_all(jobs: list[Job], options: Options) -> str:
    """Sign ``jobs`` (each gets its output or its error); returns which session signed them,
    ``card`` or ``login``."""
    enrolled = cfg.Enrolled.load(cfg.config_dir(options.config))
    info = enrolled.config.credential(SIGNATURE_SLOT)
    if info is None:
        raise _Failed("the enrolled card has no signature key (slot 9C)")
    client = ServerClient(enrolled.config.servers, enrolled.config.ca_pem, enrolled.device)
    try:
        channel, session = _channel(enrolled, client, options.password_stdin)
        try:
            credential = Credential.describe(channel, info.credential_id)
            validation = None
            if options.level is Level.B_LT:
                validation = ValidationData.fetch(client, credential)
                asyncio.run(validation.check_signer(credential))
            stamps = timestamper(client, options.tsa) if options.level is not Level.B_B else None
            run = Run(options.level, options.packaging, stamps, validation, options.appearance)
            pin = (
                _secret_line(options.pin_file, "PIN")
                if options.pin_file
                else getpass.getpass("PIN: ")
            )
            first = options.otp
            if first is None and credential.otp:
                first = typer.prompt("One-time password", err=True).strip()
            _sign_in_groups(jobs, options.format, run, channel, credential, pin, first,
                            options.as_json)  # fmt: skip
        finally:
            channel.close()
    finally:
        client.close()
    return session


def _sign_in_groups(
    jobs: list[Job], fmt: Format, run: Run, channel: CscChannel, credential: Credential,
    pin: str, first: str | None, as_json: bool,
) -> None:  # fmt: skip
    with _progress(len(jobs), quiet=as_json) as progress:

        def otp(number: int) -> str | None:
            if number == 0:
                return first
            if not credential.otp:
                return None  # the PIN alone authorizes the next documents
            if not sys.stdin.isatty():
                raise SignError(
                    f"another one-time password is needed: one authorization covers "
                    f"{credential.multisign} documents; sign the rest in another run"
                )
            progress.stop()
            try:
                return str(typer.prompt("One-time password for the next documents", err=True))
            finally:
                progress.start()

        def done(job: Job) -> None:
            progress.advance(progress.task_ids[0])
            if as_json:
                return
            if job.error is None:
                typer.echo(f"signed {job.source} -> {job.out}")
            else:
                typer.echo(f"Error: {job.source}: {job.error}", err=True)

        asyncio.run(_sign_jobs(jobs, fmt, run, channel, credential, pin, otp, done))
