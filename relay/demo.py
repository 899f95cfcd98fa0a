# SPDX-License-Identifier: Apache-2.0
"""``cardbridge demo``: the product's main job on embedded defaults, step by step.

In a temporary directory it starts a signing server (SQLite, SoftHSM2), adds and enrolls a
user, enrolls this workstation's card, presents it in vpcd's reader through pcscd, logs in
with password and TOTP (the demo plays the user's authenticator app), signs a PDF through
OpenSC's PKCS#11 module with pyHanko (PAdES B-B, the 9C key; the private key never leaves the
server's HSM), validates the signature against the server's CA, checks the audit log, and
stops everything it started. Every step is a real command line or a real client library.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import pyotp
import typer
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pkcs11.exceptions import PKCS11Error
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter
from pyhanko.sign import fields, signers
from pyhanko.sign.general import SigningError
from pyhanko.sign.pkcs11 import PKCS11Signer, open_pkcs11_session
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko.sign.validation.dss import DocumentSecurityStore
from pyhanko.sign.validation.errors import NoDSSFoundError
from pyhanko.sign.validation.settings import KeyUsageConstraints
from pyhanko.sign.validation.status import PdfSignatureStatus
from pyhanko_certvalidator import ValidationContext

from relay.config import CONFIG_ENV, RUNTIME_ENV
from vcard.doctor import PcscError, card_ready, list_readers

T = TypeVar("T")

OPENSC_PKCS11: Final = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
VPCD_DRIVER: Final = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
VPCD_PORT: Final = 35963
READER_PREFIX: Final = "cardbridge vpcd"
DEMO_USER: Final = "demo"
SIGNATURE_KEY_ID: Final = b"\x02"
"""OpenSC's PKCS#11 id of the PIV 9C (digital signature) key."""
OPENSC_CONF: Final = (
    "app default {\n framework pkcs15 {\n  pin_cache_ignore_user_consent = true;\n }\n}\n"
)
"""9C needs the PIN before each signature; pyHanko logs in once, so OpenSC re-verifies from
its PIN cache (field-notes)."""


class DemoFailed(Exception):
    """A step of the demo failed; the message says which and why."""


# --- PDFs: pyHanko through a PKCS#11 module, validation against a CA --------------------------


def sample_pdf(text: str) -> bytes:
    """A one-page PDF that shows ``text``, made with pyHanko's writer."""
    writer = PdfFileWriter()
    font = writer.add_object(
        generic.DictionaryObject(
            {
                generic.pdf_name("/Type"): generic.pdf_name("/Font"),
                generic.pdf_name("/Subtype"): generic.pdf_name("/Type1"),
                generic.pdf_name("/BaseFont"): generic.pdf_name("/Helvetica"),
            }
        )
    )
    safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 14 Tf 40 120 Td ({safe}) Tj ET".encode("latin-1", "replace")
    resources = generic.DictionaryObject(
        {generic.pdf_name("/Font"): generic.DictionaryObject({generic.pdf_name("/F1"): font})}
    )
    contents = writer.add_object(generic.StreamObject(stream_data=stream))
    writer.insert_page(
        PageObject(contents=contents, media_box=(0, 0, 420, 200), resources=resources)
    )
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def sign_pdf(pdf: bytes, module: str, pin: str, *, key_id: bytes) -> bytes:
    """Sign ``pdf`` (PAdES B-B) with the key and certificate ``key_id`` of the first token of
    the PKCS#11 ``module``."""
    session = open_pkcs11_session(module, slot_no=0, user_pin=pin)
    try:
        signer = PKCS11Signer(session, key_id=key_id, cert_id=key_id)
        meta = signers.PdfSignatureMetadata(
            field_name="Signature", subfilter=fields.SigSeedSubFilter.PADES
        )
        out = signers.sign_pdf(IncrementalPdfFileWriter(BytesIO(pdf)), meta, signer=signer)
        return bytes(out.getvalue())
    finally:
        session.close()


@dataclass(frozen=True)
class Validation:
    """pyHanko's verdict on one signature of a PDF."""

    intact: bool
    """The signed bytes are unchanged."""
    valid: bool
    """The signature is cryptographically valid and its certificate chains to the CA."""
    signer: str
    """The signing certificate's subject (RFC 4514)."""
    timestamp: bool | None
    """Its signature timestamp is valid and trusted (None: it has none)."""
    summary: str


