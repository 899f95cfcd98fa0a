# SPDX-License-Identifier: Apache-2.0
"""The deployment's time-stamping authority (RFC 3161, with RFC 5816's ESSCertIDv2).

A request is a DER ``TimeStampReq``; the answer a DER ``TimeStampResp``: a token granted for a
well-formed request over a SHA-256/384/512 imprint, else a rejection that names the reason
(RFC 3161 §2.4.2 ``PKIFailureInfo``). The token is a CMS SignedData (RFC 5652) over the
``TSTInfo``, assembled from asn1crypto's structures and signed by the TSA key in the HSM; its
certificate is the one ``server init`` issued from the CA (critical EKU timeStamping).
Every granted timestamp is audited (``tsa.timestamp``).

The endpoint is public, and each token costs an HSM signature and an audit record, so each
client address has ``Policy.tsa_per_minute`` requests a minute, counted in the database like
the login budgets (:mod:`server.services.budgets`): every node spends the same budget, and
parallel requests cannot exceed it. A request beyond it is answered 429 unchecked, and audited
(``tsa.refused``).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from asn1crypto import algos, cms, tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session

from server.algorithms import CSC_HASHES, HASHES
from server.config import Policy
from server.errors import NotFound, RateLimited
from server.hsm import Hsm, KeyAlg, KeyRef
from server.models import TsaBudget
from server.services import audit, deployment
from server.services.budgets import WindowedBudget

POLICY: Final = "2.25.209779267664280726048299072619964882500"
"""The TSA policy this server's tokens name (RFC 3161 §2.1 item 5): a UUID-based OID
(ITU-T X.667), since the deployment has no registered arc of its own."""
ACCURACY_SECONDS: Final = 1
KEY_ALG: Final = KeyAlg.P256
"""The TSA key's type (``server init`` generates it); tokens are ECDSA with SHA-256."""
_DIGEST: Final = "sha256"
_SIGNATURE_ALGORITHM: Final = "sha256_ecdsa"
_HASH_OIDS: Final = {HASHES[name].oid: name for name in CSC_HASHES}
WINDOW: Final = timedelta(minutes=1)
"""The window of ``Policy.tsa_per_minute``."""
RATE_LIMITED: Final = "too many timestamp requests from this address; retry in a minute"

_REQUESTS = WindowedBudget(TsaBudget, ("address",), "used")


def spend_request(session: Session, policy: Policy, address: str) -> bool:
    """Count one ``/tsa`` request of ``address`` in the caller's transaction; False, with
    nothing counted, when its budget for the window is spent."""
    return _REQUESTS.spend(session, {"address": address}, policy.tsa_per_minute, WINDOW)


@dataclass(frozen=True)
class Refusal(Exception):
    """Why a request gets a rejection instead of a token (RFC 3161 §2.4.2)."""

    fail_info: str
    """The ``PKIFailureInfo`` bit, e.g. ``bad_alg``."""
    text: str


def _parse(der: bytes) -> tsp.TimeStampReq:
    """The request, fully parsed and checked.

    :raises Refusal: malformed, another version, an unsupported hash or imprint length, an
        unknown policy, or extensions (none is supported).
    """
    try:
        req = tsp.TimeStampReq.load(der, strict=True)
        req.native  # noqa: B018 -- parses every field now, not while answering
    except (ValueError, TypeError, KeyError) as e:
        raise Refusal("bad_data_format", "not a DER TimeStampReq") from e
    if req["version"].native != "v1":
        raise Refusal("bad_request", "only version 1 requests are answered")
    imprint = req["message_imprint"]
    name = _HASH_OIDS.get(imprint["hash_algorithm"]["algorithm"].dotted)
    if name is None:
        raise Refusal("bad_alg", "the imprint must be SHA-256, SHA-384 or SHA-512")
    if len(imprint["hashed_message"].native) != HASHES[name].size:
        raise Refusal("bad_data_format", "the imprint's length does not match its algorithm")
    policy = req["req_policy"]
    if policy.native is not None and policy.dotted != POLICY:
        raise Refusal("unaccepted_policy", f"this TSA's only policy is {POLICY}")
    if req["extensions"].native:
        raise Refusal("unaccepted_extensions", "no request extension is supported")
    return req


class _TimeStampResp(tsp.TimeStampResp):  # type: ignore[misc]  # asn1crypto is untyped
    """asn1crypto's ``TimeStampResp`` with ``timeStampToken OPTIONAL``, as RFC 3161 §2.4.2 has
    it: a rejection carries no token."""

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


def _rejection(refusal: Refusal) -> tsp.TimeStampResp:
    return _TimeStampResp(
        {
            "status": {
                "status": "rejection",
                "status_string": [refusal.text],
                "fail_info": tsp.PKIFailureInfo({refusal.fail_info}),
            }
        }
    )


