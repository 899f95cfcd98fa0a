"""vcard: a PIV smart card (NIST SP 800-73-4) emulated in Python, pure and synchronous."""
