"""The CSC API: ``/csc/v2/…`` (v2.0.0.2, canonical) and ``/csc/v1/…`` (v1.0.4.0 aliases for
pyHanko, SetaPDF, Laverca). Both accept both generations of field names (the schemas alias
them); they differ only in how credentials/info describes the user factors (v1 ``authMode`` +
``PIN`` + ``OTP``, v2 ``auth``). Every answer is 200 + JSON except auth/revoke (204).
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import Depends, Request, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from server.algorithms import KeyAlg, key_algos
from server.api.deps import (
    HsmDep,
    OriginDep,
    SessionDep,
    SettingsDep,
    client_address,
    proof_key,
)
from server.api.errors import documented_errors
from server.api.pipeline import APIRouter, UserDep
from server.config import Policy
from server.errors import Forbidden, Unauthorized
from server.schemas import (
    BasicCredentials,
    CertificatesChoice,
    CscAuthInfo,
    CscAuthObject,
    CscAuthorizeRequest,
    CscAuthorizeResponse,
    CscCertInfo,
    CscCredentialInfo,
    CscCredentialsInfoRequest,
    CscCredentialsListRequest,
    CscCredentialsListResponse,
    CscExtendTransactionRequest,
    CscInfoRequest,
    CscInfoResponse,
    CscKeyInfo,
    CscLoginRequest,
    CscLoginResponse,
    CscRevokeRequest,
    CscSignAlgorithms,
    CscSignatureFormats,
    CscSignHashRequest,
    CscSignHashResponse,
    CscV1Factor,
    b64encode,
)
from server.services import csc, keyuse, tokens
from server.services.keyuse import KeyUse

_basic = HTTPBasic(auto_error=False, description="The user's password (CSC auth/login)")
BasicDep = Annotated[HTTPBasicCredentials | None, Depends(_basic)]

Version = Literal["v1", "v2"]

_METHODS = [
    "auth/login",
    "auth/revoke",
    "credentials/list",
    "credentials/info",
    "credentials/authorize",
    "credentials/extendTransaction",
    "signatures/signHash",
]
_SPECS: dict[Version, str] = {"v1": "1.0.4.0", "v2": "2.0.0.2"}


@lru_cache(maxsize=4)
def _ca_der(path: Path) -> bytes | None:
    """The deployment CA certificate (DER) for ``certificates: chain``, if there is one."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)
    except (OSError, ValueError):
        return None


def _csc_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")


def _cert_info(
    cred: KeyUse, choice: CertificatesChoice, cert_info: bool, ca_cert: Path | None
) -> CscCertInfo | None:
    if cred.cert_pem is None:
        return None
    cert = x509.load_pem_x509_certificate(cred.cert_pem.encode())
    now = datetime.now(UTC)
    expired = not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    info = CscCertInfo(status="expired" if expired else "valid")
    if choice is not CertificatesChoice.none:
        chain = [cert.public_bytes(Encoding.DER)]
        ca = _ca_der(ca_cert) if ca_cert is not None else None
        if choice is CertificatesChoice.chain and ca is not None and ca != chain[0]:
            chain.append(ca)
        info.certificates = [b64encode(der) for der in chain]
    if cert_info:
        info.issuerDN = cert.issuer.rfc4514_string()
        info.subjectDN = cert.subject.rfc4514_string()
        info.serialNumber = format(cert.serial_number, "x")
        info.validFrom = _csc_time(cert.not_valid_before_utc)
        info.validTo = _csc_time(cert.not_valid_after_utc)
    return info


