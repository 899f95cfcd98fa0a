"""The document-signing benchmark behind ``scripts/bench-sign``: PAdES B-T through
``cardbridge sign`` beside pyHanko with a local key file, on the same small PDFs, in one run;
then the time per document of each format (PAdES, CAdES, XAdES at B-T), many files in one run
against one file per run.

A real ``cardbridge server run`` (one worker, SQLite, SoftHSM2, HTTPS on loopback) signs with
an enrolled user's P-256 9C key; its ``/tsa`` stamps every run, so every run pays the same
timestamp round trips. The server's policy lets one authorization cover the most digests a
request may carry (``multisign`` 64, the CSC API's limit) and asks no TOTP of
``credentials/authorize`` (``csc_authorize_otp`` false, as a deployment may choose), so COUNT
documents take one run of ``cardbridge sign``: a login, then an authorization and a
``signHash`` per 64 documents.

1. pyHanko, a local P-256 key file (PEM, loaded by ``SimpleSigner.load``): each document signed
   as PAdES B-T, one after another, then all at once (``asyncio.gather``), the same
   timestamper (pyHanko's ``HTTPTimeStamper`` on one kept-alive connection to ``/tsa``); the
   faster of the two is the local-key rate.
2. ``cardbridge sign --format pades --level B-T`` on the same files, run in this process (its
   typer command, as the console script runs it, without the interpreter's start-up) so that
   every request it makes to the server is timed: the time with at least one server request in
   flight (CSC calls and ``/tsa``), the server's own time of the CSC calls (``Server-Timing``;
   ``/tsa`` is public and sends none), and the server process's CPU over the run (``/proc``).
3. ``cardbridge sign --format cades`` and ``--format xades`` (B-T) on COUNT small files each in
   one run, and every format on SINGLES files one run each (each run its own login,
   authorization, signHash and logout): milliseconds per document, and single over batch.

The figure is cardbridge's files per second as a share of the local key's (target >= 50 %).
Outputs are checked afterwards, untimed: pyHanko validates a sample of each PAdES run (intact,
trusted, with a valid timestamp), ``openssl cms -verify`` the CAdES and signxml's XAdES
verifier the XAdES samples, the server's CA the trust anchor.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import typer
from bench_common import PASSWORD, BenchServer, cpu_seconds, fail
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers, timestamps
from signxml.exceptions import SignXMLException
from signxml.xades.xades import XAdESVerifier

from relay import client as relay_client
from relay.demo import pdf_status, sample_pdf
from relay.docsign import cli as sign_cli
from server.schemas import MAX_BATCH

USER = "bench-signer"
TARGET = 0.5
"""cardbridge's files per second as a share of the local key's."""
CHECKED = 5
"""Outputs of each run that are validated afterwards."""
FORMATS = ("pades", "cades", "xades")
DOCUMENTS: dict[str, Callable[[int], tuple[str, bytes]]] = {
    "pades": lambda n: (f"doc{n:03d}.pdf", sample_pdf(f"document {n} of the benchmark")),
    "cades": lambda n: (f"doc{n:03d}.txt", f"document {n} of the benchmark\n".encode() * 20),
    "xades": lambda n: (f"doc{n:03d}.xml", f"<?xml version='1.0'?>\n<invoice xmlns="
                        f"'urn:example:bench'><number>{n}</number><total>12.50</total>"
                        "</invoice>".encode()),
}  # fmt: skip
"""The small documents each format signs: a one-page PDF, 600 bytes of text, an XML invoice."""


# --- the server's requests, timed from this side ---------------------------------------------


@dataclass
class Request:
    path: str
    started: float
    ended: float
    server_ms: float | None
    """The server's own time (``Server-Timing`` app), when it sends one."""
    hsm_ms: float | None


@dataclass
class Recorder:
    """Times every request the relay's HTTPS client sends (``ServerClient._send``)."""

    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = relay_client.ServerClient._send

        def timed(client: relay_client.ServerClient, method: str, path: str, **kw: Any) -> Any:
            started = time.perf_counter()
            response, url = original(client, method, path, **kw)
            ended = time.perf_counter()
            timing = relay_client._server_timing(response.headers.get("Server-Timing"))
            with self.lock:
                self.requests.append(
                    Request(path, started, ended, timing.get("app"), timing.get("hsm"))
                )
            return response, url

        relay_client.ServerClient._send = timed  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            relay_client.ServerClient._send = original  # type: ignore[method-assign]

    def in_flight(self, paths: Callable[[str], bool] = lambda _: True) -> float:
        """Seconds during which at least one of the requests was waiting for the server."""
        spans = sorted((r.started, r.ended) for r in self.requests if paths(r.path))
        total, end = 0.0, float("-inf")
        for start, stop in spans:
            if stop > end:
                total += stop - max(start, end)
                end = stop
        return total


