# SPDX-License-Identifier: Apache-2.0
"""CAdES (ETSI EN 319 122-1): a CMS SignedData (RFC 5652) built by pyHanko, with the signed
signing-certificate-v2 (RFC 5035) and signing-time attributes; detached (the content stays in
its file) or enveloping (the content inside). B-T adds the signature-time-stamp attribute
(RFC 3161 appendix A); B-LT puts the validation data where EN 319 122-1 §6.3 wants it for the
baseline: the CA and TSA certificates in ``certificates``, the CRL in ``crls``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from asn1crypto import cms
from pyhanko.sign.general import SigningError

from relay.docsign.document import InputError, Run
from relay.docsign.keys import RemoteSigner
from relay.docsign.longterm import Level, ValidationData
from relay.docsign.remote import Participant

SUFFIXES: Final = {"detached": ".p7s", "enveloping": ".p7m"}
"""RFC 5751 §3.2.1's names: a detached signature, and signed data with its content."""
PEM_MARKERS: Final = (b"-----BEGIN PKCS7-----", b"-----BEGIN CMS-----")


def _is_signed_data(data: bytes) -> bool:
    """Whether ``data`` is a CMS SignedData already (DER, or PEM)."""
    if data.lstrip().startswith(PEM_MARKERS):
        return True
    try:
        info = cms.ContentInfo.load(data, strict=True)
        return bool(info["content_type"].native == "signed_data")
    except (ValueError, TypeError, KeyError):
        return False


async def _add_validation_data(signed: cms.ContentInfo, data: ValidationData) -> None:
    """The certificates (the signer's chain and the timestamp's) and the CRL that validate
    the signature and its timestamp."""
    content = signed["content"]
    certificates = [c.chosen for c in content["certificates"]]
    for attribute in content["signer_infos"][0]["unsigned_attrs"]:
        if attribute["type"].native == "signature_time_stamp_token":
            for token in attribute["values"]:
                certificates += await data.check_timestamp(token)
    certificates.append(data.ca)
    unique = {c.dump(): c for c in certificates}
    content["certificates"] = [cms.CertificateChoices({"certificate": c}) for c in unique.values()]
    content["crls"] = [cms.RevocationInfoChoice({"crl": c}) for c in data.crls]


class Cades:
    """CAdES baseline signatures."""

    name = "cades"
    packagings: tuple[str, ...] = ("detached", "enveloping")

    def output_name(self, source: Path, packaging: str) -> str:
        return source.name + SUFFIXES[packaging]

    def check(self, data: bytes, packaging: str) -> None:
        if _is_signed_data(data):
            raise InputError("the file is a CMS signature already")

    async def sign(
        self, data: bytes, source: Path, out: Path, run: Run, participant: Participant
    ) -> bytes:
        try:
            signed = await RemoteSigner(participant).async_sign_general_data(
                data,
                participant.credential.digest,
                detached=run.packaging == "detached",
                use_cades=True,
                timestamper=run.timestamper,
            )
        except SigningError as e:
            raise InputError(str(e)) from e
        if run.level is Level.B_LT and run.validation is not None:
            await _add_validation_data(signed, run.validation)
        return bytes(signed.dump())
