"""A soft card whose backend hangs on one ECDSA digest, like a remote backend whose server
does not answer; run as ``python hanging_card.py DIR VPCD APDU_TIMEOUT HANG_SECONDS``.

Every ECDSA signature over :data:`HANG_DIGEST` takes ``HANG_SECONDS``; everything else is
the soft card as ``cardbridge card run --soft DIR`` presents it.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

from vcard.card import VirtualCard
from vcard.constants import Slot
from vcard.softkeys import SoftKeyBackend
from vcard.vpcd import VpcdLink, parse_address

HANG_DIGEST = b"\xee" * 32


class HangingBackend(SoftKeyBackend):
    hang_seconds = 0.0

    def ecdsa_sign(self, slot: Slot, digest: bytes) -> bytes:
        if digest == HANG_DIGEST:
            time.sleep(self.hang_seconds)
        return super().ecdsa_sign(slot, digest)


def main(directory: str, vpcd: str, apdu_timeout: str, hang_seconds: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    backend = HangingBackend.open(Path(directory))
    backend.hang_seconds = float(hang_seconds)
    host, port = parse_address(vpcd)
    link = VpcdLink(VirtualCard(backend), host, port, apdu_timeout=float(apdu_timeout))
    signal.signal(signal.SIGTERM, lambda *_: link.stop())
    link.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