SIGNER_KEY_USAGE: Final = KeyUsageConstraints(key_usage={"digital_signature", "non_repudiation"})
"""A PDF signer's certificate asserts digitalSignature (9A, an approval) or nonRepudiation
(9C, the PIV digital signature key); pyHanko's default asks for nonRepudiation alone."""


def pdf_status(
    pdf: bytes,
    ca: x509.Certificate,
    *,
    index: int = 0,
    long_term: bool = False,
    also_trusted: tuple[x509.Certificate, ...] = (),
) -> PdfSignatureStatus:
    """pyHanko's status of signature ``index`` of ``pdf`` with ``ca`` as the only trust anchor
    (and ``also_trusted``) and no network access.

    :param long_term: with only the validation data the PDF carries (its document security
        store, ETSI EN 319 142-1 B-LT), a certificate without revocation data being refused.
    """
    reader = PdfFileReader(BytesIO(pdf))
    embedded = reader.embedded_signatures[index]
    settings: dict[str, Any] = {
        "trust_roots": [asn1_x509.Certificate.load(c.public_bytes(Encoding.DER))
                        for c in (ca, *also_trusted)],  # fmt: skip
        "allow_fetching": False,
    }
    dss: DocumentSecurityStore | None = None
    if long_term:
        settings["revocation_mode"] = "hard-fail"
        try:
            dss = DocumentSecurityStore.read_dss(reader)
        except NoDSSFoundError:
            settings["crls"] = []  # nothing embedded, nothing to check revocation with

    def context() -> ValidationContext:
        return dss.as_validation_context(settings) if dss else ValidationContext(**settings)

    return asyncio.run(
        async_validate_pdf_signature(
            embedded, context(), ts_validation_context=context(),
            key_usage_settings=SIGNER_KEY_USAGE,
        )  # fmt: skip
    )


def validate_pdf(
    pdf: bytes, ca: x509.Certificate, *, index: int = 0, long_term: bool = False
) -> Validation:
    """:func:`pdf_status`, summed up."""
    status = pdf_status(pdf, ca, index=index, long_term=long_term)
    signer = x509.load_der_x509_certificate(status.signing_cert.dump()).subject
    stamp = status.timestamp_validity
    return Validation(
        intact=bool(status.intact),
        valid=bool(status.valid and status.trusted),
        signer=signer.rfc4514_string(),
        timestamp=None if stamp is None else bool(stamp.valid and stamp.trusted),
        summary=status.summary(),
    )


# --- the demo ---------------------------------------------------------------------------------


class Steps:
    """Numbered steps, each printed with its duration."""

    def __init__(self) -> None:
        self.number = 0
        self.started = time.monotonic()

    def run(self, title: str, action: Callable[[], T]) -> T:
        self.number += 1
        typer.secho(f"\n[{self.number}] {title}", bold=True)
        began = time.monotonic()
        try:
            result = action()
        except DemoFailed:
            typer.secho(f"    failed after {time.monotonic() - began:.2f} s", fg="red")
            raise
        typer.echo(f"    done in {time.monotonic() - began:.2f} s")
        return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cardbridge() -> str:
    here = Path(sys.executable).with_name("cardbridge")
    return str(here) if here.exists() else "cardbridge"


