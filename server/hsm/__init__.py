# SPDX-License-Identifier: Apache-2.0
"""The HSM layer: keys generated and used inside a PKCS#11 token (security rule 1).

- :class:`Hsm` (``server.hsm.pkcs11``): open a token, generate keys, sign, decrypt, ECDH.
- :mod:`server.hsm.keys`: cryptography private-key objects whose ``sign()`` runs in the HSM.
- :mod:`server.hsm.softhsm`: create the default SoftHSM2 token in a data directory.
- :mod:`server.hsm.secrets`: the server's own secret keys (audit MAC, sealing, RSA implicit
  rejection).
"""

from server.algorithms import KeyAlg
from server.hsm.pkcs11 import (
    HSM_CLOCK,
    Hsm,
    HsmClock,
    KeyRef,
    PublicKey,
    SecretKind,
    conceal_timing,
)

__all__ = [
    "HSM_CLOCK",
    "Hsm",
    "HsmClock",
    "KeyAlg",
    "KeyRef",
    "PublicKey",
    "SecretKind",
    "conceal_timing",
]