def _signed_attributes(content: bytes, cert: asn1_x509.Certificate) -> cms.CMSAttributes:
    """contentType, messageDigest and signingCertificateV2 (RFC 3161 §2.4.2, RFC 5816 §2.2.1)."""
    ess_cert_id = tsp.ESSCertIDv2(
        {
            "cert_hash": hashlib.sha256(cert.dump()).digest(),
            "issuer_serial": {
                "issuer": [asn1_x509.GeneralName({"directory_name": cert.issuer})],
                "serial_number": cert.serial_number,
            },
        }
    )
    values = {
        "content_type": "tst_info",
        "message_digest": hashlib.new(_DIGEST, content).digest(),
        "signing_certificate_v2": tsp.SigningCertificateV2({"certs": [ess_cert_id]}),
    }
    return cms.CMSAttributes([{"type": kind, "values": [value]} for kind, value in values.items()])


def _token(
    tst_info: tsp.TSTInfo, hsm: Hsm, ref: KeyRef, cert: asn1_x509.Certificate, with_cert: bool
) -> cms.ContentInfo:
    """The CMS SignedData over ``tst_info``, signed by the TSA key in the HSM; the TSA's
    certificate is included when the request asked for it (RFC 3161 §2.4.1 certReq)."""
    content = tst_info.dump()
    attributes = _signed_attributes(content, cert)
    signature = hsm.sign_digest(
        ref, hashlib.new(_DIGEST, attributes.dump()).digest(), _DIGEST
    )
    digest_algorithm = algos.DigestAlgorithm({"algorithm": _DIGEST})
    signer = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": {
                        "issuer": cert.issuer,
                        "serial_number": cert.serial_number,
                    }
                }
            ),
            "digest_algorithm": digest_algorithm,
            "signed_attrs": attributes,
            "signature_algorithm": {"algorithm": _SIGNATURE_ALGORITHM},
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v3",
            "digest_algorithms": [digest_algorithm],
            "encap_content_info": {
                "content_type": "tst_info",
                "content": cms.ParsableOctetString(content),
            },
            "certificates": [cert] if with_cert else None,
            "signer_infos": [signer],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": signed_data})


def timestamp(
    session: Session,
    hsm: Hsm,
    request: bytes,
    *,
    policy: Policy,
    origin: audit.Origin,
    client: str,
) -> bytes:
    """Answer one DER ``TimeStampReq`` of the client address ``client`` with a DER
    ``TimeStampResp`` (granted or rejected); a granted token is audited in the caller's
    transaction with its serial number, time, imprint, ``origin`` and ``client``.

    :raises RateLimited: ``client`` spent its budget (module docstring); the refusal is audited
        and committed.
    :raises NotFound: the deployment has no TSA yet (``server init`` upgrades it).
    """
    client = client[:64]
    if not spend_request(session, policy, client):
        audit.append(
            session,
            actor=f"client:{client}",
            event=audit.Event.TSA_REFUSED,
            subject="tsa",
            details={"reason": RateLimited.code, **origin.details()},
        )
        raise RateLimited(RATE_LIMITED).recorded()
    row = deployment.find(session)
    if row is None:
        raise NotFound("this server has no deployment record: run `cardbridge server init`")
    ref, cert = deployment.tsa_of(row)
    try:
        req = _parse(request)
    except Refusal as refusal:
        return bytes(_rejection(refusal).dump())
    imprint = req["message_imprint"]
    serial = secrets.randbits(127) | 1 << 126  # unique, positive, 16 bytes (RFC 3161 §2.4.2)
    now = datetime.now(UTC).replace(microsecond=0)
    fields = {
        "version": "v1",
        "policy": POLICY,
        "message_imprint": imprint,
        "serial_number": serial,
        "gen_time": now,
        "accuracy": {"seconds": ACCURACY_SECONDS},
        "nonce": req["nonce"].native,
        "tsa": asn1_x509.GeneralName({"directory_name": _asn1(cert).subject}),
    }
    tst_info = tsp.TSTInfo({k: v for k, v in fields.items() if v is not None})
    token = _token(tst_info, hsm, ref, _asn1(cert), bool(req["cert_req"].native))
    audit.append(
        session,
        actor=f"client:{client}",
        event=audit.Event.TSA_TIMESTAMP,
        subject=f"timestamp:{serial:x}",
        details={
            "gen_time": now.isoformat(),
            "hash": _HASH_OIDS[imprint["hash_algorithm"]["algorithm"].dotted],
            "imprint": base64.b64encode(imprint["hashed_message"].native).decode(),
            **origin.details(),
        },
    )
    response = tsp.TimeStampResp({"status": {"status": "granted"}, "time_stamp_token": token})
    return bytes(response.dump())


def _asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))

