"""The end-to-end benchmark behind ``scripts/bench-e2e``: C_Sign through the whole chain.

python-pkcs11 loads OpenSC's PKCS#11 module in this process and signs with the 9A key of a
card enrolled with a real ``cardbridge server run`` (SQLite, SoftHSM2, one worker): OpenSC ->
pcscd -> vpcd -> ``cardbridge card run`` -> relay (HTTPS, DPoP) -> server -> SoftHSM2. The time
of one signature is split with the relay's own measurements (``card status`` ``stats``: the
HTTPS call) and the server's ``Server-Timing`` (its processing, and the HSM's part of it):

    card   = C_Sign - relay call   (OpenSC, PC/SC, vpcd, the card core)
    relay  = relay call - server   (proof, TLS, loopback, parsing on both ends)
    server = server - HSM          (pipeline, token, proof, policy, audit, commit)
    HSM    = SoftHSM2's signature through python-pkcs11

Then the relay -> server hop alone: ``/api/v1/credentials/{id}/ecdsa`` from one kept-alive
client in this process, its latency and the server's CPU per operation (from /proc), beside an
empty ``GET /healthz`` on the same connection, and what the server's check of one DPoP proof
costs (the same check, in this process).
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pkcs11
import pyotp
from bench_common import CARDBRIDGE, PASSWORD, BenchServer, cli, cpu_seconds, wait
from pkcs11 import Mechanism, ObjectClass

from relay import control
from relay.client import ServerClient
from relay.config import CONTROL_SOCKET, Enrolled
from relay.session import Session
from server.services import dpop
from vcard.doctor import card_answers, card_ready, percentile

READER = "cardbridge vpcd 00 00"
MODULE = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
YUBIKEY_MS = {"p256": 72.0, "rsa2048": 138.0}
TARGET_MS = {"p256": 10.0, "rsa2048": 15.0}
MECHANISM = {"p256": Mechanism.ECDSA_SHA256, "rsa2048": Mechanism.SHA256_RSA_PKCS}
NAME = {"p256": "P-256 (ECDSA-SHA256)", "rsa2048": "RSA-2048 (SHA256-RSA-PKCS)"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def verdict(value: float, target: float) -> str:
    return "meets target" if value <= target else "MISSES target"


class Bench:
    """The server and what the cards share."""

    def __init__(self, work: Path, signatures: int, hops: int) -> None:
        self.work, self.signatures, self.hops = work, signatures, hops
        self.server = BenchServer(work, "--workers", "1")
        self.url, self.context = self.server.url, self.server.context

    def close(self) -> None:
        self.server.close()

    def card(self, alg: str) -> None:
        enrollment, env = self.server.enroll(f"bench-{alg}", alg)
        card = subprocess.Popen([CARDBRIDGE, "card", "run"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)  # fmt: skip
        try:
            wait(lambda: card_ready(READER), f"the {alg} card in {READER}")
            otp = pyotp.TOTP(pyotp.parse_uri(enrollment["otp_uri"]).secret)
            cli("card", "login", "--password-stdin", "--otp", otp.now(), env=env,
                input=PASSWORD + "\n")  # fmt: skip
            times = self.sign_loop(alg, enrollment["pin"], env)
            self.report(alg, times, self.stats(env), rss_mb(card.pid))
            if alg == "p256":
                self.hop(enrollment, env, otp)
        finally:
            card.send_signal(signal.SIGTERM)
            card.wait(30)
            wait(lambda: not card_answers(READER), "the card's removal")

    def sign_loop(self, alg: str, pin: str, env: dict[str, str]) -> list[float]:
        lib = pkcs11.lib(MODULE)
        token = next(iter(lib.get_slots(token_present=True))).get_token()
        data = b"benchmark payload " * 4
        with token.open(user_pin=pin) as session:
            key: Any = session.get_key(ObjectClass.PRIVATE_KEY, id=b"\x01")
            for _ in range(20):
                key.sign(data, mechanism=MECHANISM[alg])
            self.stats(env, clear=True)
            times = []
            for _ in range(self.signatures):
                t0 = time.perf_counter()
                key.sign(data, mechanism=MECHANISM[alg])
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    def stats(self, env: dict[str, str], *, clear: bool = False) -> dict[str, Any]:
        """The running card's timings of its key operations (relay, server, HSM)."""
        socket_path = Path(env["CARDBRIDGE_RUNTIME_DIR"]) / CONTROL_SOCKET
        return control.request(socket_path, "stats", clear=clear)

    def report(self, alg: str, times: list[float], split: dict[str, Any], rss: float) -> None:
        total = statistics.median(times)
        relay, server, hsm = (split[k]["p50"] for k in ("relay_ms", "server_ms", "hsm_ms"))
        print(f"C_Sign {NAME[alg]}, slot 9A, {len(times)} signatures in one session, PIN "
              "verified once")  # fmt: skip
        print(f"  p50 {total:7.3f} ms   p99 {percentile(times, 99):7.3f} ms   target <= "
              f"{TARGET_MS[alg]:g} ms p50: {verdict(total, TARGET_MS[alg])}")  # fmt: skip
        print(f"  split of the p50s: card {total - relay:6.3f} ms | relay {relay - server:6.3f} ms"
              f" | server {server - hsm:6.3f} ms | HSM {hsm:6.3f} ms")  # fmt: skip
        print(f"  YubiKey 5 (published): {YUBIKEY_MS[alg]:.0f} ms, "
              f"{YUBIKEY_MS[alg] / total:.1f}x the remote card's p50")  # fmt: skip
        print(f"  card process RSS afterwards: {rss:.0f} MB (target <= 80 MB): "
              f"{verdict(rss, 80)}")  # fmt: skip
        print()

    def hop(self, enrollment: dict[str, Any], env: dict[str, str], otp: pyotp.TOTP) -> None:
        """The relay -> server key operation alone, from one kept-alive client."""
        enrolled = Enrolled.load(Path(env["CARDBRIDGE_CONFIG"]))
        client = ServerClient([self.url], enrolled.config.ca_pem, enrolled.device)
        session = Session(client, enrolled.config.user)
        session.login(PASSWORD, otp.at(time.time() + otp.interval))  # a step not used yet
        session.call("POST", "/api/v1/pin/verify", json={"pin": enrollment["pin"]})
        cred = enrolled.config.credential("9a")
        assert cred is not None
        path = f"/api/v1/credentials/{cred.credential_id}/ecdsa"
        body = {"digest": base64.b64encode(hashlib.sha256(b"hop").digest()).decode()}
        http = httpx.Client(base_url=self.url, verify=self.context)

        def measure(call: Callable[[], object]) -> tuple[list[float], float]:
            for _ in range(50):
                call()
            cpu0 = cpu_seconds(self.server.pid)
            times = []
            for _ in range(self.hops):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            return times, (cpu_seconds(self.server.pid) - cpu0) / self.hops * 1e3

        ops, op_cpu = measure(lambda: session.call("POST", path, json=body))
        empty, empty_cpu = measure(lambda: http.get("/healthz"))
        session.logout()
        client.close()
        http.close()
        p50 = statistics.median(ops)
        print(f"relay -> server key operation (POST {path.replace(cred.credential_id, '{id}')}"
              f", P-256), one kept-alive client, {self.hops} operations")  # fmt: skip
        print(f"  p50 {p50:7.3f} ms   p99 {percentile(ops, 99):7.3f} ms   target <= 2 ms: "
              f"{verdict(p50, 2.0)}")  # fmt: skip
        print(f"  server CPU per operation {op_cpu:6.3f} ms   target <= 1 ms: "
              f"{verdict(op_cpu, 1.0)}")  # fmt: skip
        print(f"  an empty GET /healthz on the same kind of connection: p50 "
              f"{statistics.median(empty):.3f} ms, server CPU {empty_cpu:.3f} ms")  # fmt: skip
        print(f"  the server's check of one DPoP proof (RFC 9449, in this process): "
              f"{self.proof_check_ms(enrolled, self.url + path):.3f} ms of CPU")  # fmt: skip
        print()

    def proof_check_ms(self, enrolled: Enrolled, url: str) -> float:
        """CPU of :func:`server.services.dpop.verify_proof` per proof of the device key."""
        token = base64.urlsafe_b64encode(os.urandom(24)).decode()  # bound by ath, never sent
        proofs = [enrolled.device.proof("POST", url, access_token=token) for _ in range(self.hops)]
        cpu0 = time.thread_time()
        for proof in proofs:
            dpop.verify_proof(proof, method="POST", url=url, access_token=token)
        return (time.thread_time() - cpu0) / len(proofs) * 1e3


def main() -> None:
    work, signatures, hops = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    print(f"cardbridge end-to-end benchmark: OpenSC -> pcscd -> vpcd -> card -> relay -> "
          f"server -> SoftHSM2, {time.strftime('%F %T')}, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    print()
    bench = Bench(work, signatures, hops)
    try:
        for alg in ("p256", "rsa2048"):
            bench.card(alg)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
