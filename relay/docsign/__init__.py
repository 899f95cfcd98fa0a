# SPDX-License-Identifier: Apache-2.0
"""``cardbridge sign``: PAdES, CAdES and XAdES signatures made with the enrolled user's 9C key,
whose private half stays in the server's HSM: only digests leave the workstation.

- :mod:`relay.docsign.remote`: the CSC calls (through the running card, or a session of its
  own), the credential, and the batch that signs every document's digest under as few
  authorizations as the credential allows;
- :mod:`relay.docsign.keys`: the remote key as pyHanko's signer and as cryptography's key;
- :mod:`relay.docsign.longterm`: timestamps (RFC 3161) and revocation data for B-T and B-LT;
- :mod:`relay.docsign.document`: what the formats share; :mod:`relay.docsign.pades`,
  :mod:`relay.docsign.cades` (pyHanko) and :mod:`relay.docsign.xades` (signxml);
- :mod:`relay.docsign.cli`: the command.
"""