class Demo:
    """The demo's state: its directory, environment and the processes it started."""

    def __init__(self, work: Path, stack: ExitStack) -> None:
        self.work = work
        self.stack = stack
        self.data = work / "server"
        (work / "opensc.conf").write_text(OPENSC_CONF)
        # OpenSC reads it when its module loads: in this process (pyHanko) and in children.
        stack.enter_context(_environ("OPENSC_CONF", str(work / "opensc.conf")))
        self.env = {**os.environ, CONFIG_ENV: str(work / "card"), RUNTIME_ENV: str(work / "run")}
        self.url = ""
        self.enrollment: dict[str, Any] = {}

    def cli(self, *args: str, input: str | None = None, show: bool = True) -> str:
        """Run ``cardbridge ARGS`` and show the command (secrets in ``input`` stay hidden)."""
        if show:
            typer.echo("    $ cardbridge " + " ".join(args))
        proc = subprocess.run(
            [_cardbridge(), *args], input=input, capture_output=True, text=True,
            env=self.env, timeout=300, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise DemoFailed(f"cardbridge {args[0]} {args[1]}: {proc.stderr.strip()}")
        return proc.stdout

    def background(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``cardbridge ARGS`` in the background, logging to ``name.log``; it is stopped
        when the demo ends."""
        typer.echo("    $ cardbridge " + " ".join(args) + " &")
        log = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen([_cardbridge(), *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env)  # fmt: skip
        self.stack.callback(log.close)
        self.stack.callback(_stop, proc)
        return proc

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-2000:]


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen[Any] | None,
          log: Callable[[], str], timeout: float = 60) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DemoFailed(f"{what}: the process exited ({proc.returncode}):\n{log()}")
        if ready():
            return
        time.sleep(0.1)
    raise DemoFailed(f"{what}: not ready after {timeout:g} s:\n{log()}")


def _vpcd_reader() -> str | None:
    try:
        return next((r for r in list_readers() if r.startswith(READER_PREFIX)), None)
    except PcscError:
        return None


@contextmanager
def _pcscd(work: Path) -> Iterator[str]:
    """The vpcd reader: pcscd's if it already has one, else a pcscd started for the demo."""
    reader = _vpcd_reader()
    if reader is not None:
        typer.echo(f"    pcscd is running with the reader {reader!r}")
        yield reader
        return
    if shutil.which("pcscd") is None or not Path(VPCD_DRIVER).exists():
        raise DemoFailed("pcscd or vsmartcard-vpcd is missing: run scripts/bootstrap")
    if subprocess.run(["pgrep", "-x", "pcscd"], capture_output=True, check=False).returncode == 0:
        raise DemoFailed(
            "a pcscd without the vpcd reader is running: stop it (scripts/demo does) and retry"
        )
    conf = work / "reader.conf.d"
    conf.mkdir()
    (conf / "cardbridge-vpcd").write_text(
        f'FRIENDLYNAME "{READER_PREFIX}"\nDEVICENAME /dev/null:0x{VPCD_PORT:04X}\n'
        f"LIBPATH {VPCD_DRIVER}\nCHANNELID 0x{VPCD_PORT:04X}\n"
    )
    Path("/run/pcscd").mkdir(exist_ok=True)
    typer.echo(f"    $ pcscd -f -c {conf} &")
    proc = subprocess.Popen(["pcscd", "-f", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait("pcscd", lambda: _vpcd_reader() is not None, proc, lambda: "")
        reader = _vpcd_reader()
        assert reader is not None  # noqa: S101 -- just waited for it
        yield reader
    finally:
        _stop(proc)


def run_demo(out: Path | None) -> None:
    """The whole demo; raises :class:`DemoFailed` at the first failing step."""
    steps = Steps()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cardbridge-demo-")))
        demo = Demo(work, stack)
        typer.echo(f"cardbridge demo in {work}")

        def start_server() -> None:
            out = demo.cli("server", "init", "--data", str(demo.data))
            typer.echo("    " + out.strip().replace("\n", "\n    "))
            port = _free_port()
            demo.url = f"https://127.0.0.1:{port}"
            proc = demo.background("server", "server", "run", "--data", str(demo.data),
                                   "--bind", f"127.0.0.1:{port}")  # fmt: skip
            _wait("the server", lambda: (demo.data / "server.url").exists() and _healthy(demo),
                  proc, lambda: demo.log("server"))  # fmt: skip
            typer.echo(f"    serving {demo.url} (HTTPS, certificate from the server's own CA)")

        steps.run("Start a signing server (SQLite, SoftHSM2 token, built-in CA)", start_server)

        def enroll_user() -> None:
            password = f"demo-{os.urandom(6).hex()}"
            demo.cli("admin", "--data", str(demo.data), "user", "add", DEMO_USER,
                     "--password-stdin", input=password + "\n")  # fmt: skip
            demo.enrollment = json.loads(demo.cli(
                "admin", "--data", str(demo.data), "enroll", DEMO_USER, "--alg", "p256",
                "--json"))  # fmt: skip
            demo.enrollment["password"] = password
            typer.echo(f"    keys generated in the HSM for 9A, 9C, 9D, 9E; PIN "
                       f"{demo.enrollment['pin']}, PUK {demo.enrollment['puk']}")  # fmt: skip
            typer.echo(f"    one-time enrollment code: {demo.enrollment['enrollment_code']}")

        steps.run(f"Add the user {DEMO_USER!r} and enroll them (admin)", enroll_user)

        steps.run(
            "Enroll this workstation's card (device key, CA pinned by the code)",
            lambda: typer.echo("    " + demo.cli(
                "card", "enroll", "--server", demo.url, "--code",
                demo.enrollment["enrollment_code"]).strip().replace("\n", "\n    ")),
        )  # fmt: skip

        reader = steps.run(
            "Make sure pcscd serves vsmartcard's virtual reader (vpcd)",
            lambda: stack.enter_context(_pcscd(work)),
        )

        def present() -> None:
            proc = demo.background("card", "card", "run")
            _wait("the card", lambda: card_ready(reader), proc, lambda: demo.log("card"))
            typer.echo(f"    the card is in {reader!r}")

        steps.run("Present the card in the reader: cardbridge card run", present)

        def login() -> None:
            otp = pyotp.TOTP(pyotp.parse_uri(demo.enrollment["otp_uri"]).secret).now()
            typer.echo(f"    (the demo plays the user's authenticator app: TOTP {otp})")
            typer.echo("    " + demo.cli(
                "card", "login", "--password-stdin", "--otp", otp,
                input=demo.enrollment["password"] + "\n").strip())  # fmt: skip

        steps.run("Log in: password and TOTP, from the enrolled device (DPoP)", login)

        def sign() -> bytes:
            pdf = sample_pdf(f"Signed with cardbridge, {time.strftime('%Y-%m-%d %H:%M:%S')}")
            typer.echo(f"    pyHanko -> {OPENSC_PKCS11} -> the card (9C) -> relay -> server")
            try:
                signed = sign_pdf(pdf, OPENSC_PKCS11, demo.enrollment["pin"],
                                  key_id=SIGNATURE_KEY_ID)  # fmt: skip
            except (PKCS11Error, SigningError) as e:
                raise DemoFailed(f"signing failed ({type(e).__name__}: {e}); the card's log:\n"
                                 + demo.log("card")) from e  # fmt: skip
            typer.echo(f"    {len(pdf)} bytes in, {len(signed)} bytes out; only a digest "
                       "left this workstation")  # fmt: skip
            return signed

        signed = steps.run("Sign a PDF (PAdES B-B) through OpenSC's PKCS#11 module", sign)

        def validate() -> None:
            ca = x509.load_pem_x509_certificate((demo.data / "ca.pem").read_bytes())
            verdict = validate_pdf(signed, ca)
            typer.echo(f"    signer: {verdict.signer}")
            typer.echo(f"    intact: {verdict.intact}, valid and trusted: {verdict.valid}")
            if not (verdict.intact and verdict.valid):
                raise DemoFailed(f"the signature does not validate:\n{verdict.summary}")

        steps.run("Validate the signature with pyHanko, the server's CA as trust anchor",
                  validate)  # fmt: skip

        def audit() -> None:
            typer.echo("    " + demo.cli("admin", "--data", str(demo.data), "audit",
                                         "verify").strip())  # fmt: skip
            signs = json.loads(demo.cli("admin", "--data", str(demo.data), "audit", "export",
                                        "--event", "sign", "--json", show=False))  # fmt: skip
            last = signs[-1]["details"]
            typer.echo(f"    {len(signs)} sign record; it names the key use ({last['op']}, slot "
                       f"{last['slot'].upper()}), the digest {last['digest']}, node "
                       f"{last['node']} and request {last['request']}")  # fmt: skip

        steps.run("Check the hash-chained audit log", audit)
        if out is not None:
            out.write_bytes(signed)
            typer.echo(f"\nThe signed PDF: {out}")
        steps.number += 1
        typer.secho(f"\n[{steps.number}] Stop the card, the server and pcscd", bold=True)
    typer.echo(f"\nDone in {time.monotonic() - steps.started:.1f} s; everything the demo "
               "started is stopped and its directory removed.")  # fmt: skip


def _healthy(demo: Demo) -> bool:
    context = ssl.create_default_context(cafile=str(demo.data / "ca.pem"))
    try:
        with urllib.request.urlopen(f"{demo.url}/healthz", context=context, timeout=2) as r:  # noqa: S310
            return bool(r.status == 200)
    except OSError:
        return False


app = typer.Typer(invoke_without_command=True, help="Run the product's main job end to end.")


@app.callback()
def demo(
    out: Annotated[
        Path | None, typer.Option("--out", help="Keep the signed PDF here.", dir_okay=False)
    ] = None,
) -> None:
    """Server, enrollment, card, login, a PDF signed through OpenSC with pyHanko and validated:
    everything on embedded defaults in a temporary directory, stopped at the end."""
    try:
        run_demo(out)
    except DemoFailed as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
