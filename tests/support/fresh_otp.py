"""TOTP codes the way a careful client uses them: a time step the server has not seen yet."""

from __future__ import annotations

import time

import pyotp

from server.models import utcnow


class FreshOtp:
    """Codes of ``totp``, each of a time step not used before (rule 6 accepts each step once).

    :param totp: the user's authenticator.
    """

    def __init__(self, totp: pyotp.TOTP) -> None:
        self.totp = totp
        self._last_step = -1

    def __call__(self) -> str:
        """The current step, else the next one (the server accepts one step of drift), else it
        waits for the next step. Never the previous step: the server checks the PIN (argon2id)
        before the OTP, and a step boundary passing meanwhile would put that code out of the
        window."""
        now = self.totp.timecode(utcnow())
        if self._last_step > now:
            time.sleep(self.totp.interval - utcnow().timestamp() % self.totp.interval + 0.05)
            now = self.totp.timecode(utcnow())
        self._last_step = max(now, self._last_step + 1)
        return self.totp.generate_otp(self._last_step)