def describe(
    cred: KeyUse,
    policy: Policy,
    version: Version,
    *,
    certificates: CertificatesChoice,
    cert_info: bool,
    auth_info: bool,
    ca_cert: Path | None,
) -> CscCredentialInfo:
    """credentials/info of one credential (CSC v2 §11.5, v1 §11.5)."""
    alg = cred.key.alg
    curve = alg.curve_oid
    key = CscKeyInfo(status="enabled", algo=key_algos(alg), len=alg.bits, curve=curve)
    info = CscCredentialInfo(
        description=f"PIV {cred.slot.upper()} key of {cred.owner}",
        key=key,
        cert=_cert_info(cred, certificates, cert_info, ca_cert),
        SCAL="2",
        multisign=policy.multisign,
    )
    otp = keyuse.otp_required(policy, cred, keyuse.Via.CSC)
    if version == "v1":
        info.authMode = "explicit"
        info.PIN = CscV1Factor(presence="true", format="A", label="PIN")
        info.OTP = CscV1Factor(
            presence="true" if otp else "false",
            type="offline",
            format="N",
            ID="totp",
            label="One-time password",
        )
    elif auth_info:
        objects = [CscAuthObject(type="Password", id="PIN", format="A", label="PIN")]
        if otp:
            objects.append(
                CscAuthObject(
                    type="Password", id="OTP", format="N", generator="totp", label="TOTP"
                )
            )
        expression = " AND ".join(o.id for o in objects)
        info.auth = CscAuthInfo(mode="explicit", expression=expression, objects=objects)
    return info


