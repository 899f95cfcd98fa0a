# SPDX-License-Identifier: Apache-2.0
"""Management key (9B) block cipher: one ECB block of 3DES or AES (SP 800-73-4 Part 2
§3.2.4 and Appendix A.1, challenge/response with the card administration key)."""

from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherAlgorithm, algorithms, modes

from vcard.constants import MgmtAlg


def _cipher(alg: MgmtAlg, key: bytes) -> Cipher[modes.ECB]:
    if len(key) != alg.key_len:
        raise ValueError(f"a {alg.name} key is {alg.key_len} bytes")
    algorithm: CipherAlgorithm = TripleDES(key) if alg is MgmtAlg.TDES else algorithms.AES(key)
    # One block per challenge is what the protocol defines; ECB is the spec's mode here.
    return Cipher(algorithm, modes.ECB())  # noqa: S305


def encrypt_block(alg: MgmtAlg, key: bytes, block: bytes) -> bytes:
    """Encrypt exactly one block (8 bytes for 3DES, 16 for AES)."""
    if len(block) != alg.block_size:
        raise ValueError(f"a {alg.name} block is {alg.block_size} bytes")
    encryptor = _cipher(alg, key).encryptor()
    return encryptor.update(block) + encryptor.finalize()
