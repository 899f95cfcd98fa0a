# SPDX-License-Identifier: Apache-2.0
"""Several processes open one SoftHSM2 token at the same moment, as ``server run --workers N``
does: every open and the signature after it must succeed (a login rewrites the token files)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from hsm_fixtures import HsmToken

from server.hsm import Hsm, KeyAlg, KeyRef
from server.hsm.pkcs11 import LOCK_FILE

pytestmark = pytest.mark.hsm

PROCESSES = 4
OPENS = 16


def _open_and_sign(job: tuple[HsmToken, str, KeyRef, int, object]) -> list[tuple[bytes, bytes]]:
    """In a fresh process: open the token ``OPENS`` times (each a new login) and sign once each."""
    token, conf, ref, worker, start = job
    os.environ["SOFTHSM2_CONF"] = conf
    start.wait()  # type: ignore[attr-defined]
    out = []
    for n in range(OPENS):
        digest = hashlib.sha256(f"{worker}/{n}".encode()).digest()
        with Hsm.open(token.module, token.label, token.pin) as h:
            out.append((digest, h.sign_digest(ref, digest, "sha256")))
    return out


@pytest.mark.slow
def test_processes_opening_one_token_at_once_all_sign(hsm: Hsm, hsm_token: HsmToken) -> None:
    ref = hsm.generate_key(KeyAlg.P256, f"procs-{uuid.uuid4().hex[:8]}")
    pub = hsm.public_key(ref)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that loaded the module
    with ctx.Manager() as manager:
        start = manager.Event()
        jobs = [(hsm_token, os.environ["SOFTHSM2_CONF"], ref, w, start) for w in range(PROCESSES)]
        with ctx.Pool(PROCESSES) as pool:
            pending = pool.map_async(_open_and_sign, jobs)
            start.set()
            results = pending.get(timeout=120)
    signatures = [pair for chunk in results for pair in chunk]
    assert len(signatures) == PROCESSES * OPENS
    for digest, sig in signatures:
        pub.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def _open_after_a_general_error(job: tuple[HsmToken, str, KeyRef]) -> tuple[int, bytes]:
    """In a fresh process: the first login fails with CKR_GENERAL_ERROR, the open retries."""
    from pkcs11 import exceptions as p11e

    from server.hsm import pkcs11 as hsm_module

    token, conf, ref = job
    os.environ["SOFTHSM2_CONF"] = conf
    real_login, calls = hsm_module._login, []

    def flaky_login(tok: object, pin: str) -> object:
        calls.append(pin)
        if len(calls) == 1:
            raise p11e.GeneralError()
        return real_login(tok, pin)

    hsm_module._login = flaky_login  # type: ignore[assignment]
    with Hsm.open(token.module, token.label, token.pin) as h:
        return len(calls), h.sign_digest(ref, bytes(32), "sha256")


def test_open_retries_a_general_error_and_leaves_a_lock_file(hsm: Hsm, hsm_token: HsmToken) -> None:
    ref = hsm.generate_key(KeyAlg.P256, f"retry-{uuid.uuid4().hex[:8]}")
    conf = os.environ["SOFTHSM2_CONF"]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        calls, sig = pool.apply(_open_after_a_general_error, ((hsm_token, conf, ref),))
    assert calls == 2
    pub = hsm.public_key(ref)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, bytes(32), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert (Path(conf).parent / LOCK_FILE).is_file()
