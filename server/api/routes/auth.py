"""Authentication (``/api/v1/auth``): password + TOTP login of an enrolled device, refresh,
logout. The device proves possession of its key with a DPoP proof (RFC 9449) at login and on
every later request; the tokens it gets are bound to that key.
"""

from __future__ import annotations

from fastapi import Request, Response

from server.api.deps import SessionDep, SettingsDep, client_address, proof_key
from server.api.errors import documented_errors
from server.api.pipeline import APIRouter, PivUserDep
from server.schemas import LoginRequest, RefreshRequest, TokenResponse
from server.services import piv, tokens

router = APIRouter(
    prefix="/api/v1/auth", tags=["Authentication"], responses=documented_errors(400, 401, 403, 429)
)


def _pair(pair: tokens.TokenPair, bound: bool) -> TokenResponse:
    return TokenResponse(
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        token_type="DPoP" if bound else "Bearer",  # noqa: S106 -- the scheme's name
        expires_in=pair.expires_in,
        refresh_expires_in=pair.refresh_expires_in,
    )


@router.post("/login")
def login(
    session: SessionDep, settings: SettingsDep, request: Request, body: LoginRequest
) -> TokenResponse:
    """Password, TOTP and a DPoP proof of an enrolled device key → a short-lived access token
    and a refresh token, both bound to that key (rules 6 and 2)."""
    jkt = proof_key(session, request, required=True)
    pair = tokens.login(
        session, settings.policy, body.username, body.password, body.otp,
        address=client_address(request), jkt=jkt,
    )  # fmt: skip
    return _pair(pair, bound=True)


@router.post("/refresh")
def refresh(
    session: SessionDep, settings: SettingsDep, request: Request, body: RefreshRequest
) -> TokenResponse:
    """Rotate the refresh token: the old one and its access tokens stop working. A bound
    refresh token needs a DPoP proof of its key."""
    jkt = proof_key(session, request, required=False)
    pair = tokens.refresh(session, settings.policy, body.refresh_token, jkt=jkt)
    return _pair(pair, bound=jkt is not None)


@router.post("/logout", status_code=204)
def logout(session: SessionDep, user: PivUserDep) -> Response:
    """End this session (its refresh token, access tokens and PIN state included)."""
    piv.end_session(session, user)
    return Response(status_code=204)


routers = [router]
