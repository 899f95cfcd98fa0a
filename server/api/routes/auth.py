"""Authentication (``/api/v1/auth``): password + TOTP login, refresh, logout."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.deps import CurrentUser, SessionDep, SettingsDep
from server.api.errors import documented_errors
from server.schemas import LoginRequest, RefreshRequest, TokenResponse
from server.services import signing, tokens

router = APIRouter(
    prefix="/api/v1/auth", tags=["Authentication"], responses=documented_errors(400, 401, 429)
)


def _pair(pair: tokens.TokenPair) -> TokenResponse:
    return TokenResponse(
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        expires_in=pair.expires_in,
    )


@router.post("/login")
def login(session: SessionDep, settings: SettingsDep, body: LoginRequest) -> TokenResponse:
    """Password and TOTP → a short-lived access token and a refresh token (rule 6)."""
    return _pair(tokens.login(session, settings.policy, body.username, body.password, body.otp))


@router.post("/refresh")
def refresh(session: SessionDep, settings: SettingsDep, body: RefreshRequest) -> TokenResponse:
    """Rotate the refresh token: the old one and its access tokens stop working."""
    return _pair(tokens.refresh(session, settings.policy, body.refresh_token))


@router.post("/logout", status_code=204)
def logout(session: SessionDep, user: CurrentUser) -> Response:
    """End the session of this access token (its refresh token and PIN state included)."""
    signing.end_session(session, user)
    return Response(status_code=204)


routers = [router]