def issue(
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signing_key: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate for ``name`` valid for a day, issued by ``issuer`` (None: self-signed)
    with ``signing_key``, with these (extension, critical) pairs."""
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder().subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )  # fmt: skip
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(signing_key, hashes.SHA256())


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    files: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.files / self.seconds


class Bench:
    """The server, the enrolled user and the documents."""

    def __init__(self, work: Path, count: int) -> None:
        self.work, self.count = work, count
        self.server = BenchServer(work, "--log-level", "warning", policy={
            "multisign": MAX_BATCH, "csc_authorize_otp": False, "tsa_per_minute": 1_000_000})
        self.url, self.context = self.server.url, self.server.context
        self.ca_pem = self.server.ca_pem
        self.ca = x509.load_pem_x509_certificate(self.ca_pem.read_bytes())
        self.inputs: dict[str, list[Path]] = {}
        for fmt, make in DOCUMENTS.items():
            folder = work / "in" / fmt
            folder.mkdir(parents=True)
            self.inputs[fmt] = []
            for n in range(count):
                name, data = make(n)
                (folder / name).write_bytes(data)
                self.inputs[fmt].append(folder / name)
        self.sources = self.inputs["pades"]
        self.pin = work / USER / "pin"

    def close(self) -> None:
        self.server.close()

    # --- pyHanko with a local key file ---

    def local_signer(self) -> tuple[signers.SimpleSigner, x509.Certificate]:
        """A P-256 key file and its certificate from a CA of its own (as a user's soft token
        would be), loaded the way pyHanko's documentation shows."""
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = issue("bench local CA", ca_key.public_key(), None, ca_key, [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True),
        ])  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue("bench local signer", key.public_key(), ca_cert, ca_key, [
            (x509.KeyUsage(True, True, False, False, False, False, False, False, False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
        ])  # fmt: skip
        local = self.work / "local"
        local.mkdir()
        pem = serialization.Encoding.PEM
        (local / "key.pem").write_bytes(key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
        (local / "cert.pem").write_bytes(cert.public_bytes(pem))
        (local / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
        signer = signers.SimpleSigner.load(
            str(local / "key.pem"), str(local / "cert.pem"),
            ca_chain_files=(str(local / "ca.pem"),),
        )  # fmt: skip
        if signer is None:
            fail("pyHanko did not load the local key file")
        return signer, ca_cert

    def local(self, signer: signers.SimpleSigner, concurrent: bool) -> Run:
        out = self.work / ("local-gather" if concurrent else "local-loop")
        out.mkdir()
        meta = signers.PdfSignatureMetadata(
            field_name="Signature1", md_algorithm="sha256", subfilter=fields.SigSeedSubFilter.PADES
        )

        async def sign_all() -> float:
            connector = aiohttp.TCPConnector(ssl=self.context)
            async with aiohttp.ClientSession(connector=connector) as session:
                stamper = timestamps.HTTPTimeStamper(f"{self.url}/tsa", session=session)
                await stamper.async_dummy_response("sha256")  # sized once, not per document
                pdf_signer = signers.PdfSigner(meta, signer, timestamper=stamper)

                async def one(source: Path) -> None:
                    writer = IncrementalPdfFileWriter(io.BytesIO(source.read_bytes()))
                    signed = await pdf_signer.async_sign_pdf(writer)
                    (out / f"{source.stem}-signed.pdf").write_bytes(signed.getvalue())

                started = time.perf_counter()
                if concurrent:
                    await asyncio.gather(*(one(s) for s in self.sources))
                else:
                    for source in self.sources:
                        await one(source)
                return time.perf_counter() - started

        seconds = asyncio.run(sign_all())
        name = "all at once (asyncio.gather)" if concurrent else "one after another"
        return Run(f"pyHanko, local key file, {name}", self.count, seconds)

    # --- cardbridge sign ---

    def enroll(self) -> None:
        """The benchmark's user, its card's configuration (no card runs; ``cardbridge sign``
        runs in this process, so in its environment) and its PIN file."""
        enrollment, env = self.server.enroll(USER, "p256")
        os.environ.update(env)
        self.pin.write_text(enrollment["pin"] + "\n")

    def cardbridge(self, fmt: str, sources: list[Path], out: Path) -> float:
        """``cardbridge sign --format FMT --level B-T SOURCES --out-dir OUT`` in this process
        (its typer command with the console script's arguments); the seconds it took, once
        every file is signed."""
        args = ["--format", fmt, "--level", "B-T", *map(str, sources), "--out-dir", str(out),
                "--pin-file", str(self.pin), "--password-stdin", "--json"]  # fmt: skip
        command = typer.main.get_command(sign_cli.app)
        stdout = io.StringIO()
        stdin, sys.stdin = sys.stdin, io.StringIO(PASSWORD + "\n")
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(stdout):
                command.main(args=args, prog_name="cardbridge sign", standalone_mode=True)
        except SystemExit as e:
            if e.code:
                fail(f"cardbridge sign exited {e.code}: {stdout.getvalue()[-2000:]}")
        finally:
            sys.stdin = stdin
        seconds = time.perf_counter() - started
        report: dict[str, Any] = json.loads(stdout.getvalue())
        if not all(r["ok"] for r in report["results"]):
            fail(f"cardbridge sign did not sign every file: {report['results']}")
        return seconds

    # --- afterwards, untimed ---

    def outputs(self, directory: Path, pattern: str, count: int) -> list[Path]:
        """A sample of the ``count`` outputs in ``directory``."""
        found = sorted(directory.glob(pattern))
        if len(found) != count:
            fail(f"{directory.name}: {len(found)} signed files, not {count}")
        return found[:: max(1, len(found) // CHECKED)][:CHECKED]

    def check_pades(
        self, directory: Path, count: int, also_trusted: tuple[x509.Certificate, ...] = ()
    ) -> None:
        """pyHanko validates a sample: intact, trusted with the server's CA (and
        ``also_trusted``, the local key's CA) as the only anchors, a valid timestamp."""
        for path in self.outputs(directory, "*-signed.pdf", count):
            status = pdf_status(path.read_bytes(), self.ca, also_trusted=also_trusted)
            stamp = status.timestamp_validity
            if not (status.bottom_line and stamp is not None and stamp.trusted):
                fail(f"{path} does not validate as PAdES B-T: {status.summary()}")

    def check_cades(self, directory: Path, count: int) -> None:
        """``openssl cms -verify`` a sample of detached signatures against their documents."""
        for path in self.outputs(directory, "*.p7s", count):
            content = self.inputs["cades"][0].with_name(path.name.removesuffix(".p7s"))
            proc = subprocess.run(
                ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(path),
                 "-content", str(content), "-CAfile", str(self.ca_pem), "-out", os.devnull],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode:
                fail(f"openssl cms -verify {path}: {proc.stderr.strip()}")

    def check_xades(self, directory: Path, count: int) -> None:
        """signxml's XAdES verifier on a sample of enveloped signatures."""
        for path in self.outputs(directory, "*-signed.xml", count):
            try:
                XAdESVerifier().verify(path.read_bytes(), ca_pem_file=str(self.ca_pem))
            except SignXMLException as e:
                fail(f"{path} does not verify as XAdES: {e}")

    def check(self, fmt: str, directory: Path, count: int) -> None:
        if fmt == "pades":
            self.check_pades(directory, count)
        elif fmt == "cades":
            self.check_cades(directory, count)
        else:
            self.check_xades(directory, count)


def report_pades(runs: list[Run], cardbridge: Run, recorder: Recorder, server_cpu: float) -> None:
    for run in [*runs, cardbridge]:
        print(f"{run.name:<52} {run.files} files in {run.seconds:6.2f} s  "
              f"{run.rate:6.1f} files/s")  # fmt: skip
    reqs = recorder.requests
    tsa = [r for r in reqs if r.path == "/tsa"]
    csc = [r for r in reqs if r.path.startswith("/csc/")]
    authorizations = sum(1 for r in csc if r.path.endswith("authorize"))
    waiting = recorder.in_flight()
    print(f"  requests to the server: {len(csc)} CSC ({authorizations} authorizations of <= "
          f"{MAX_BATCH} documents, one signHash each), {len(tsa)} /tsa, "
          f"{len(reqs) - len(csc) - len(tsa)} other")  # fmt: skip
    print(f"  time with a server request in flight: {waiting:6.2f} s = "
          f"{waiting / cardbridge.seconds:5.1%} of the run (CSC "
          f"{recorder.in_flight(lambda p: p.startswith('/csc/')):5.2f} s, /tsa "
          f"{recorder.in_flight(lambda p: p == '/tsa'):5.2f} s)")  # fmt: skip
    sign_hash = [r for r in csc if r.path.endswith("signHash")]
    server_ms = sum(r.server_ms or 0 for r in csc)
    hsm_ms = sum(r.hsm_ms or 0 for r in csc)
    per_sign_hash = statistics.mean(r.server_ms or 0 for r in sign_hash)
    print(f"  server's own time of the CSC calls (Server-Timing): {server_ms:7.1f} ms, of it "
          f"HSM {hsm_ms:6.1f} ms; signHash {per_sign_hash:.1f} ms per request of up to "
          f"{MAX_BATCH} hashes")  # fmt: skip
    if tsa:
        median_ms = statistics.median((r.ended - r.started) * 1e3 for r in tsa)
        print(f"  /tsa round trip as the client saw it: median {median_ms:.1f} ms")
    print(f"  server process CPU over the run: {server_cpu:5.2f} s = "
          f"{server_cpu / cardbridge.seconds:5.1%} of the run's wall time, "
          f"{server_cpu / cardbridge.files * 1e3:.1f} ms per file")  # fmt: skip
    best = max(runs, key=lambda r: r.rate)
    ratio = cardbridge.rate / best.rate
    verdict = "meets target" if ratio >= TARGET else "MISSES target"
    print(f"ratio: cardbridge {cardbridge.rate:.1f} files/s / local key {best.rate:.1f} files/s "
          f"({best.name.removeprefix('pyHanko, local key file, ')}) = {ratio:.1%}; "
          f"target >= {TARGET:.0%}: {verdict}")  # fmt: skip


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    work, count, singles = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    print(f"cardbridge document-signing benchmark: {count} small documents per format at B-T, "
          f"{time.strftime('%F %T')}, {os.cpu_count()} CPUs, {load()}")  # fmt: skip
    print("server: cardbridge server run, one worker, SQLite, SoftHSM2, HTTPS on loopback; "
          "P-256 keys; every timestamp from the server's /tsa")  # fmt: skip
    print()
    bench = Bench(work, count)
    try:
        signer, local_ca = bench.local_signer()
        bench.enroll()
        runs = [bench.local(signer, concurrent=False), bench.local(signer, concurrent=True)]
        recorder = Recorder()
        cpu0 = cpu_seconds(bench.server.pid)
        with recorder.installed():
            seconds = bench.cardbridge("pades", bench.sources, work / "batch-pades")
        server_cpu = cpu_seconds(bench.server.pid) - cpu0
        pades = Run("cardbridge sign (remote 9C key)", count, seconds)
        print(f"PAdES B-T, {count} PDFs:")
        report_pades(runs, pades, recorder, server_cpu)

        print()
        print(f"cardbridge sign per document at B-T: {count} files in one run (batch) against "
              f"{singles} runs of one file (single: a login, authorization, signHash and "
              "logout each)")  # fmt: skip
        print(f"  {'format':<8} {'batch ms/doc':>13} {'single ms/doc':>14} {'single/batch':>13}")
        for fmt in FORMATS:
            batch = seconds if fmt == "pades" else bench.cardbridge(
                fmt, bench.inputs[fmt], work / f"batch-{fmt}")  # fmt: skip
            single_out = work / f"single-{fmt}"
            each = [bench.cardbridge(fmt, [source], single_out)
                    for source in bench.inputs[fmt][:singles]]  # fmt: skip
            per_batch, per_single = batch / count * 1e3, statistics.mean(each) * 1e3
            print(f"  {fmt:<8} {per_batch:13.1f} {per_single:14.1f} "
                  f"{per_single / per_batch:12.1f}x")  # fmt: skip
            bench.check(fmt, work / f"batch-{fmt}", count)
            bench.check(fmt, single_out, singles)
        for directory in ("local-loop", "local-gather"):
            bench.check_pades(work / directory, count, also_trusted=(local_ca,))
        print(f"checked: a sample of each run's outputs validates (pyHanko, openssl cms, "
              f"signxml); {load()}")  # fmt: skip
    finally:
        bench.close()


if __name__ == "__main__":
    main()
