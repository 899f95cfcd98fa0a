# SPDX-License-Identifier: Apache-2.0
"""PAdES (ETSI EN 319 142-1) with pyHanko: an incremental update that adds a signature field
(visible when it has a box), so the signatures already in the document stay valid. B-T adds
the signature timestamp; B-LT the document security store (the chain, the CRL and the
timestamp's chain), so the signature validates without the network.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Final

from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.misc import PdfError
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers
from pyhanko.sign.general import SigningError

from relay.docsign.document import InputError, Run
from relay.docsign.keys import RemoteSigner
from relay.docsign.longterm import Level
from relay.docsign.remote import Participant

FIELD_PREFIX: Final = "Signature"


def _reader(data: bytes) -> PdfFileReader:
    try:
        return PdfFileReader(BytesIO(data))
    except (PdfError, ValueError) as e:
        raise InputError(f"not a PDF ({e})") from e


def _new_field_name(reader: PdfFileReader) -> str:
    """``Signature<n>``, the first that the document does not have."""
    taken = {name for name, _, _ in fields.enumerate_sig_fields(reader)}
    n = 1
    while f"{FIELD_PREFIX}{n}" in taken:
        n += 1
    return f"{FIELD_PREFIX}{n}"


class Pades:
    """PAdES baseline signatures."""

    name = "pades"
    packagings: tuple[str, ...] = ("enveloped",)

    def output_name(self, source: Path, packaging: str) -> str:
        return f"{source.stem}-signed{source.suffix or '.pdf'}"

    def check(self, data: bytes, packaging: str) -> None:
        if _reader(data).encrypted:
            raise InputError(
                "the PDF is encrypted (it has an encryption dictionary); decrypt it first"
            )

    async def sign(
        self, data: bytes, source: Path, out: Path, run: Run, participant: Participant
    ) -> bytes:
        try:
            writer = IncrementalPdfFileWriter(BytesIO(data))
            mine = participant.credential.certificate.dump()
            if any(s.signer_cert.dump() == mine for s in writer.prev.embedded_signatures):
                raise InputError("the PDF already holds a signature of this signer")
            look = run.appearance
            name = look.field or _new_field_name(writer.prev)
            long_term = run.level is Level.B_LT and run.validation is not None
            meta = signers.PdfSignatureMetadata(
                field_name=name,
                md_algorithm=participant.credential.digest,
                subfilter=fields.SigSeedSubFilter.PADES,
                embed_validation_info=long_term,
                validation_context=run.validation.context() if run.validation else None,
            )
            spec = None
            if look.box is not None:
                page = look.page - 1 if look.page > 0 else look.page
                spec = fields.SigFieldSpec(sig_field_name=name, on_page=page, box=look.box)
            pdf_signer = signers.PdfSigner(
                meta, RemoteSigner(participant), timestamper=run.timestamper,
                new_field_spec=spec,
            )  # fmt: skip
            signed = await pdf_signer.async_sign_pdf(writer)
        except (PdfError, SigningError) as e:
            raise InputError(str(e).strip().partition("\n")[0]) from e
        return bytes(signed.getvalue())