def _router(version: Version) -> APIRouter:
    router = APIRouter(
        prefix=f"/csc/{version}",
        tags=[f"Signing (CSC {version})"],
        responses=documented_errors(400, 401, 403, 404, 429),
    )

    @router.post("/info", response_model_exclude_none=True)
    def info(body: CscInfoRequest | None = None) -> CscInfoResponse:
        """Service description (no authentication)."""
        return CscInfoResponse(
            specs=_SPECS[version],
            name="cardbridge",
            logo="https://cardbridge.invalid/logo.png",
            region="EU",
            lang="en-US",
            description="PIV keys in an HSM (SCAL 2 means hash pinning, not EN 419 241 SCAL2)",
            authType=["basic"],
            methods=_METHODS,
            signAlgorithms=CscSignAlgorithms(
                algos=key_algos(KeyAlg.RSA2048) + key_algos(KeyAlg.P256)
            )
            if version == "v2"
            else None,
            signature_formats=CscSignatureFormats(formats=["P", "C"], envelope_properties=[])
            if version == "v2"
            else None,
        )

    @router.post("/auth/login", response_model_exclude_none=True)
    def login(
        session: SessionDep,
        settings: SettingsDep,
        basic: BasicDep,
        request: Request,
        body: CscLoginRequest | None = None,
    ) -> CscLoginResponse:
        """HTTP Basic with the user's password → access token (the OTP, when the credential
        asks for one, goes into credentials/authorize). A ``refresh_token`` in the body
        rotates that token instead. With a DPoP proof of an enrolled device key (RFC 9449)
        the tokens are bound to it."""
        body = body or CscLoginRequest()
        if body.refresh_token is None and basic is None:
            raise Unauthorized("HTTP Basic authentication with the user's password is required")
        jkt = proof_key(session, request, required=False)
        if body.refresh_token is not None:
            pair = tokens.refresh(session, settings.policy, body.refresh_token, jkt=jkt)
        else:
            assert basic is not None  # noqa: S101 -- checked above
            credentials = BasicCredentials.checked(basic.username, basic.password)
            pair = tokens.login(
                session,
                settings.policy,
                credentials.username,
                credentials.password,
                None,
                address=client_address(request),
                require_otp=False,
                jkt=jkt,
            )
        return CscLoginResponse(
            access_token=pair.access_token,
            refresh_token=pair.refresh_token if body.rememberMe or body.refresh_token else None,
            expires_in=pair.expires_in,
        )

    @router.post("/auth/revoke", status_code=204)
    def revoke(session: SessionDep, user: UserDep, body: CscRevokeRequest) -> Response:
        """Revoke one of the caller's tokens; a refresh token takes its access tokens along."""
        tokens.revoke(session, body.token, owner=user)
        return Response(status_code=204)

    @router.post("/credentials/list", response_model_exclude_none=True)
    def credentials_list(
        session: SessionDep,
        settings: SettingsDep,
        user: UserDep,
        body: CscCredentialsListRequest,
    ) -> CscCredentialsListResponse:
        """The caller's own signing credentials (never another user's)."""
        if body.userID is not None and body.userID != user.name:
            raise Forbidden("a user may only list their own credentials")
        creds = csc.list_credentials(session, user)
        if body.maxResults is not None:
            creds = creds[: body.maxResults]
        infos = (
            [
                describe(
                    csc.credential(session, user, c.id),
                    settings.policy,
                    version,
                    certificates=body.certificates,
                    cert_info=body.certInfo,
                    auth_info=body.authInfo,
                    ca_cert=settings.ca_cert,
                )
                for c in creds
            ]
            if body.credentialInfo
            else None
        )
        return CscCredentialsListResponse(
            credentialIDs=[c.id for c in creds],
            credentialInfos=infos,
            onlyValid=body.onlyValid if version == "v2" else None,
        )

    @router.post("/credentials/info", response_model_exclude_none=True)
    def credentials_info(
        session: SessionDep,
        settings: SettingsDep,
        user: UserDep,
        body: CscCredentialsInfoRequest,
    ) -> CscCredentialInfo:
        """Key algorithms (composite OIDs), certificate chain (end entity first), SCAL 2,
        multisign and the factors credentials/authorize needs."""
        cred = csc.credential(session, user, body.credentialID)
        return describe(
            cred,
            settings.policy,
            version,
            certificates=body.certificates,
            cert_info=body.certInfo,
            auth_info=body.authInfo or version == "v2",
            ca_cert=settings.ca_cert,
        )

    @router.post("/credentials/authorize", response_model_exclude_none=True)
    def credentials_authorize(
        session: SessionDep, settings: SettingsDep, user: UserDep, body: CscAuthorizeRequest
    ) -> CscAuthorizeResponse:
        """PIN (+ OTP) → a SAD bound to the caller, the credential, the count and the hashes."""
        grant = csc.authorize(
            session,
            settings.policy,
            user,
            credential_id=body.credentialID,
            num_signatures=body.numSignatures,
            hashes=body.hashes,
            hash_oid=body.hashAlgorithmOID,
            factors=csc.Factors.from_request(
                body.PIN, body.OTP, [(a.id, a.value) for a in body.authData]
            ),
        )
        return CscAuthorizeResponse(SAD=grant.sad, expiresIn=grant.expires_in)

    @router.post("/credentials/extendTransaction", response_model_exclude_none=True)
    def credentials_extend(
        session: SessionDep, user: UserDep, body: CscExtendTransactionRequest
    ) -> CscAuthorizeResponse:
        """A fresh SAD for what the current one has left, narrowed to some of its pinned hashes
        if given; it expires with the original authorization."""
        grant = csc.extend_transaction(
            session,
            user,
            credential_id=body.credentialID,
            sad_value=body.SAD,
            hashes=body.hashes,
            hash_oid=body.hashAlgorithmOID,
        )
        return CscAuthorizeResponse(SAD=grant.sad, expiresIn=grant.expires_in)

    @router.post("/signatures/signHash", response_model_exclude_none=True)
    def sign_hash(
        session: SessionDep,
        hsm: HsmDep,
        origin: OriginDep,
        user: UserDep,
        body: CscSignHashRequest,
    ) -> CscSignHashResponse:
        """Sign each digest the SAD covers, then spend it; signatures in input order, standard
        base64."""
        signatures = csc.sign_hash(
            session,
            hsm,
            user,
            credential_id=body.credentialID,
            sad_value=body.SAD,
            hashes=body.hashes,
            hash_oid=body.hashAlgorithmOID,
            sign_algo_oid=body.signAlgo,
            sign_algo_params=body.signAlgoParams,
            origin=origin,
        )
        return CscSignHashResponse(signatures=[b64encode(s) for s in signatures])

    return router


routers = [_router("v2"), _router("v1")]
