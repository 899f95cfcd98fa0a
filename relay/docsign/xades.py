# SPDX-License-Identifier: Apache-2.0
"""XAdES (ETSI EN 319 132-1) with signxml: an XML signature (XML-DSig 1.1) whose signed
properties carry the signing time and the digest of the signing certificate
(SigningCertificateV2). Enveloped (the signature inside the document, the default) or detached
(a signature file that references the document by a relative URI). B-T adds the
SignatureTimeStamp over the canonical SignatureValue (§5.3); B-LT the CertificateValues and
RevocationValues (§5.5) that validate the signature and the timestamp.

signxml does the canonicalisation and the references; lxml builds the unsigned properties,
which no signed reference covers.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import quote

from cryptography import x509
from lxml import etree
from signxml.algorithms import (
    CanonicalizationMethod,
    DigestAlgorithm,
    SignatureConstructionMethod,
    SignatureMethod,
)
from signxml.exceptions import SignXMLException
from signxml.xades.xades import XAdESDataObjectFormat, XAdESSigner

from relay.docsign.document import InputError, Run
from relay.docsign.keys import remote_key
from relay.docsign.longterm import Level
from relay.docsign.remote import Credential, Participant

NS_DS: Final = "http://www.w3.org/2000/09/xmldsig#"
NS_XADES: Final = "http://uri.etsi.org/01903/v1.3.2#"
C14N: Final = CanonicalizationMethod.CANONICAL_XML_1_0
"""Canonical XML 1.0: what XML-DSig applies to a same-document reference without transforms
(§4.4.3.2), and signxml adds none to the XAdES references it makes."""
TIMESTAMP_C14N: Final = CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0
NAMESPACES: Final = {"ds": NS_DS, "xades": NS_XADES}
T = TypeVar("T")


def _parse(data: bytes) -> etree._ElementTree:
    """The document, without fetching or expanding anything it names (no XXE)."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        return etree.parse(BytesIO(data), parser)
    except etree.XMLSyntaxError as e:
        raise InputError(f"not XML ({e.msg})") from e


def _methods(credential: Credential) -> tuple[SignatureMethod, DigestAlgorithm]:
    kind = "ECDSA" if credential.is_ec else "RSA"
    digest = credential.digest.upper()
    return SignatureMethod[f"{kind}_{digest}"], DigestAlgorithm[digest]


async def _in_thread(work: Callable[[], T]) -> T:
    """Run ``work`` in a thread of its own: it blocks until the batch it waits for is signed,
    which needs every other document of the batch, so a bounded pool could deadlock."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as e:  # noqa: BLE001 -- handed to the awaiting task
            loop.call_soon_threadsafe(done.set_exception, e)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    threading.Thread(target=run, name="xades", daemon=True).start()
    return await done


def _xades(tag: str) -> str:
    return f"{{{NS_XADES}}}{tag}"


def _b64(der: bytes) -> str:
    return base64.b64encode(der).decode("ascii")


class Xades:
    """XAdES baseline signatures."""

    name = "xades"
    packagings: tuple[str, ...] = ("enveloped", "detached")

    def output_name(self, source: Path, packaging: str) -> str:
        if packaging == "detached":
            return f"{source.stem}.xades.xml"
        return f"{source.stem}-signed{source.suffix or '.xml'}"

    def check(self, data: bytes, packaging: str) -> None:
        tree = _parse(data)
        root = tree.getroot()
        if tree.docinfo.internalDTD is not None or tree.docinfo.externalDTD is not None:
            raise InputError("the document has a DTD, which signxml refuses (its entities could "
                             "change what the signature covers)")  # fmt: skip
        siblings = [*root.itersiblings(preceding=True), *root.itersiblings()]
        if packaging == "detached" and any(isinstance(n, etree._ProcessingInstruction)
                                           for n in siblings):  # fmt: skip
            raise InputError(
                "a detached signature covers the root element, not the processing "
                "instructions around it: sign it enveloped"
            )
        if root.tag == f"{{{NS_DS}}}Signature":
            raise InputError("the file is an XML signature already")
        if packaging == "enveloped" and root.find(".//ds:Signature", NAMESPACES) is not None:
            raise InputError(
                "the document holds an XML signature already (another enveloped one would "
                "break it; sign it --packaging detached)"
            )

    async def sign(
        self, data: bytes, source: Path, out: Path, run: Run, participant: Participant
    ) -> bytes:
        credential = participant.credential
        tree = _parse(data)
        method, digest = _methods(credential)
        signer = XAdESSigner(
            method=SignatureConstructionMethod[run.packaging],
            signature_algorithm=method,
            digest_algorithm=digest,
            c14n_algorithm=C14N,
            data_object_format=XAdESDataObjectFormat(
                Description=source.name, MimeType="application/xml"
            ),
        )
        key = remote_key(participant, asyncio.get_running_loop())
        chain = [x509.load_der_x509_certificate(c.dump()) for c in credential.chain]
        # The data's location as seen from the signature file (RFC 3986 §4.2).
        uri = quote(Path(os.path.relpath(source.resolve(), out.resolve().parent)).as_posix())
        try:
            signature = await _in_thread(
                lambda: signer.sign(
                    tree.getroot(), key=key, cert=chain, always_add_key_value=False,
                    reference_uri=uri if run.packaging == "detached" else None,
                )  # fmt: skip
            )
        except SignXMLException as e:
            raise InputError(f"signxml: {e}") from e
        document = signature
        if run.packaging == "enveloped":  # signxml signed a copy of the root element
            signature = document.find("ds:Signature", NAMESPACES)
        if run.timestamper is not None:
            await self._timestamp(signature, run, credential)
        return bytes(etree.tostring(document, xml_declaration=True, encoding="UTF-8"))

    async def _timestamp(self, signature: etree._Element, run: Run, credential: Credential) -> None:
        """The unsigned properties of B-T (§5.3) and B-LT (§5.5)."""
        assert run.timestamper is not None  # noqa: S101 -- the caller checked
        value = signature.find("ds:SignatureValue", NAMESPACES)
        canonical = etree.tostring(value, method="c14n", exclusive=True, with_comments=False)
        token = await run.timestamper.async_timestamp(credential.hash(canonical), credential.digest)
        properties = signature.find(".//xades:QualifyingProperties", NAMESPACES)
        unsigned = etree.SubElement(
            etree.SubElement(properties, _xades("UnsignedProperties")),
            _xades("UnsignedSignatureProperties"),
        )
        stamp = etree.SubElement(unsigned, _xades("SignatureTimeStamp"))
        etree.SubElement(
            stamp, f"{{{NS_DS}}}CanonicalizationMethod", Algorithm=TIMESTAMP_C14N.value
        )
        etree.SubElement(stamp, _xades("EncapsulatedTimeStamp")).text = _b64(token.dump())
        if run.level is Level.B_LT and run.validation is not None:
            tsa_certs = await run.validation.check_timestamp(token)
            values = etree.SubElement(unsigned, _xades("CertificateValues"))
            for cert in tsa_certs:
                etree.SubElement(values, _xades("EncapsulatedX509Certificate")).text = _b64(
                    cert.dump()
                )
            crls = etree.SubElement(
                etree.SubElement(unsigned, _xades("RevocationValues")), _xades("CRLValues")
            )
            for crl in run.validation.crls:
                etree.SubElement(crls, _xades("EncapsulatedCRLValue")).text = _b64(crl.dump())
