"""The server's wire contract: pydantic models of the CSC API (v1.0.4.0 and v2.0.0.2) and of
the project's own ``/api/v1`` (authentication, PIV operations, administration).

CSC models accept both generations of field names on both paths (``hash``/``hashes``,
``hashAlgo``/``hashAlgorithmOID``, top-level ``PIN``/``OTP`` and ``authData``) and ignore
unknown fields (Laverca sends ``remeberMe``); see reference/csc-api.md §1 and §4.
Binary values travel as standard, padded base64 only (RFC 4648 §4): ``-`` and ``_`` are refused
because Python's lenient decoder would silently drop them.

Every request field has a length limit, and every string in a request body must be valid
Unicode without NUL (a lone surrogate such as ``"\ud800"`` cannot even be encoded, and
PostgreSQL stores no NUL): bad input is a validation error, answered 400 ``invalid_request``
before anything reaches a service or the database (rule 8).
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from server.errors import InvalidRequest

MAX_BATCH = 64
"""Most digests one authorize/signHash call may carry (pyHanko batches are far smaller)."""


MAX_B64 = 16384
"""Longest base64 value accepted (a 4096-bit block, a certificate or an EdDSA message)."""


def _b64decode(value: Any) -> bytes:
    """Decode standard padded base64 strictly; anything else is a validation error."""
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    if len(value) > MAX_B64:
        raise ValueError(f"base64 value longer than {MAX_B64} characters")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("invalid base64 (standard alphabet with padding expected)") from e


def _check_b64(value: str) -> str:
    _b64decode(value)
    return value


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, the only encoding the server emits."""
    return base64.b64encode(data).decode("ascii")


Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_b64decode),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "maxLength": MAX_B64}),
]
"""Request field carrying binary data as standard base64 (decoded to ``bytes``)."""

Base64Str = Annotated[
    str,
    AfterValidator(_check_b64),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "maxLength": MAX_B64}),
]
"""Request field carrying standard base64 that a later parser decodes (e.g. DER parameters)."""

def _nfkc(value: Any) -> Any:
    return unicodedata.normalize("NFKC", value) if isinstance(value, str) else value


Oid = Annotated[str, StringConstraints(pattern=r"^[0-2](\.(0|[1-9][0-9]*))+$", max_length=128)]
Name = Annotated[
    str,
    BeforeValidator(_nfkc),
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"),
]
"""A user name, NFKC-normalised (so ``ＡＬＩＣＥ`` is ``ALICE``); names are unique without
regard to case (:func:`server.services.users.name_key`)."""
Secret = Annotated[str, StringConstraints(min_length=1, max_length=256)]
ShortText = Annotated[str, StringConstraints(max_length=500)]
Address = Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$", max_length=254)]
CredentialId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Lang = Annotated[str, StringConstraints(max_length=35)]
"""A language tag (RFC 5646; 35 characters is the practical limit of §4.4.1)."""
ClientData = Annotated[str, StringConstraints(max_length=1024)]
"""CSC ``clientData``: accepted, never used."""
SlotName = Annotated[str, StringConstraints(min_length=1, max_length=8)]
"""A slot as a path segment (``9c``); unknown ones are a 404."""


def _clean_strings(value: Any) -> None:
    """Refuse strings that are not valid Unicode text: a lone surrogate (JSON allows
    ``"\ud800"``, UTF-8 cannot encode it) or NUL, in any key or value, however nested."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("strings may not contain NUL")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("strings must be valid Unicode (no lone surrogates)") from e
    elif isinstance(value, dict):
        for key, item in value.items():
            _clean_strings(key)
            _clean_strings(item)
    elif isinstance(value, list):
        for item in value:
            _clean_strings(item)


class _Request(BaseModel):
    """Every request body: its strings are checked once, before any field (rule 8)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _clean_strings(data)
        return data


class _Lenient(_Request):
    """CSC request bodies: unknown fields are ignored, as the spec's clients expect."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Strict(_Request):
    """Bodies of the project's own API: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class ErrorResponse(BaseModel):
    """Every error response (CSC v2 §10): a stable code and a human readable description."""

    error: str
    error_description: str
    retries: int | None = None
    """With ``invalid_pin`` and ``invalid_puk``: the tries left (the card answers 63Cx)."""


# --- CSC -------------------------------------------------------------------------------------


class CscInfoRequest(_Lenient):
    lang: Lang | None = None


class CscSignAlgorithms(BaseModel):
    algos: list[str]
    algoParams: list[str] = []


class CscSignatureFormats(BaseModel):
    formats: list[str]
    envelope_properties: list[list[str]]


class CscInfoResponse(BaseModel):
    specs: str
    name: str
    logo: str
    region: str
    lang: str
    description: str
    authType: list[str]
    methods: list[str]
    signAlgorithms: CscSignAlgorithms | None = None
    signature_formats: CscSignatureFormats | None = None
    conformance_levels: list[str] | None = None


class CscLoginRequest(_Lenient):
    refresh_token: Secret | None = None
    rememberMe: bool = False
    clientData: ClientData | None = None


class BasicCredentials(_Strict):
    """The user name and password of CSC ``auth/login``'s HTTP Basic header, held to the same
    limits as a JSON login."""

    username: Name
    password: Secret

    @classmethod
    def checked(cls, username: str, password: str) -> BasicCredentials:
        """Validate the header's credentials.

        :raises InvalidRequest: a name or a password outside the limits (400, before the
            database).
        """
        try:
            return cls(username=username, password=password)
        except ValidationError as e:
            where = ".".join(str(p) for p in e.errors()[0]["loc"])
            raise InvalidRequest(f"HTTP Basic {where}: {e.errors()[0]['msg']}") from None


class CscLoginResponse(BaseModel):
    access_token: str
    refresh_token: str | None = None
    expires_in: int


class CscRevokeRequest(_Lenient):
    token: Secret
    token_type_hint: Literal["access_token", "refresh_token"] | None = None
    clientData: ClientData | None = None


class CertificatesChoice(StrEnum):
    none = "none"
    single = "single"
    chain = "chain"


class CscCredentialsListRequest(_Lenient):
    userID: Annotated[str, StringConstraints(max_length=256)] | None = None
    credentialInfo: bool = False
    certificates: CertificatesChoice = CertificatesChoice.single
    certInfo: bool = False
    authInfo: bool = False
    onlyValid: bool = False
    maxResults: int | None = Field(default=None, ge=1, le=1000)
    pageToken: Annotated[str, StringConstraints(max_length=256)] | None = None
    lang: Lang | None = None
    clientData: ClientData | None = None


class CscCredentialsInfoRequest(_Lenient):
    credentialID: CredentialId
    certificates: CertificatesChoice = CertificatesChoice.single
    certInfo: bool = False
    authInfo: bool = False
    lang: Lang | None = None
    clientData: ClientData | None = None


class CscKeyInfo(BaseModel):
    status: Literal["enabled", "disabled"]
    algo: list[str]
    len: int
    curve: str | None = None


class CscCertInfo(BaseModel):
    status: Literal["valid", "expired", "revoked", "suspended"] | None = None
    certificates: list[str] | None = None
    issuerDN: str | None = None
    subjectDN: str | None = None
    serialNumber: str | None = None
    validFrom: str | None = None
    validTo: str | None = None


class CscAuthObject(BaseModel):
    type: str
    id: str
    format: str | None = None
    generator: str | None = None
    label: str | None = None
    description: str | None = None


class CscAuthInfo(BaseModel):
    """v2 ``auth`` of credentials/info."""

    mode: Literal["explicit", "oauth2code"]
    expression: str | None = None
    objects: list[CscAuthObject] = []


class CscV1Factor(BaseModel):
    """v1 ``PIN`` / ``OTP`` descriptions of credentials/info."""

    presence: Literal["true", "false", "optional"]
    format: str | None = None
    label: str | None = None
    description: str | None = None
    type: str | None = None
    ID: str | None = None
    provider: str | None = None


class CscCredentialInfo(BaseModel):
    description: str | None = None
    key: CscKeyInfo
    cert: CscCertInfo | None = None
    SCAL: Literal["1", "2"]
    multisign: int
    lang: str | None = None
    auth: CscAuthInfo | None = None
    authMode: Literal["implicit", "explicit", "oauth2code"] | None = None
    PIN: CscV1Factor | None = None
    OTP: CscV1Factor | None = None


class CscCredentialsListResponse(BaseModel):
    credentialIDs: list[str]
    credentialInfos: list[CscCredentialInfo] | None = None
    onlyValid: bool | None = None
    nextPageToken: str | None = None


class CscAuthData(_Lenient):
    id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    value: Secret


HashList = Annotated[list[Base64Bytes], Field(min_length=1, max_length=MAX_BATCH)]
_HASHES = Field(default=None, validation_alias=AliasChoices("hashes", "hash"))
_HASH_OID = Field(default=None, validation_alias=AliasChoices("hashAlgorithmOID", "hashAlgo"))


class CscAuthorizeRequest(_Lenient):
    """credentials/authorize (v2 §11.6, v1 §11.6); v1 ``hash``/``PIN``/``OTP`` accepted."""

    credentialID: CredentialId
    numSignatures: int = Field(ge=1, le=MAX_BATCH)
    hashes: HashList | None = _HASHES
    hashAlgorithmOID: Oid | None = _HASH_OID
    authData: list[CscAuthData] = Field(default=[], max_length=8)
    PIN: Secret | None = None
    OTP: Secret | None = None
    description: ShortText | None = None
    clientData: ClientData | None = None


class CscAuthorizeResponse(BaseModel):
    SAD: str
    expiresIn: int


class CscExtendTransactionRequest(_Lenient):
    """credentials/extendTransaction (v2 §11.9, v1 §11.7)."""

    credentialID: CredentialId
    SAD: Secret
    hashes: HashList | None = _HASHES
    hashAlgorithmOID: Oid | None = _HASH_OID
    clientData: ClientData | None = None


class CscSignHashRequest(_Lenient):
    """signatures/signHash (v2 §11.10, v1 §11.9); signatures come back in input order."""

    credentialID: CredentialId
    SAD: Secret
    hashes: HashList = Field(validation_alias=AliasChoices("hashes", "hash"))
    hashAlgorithmOID: Oid | None = _HASH_OID
    signAlgo: Oid
    signAlgoParams: Base64Str | None = None
    operationMode: Literal["S"] = "S"
    clientData: ClientData | None = None


class CscSignHashResponse(BaseModel):
    signatures: list[str]


# --- /api/v1: authentication -----------------------------------------------------------------


class LoginRequest(_Strict):
    username: Name
    password: Secret
    otp: Annotated[str, StringConstraints(pattern=r"^[0-9]{6,8}$")]


class RefreshRequest(_Strict):
    refresh_token: Secret


class TokenResponse(BaseModel):
    access_token: str
    refresh_token: str | None = None
    token_type: Literal["Bearer", "DPoP"] = "Bearer"  # noqa: S105 -- the scheme name
    expires_in: int
    refresh_expires_in: int | None = None
    """Seconds until the session ends (refreshing does not extend it)."""


# --- /api/v1: PIN and PIV key operations -----------------------------------------------------

Pin = Annotated[str, StringConstraints(min_length=6, max_length=8)]


class PinVerifyRequest(_Strict):
    pin: Pin


class PinChangeRequest(_Strict):
    pin: Pin
    new_pin: Pin


class PinUnblockRequest(_Strict):
    puk: Pin
    new_pin: Pin


class PukChangeRequest(_Strict):
    puk: Pin
    new_puk: Pin


class PinStatusResponse(BaseModel):
    pin_retries: int
    puk_retries: int
    pin_blocked: bool
    puk_blocked: bool
    verified: bool


Otp = Annotated[str, StringConstraints(pattern=r"^[0-9]{6,8}$")]


class _KeyOpRequest(_Strict):
    otp: Otp | None = None
    """A fresh TOTP, for a credential enrolled with ``--otp-per-signature`` (sole control)."""


class RsaBlockRequest(_KeyOpRequest):
    block: Base64Bytes


class DigestRequest(_KeyOpRequest):
    digest: Base64Bytes


class MessageRequest(_KeyOpRequest):
    message: Base64Bytes


class PeerPointRequest(_KeyOpRequest):
    peer_point: Base64Bytes


class ResultResponse(BaseModel):
    """A key operation's output (signature, raw RSA result, shared secret), base64."""

    result: str


class DeviceEnrollRequest(_Strict):
    code: Secret
    device_public_key: Annotated[str, StringConstraints(min_length=1, max_length=8192)]


class DeviceCredential(BaseModel):
    slot: str
    credential_id: str
    alg: str
    certificate: str
    pin_always: bool
    """The key needs the PIN verified right before each use (PIV PIN policy "always")."""
    otp_per_signature: bool
    """Each use needs a fresh TOTP (sole control)."""


class DeviceEnrollResponse(BaseModel):
    user: str
    device_id: str
    ca_certificate: str
    credentials: list[DeviceCredential]


# --- /api/v1/admin ---------------------------------------------------------------------------


class KeyAlgName(StrEnum):
    """The CLI names of key algorithms (``server.hsm.KeyAlg`` values)."""

    p256 = "p256"
    p384 = "p384"
    rsa2048 = "rsa2048"
    rsa3072 = "rsa3072"
    rsa4096 = "rsa4096"
    ed25519 = "ed25519"


class Slot(StrEnum):
    """PIV key slots (SP 800-73-4 Pt 1 §3.1)."""

    authentication = "9a"
    signature = "9c"
    key_management = "9d"
    card_authentication = "9e"


class UserCreate(_Strict):
    name: Name
    password: Secret | None = None
    email: Address | None = None
    upn: Address | None = None


class UserOut(BaseModel):
    name: str
    email: str | None = None
    upn: str | None = None
    disabled: bool
    enrolled: bool
    login_failures: int = 0
    """Failed password logins for this name in the current window, from all addresses."""
    login_locked: bool = False
    """The name's budget is spent: logins are answered 429 until the window ends or an
    administrator unlocks it."""


class EnrollRequest(_Strict):
    alg: KeyAlgName = KeyAlgName.p256
    otp_per_signature: bool = False


class RevokeResponse(BaseModel):
    user: str
    revoked: int
    """How many credentials were revoked."""


class UnblockResponse(BaseModel):
    user: str
    pin: str
    """The new PIN, shown once."""


class EnrolledCredential(BaseModel):
    slot: str
    credential_id: str
    alg: str


class EnrollResponse(BaseModel):
    user: str
    pin: str
    puk: str
    otp_uri: str
    enrollment_code: str
    credentials: list[EnrolledCredential]


class UserCreated(UserOut):
    password: str | None = None
    """The generated password, returned once, when the request named none."""


class CsrResponse(BaseModel):
    csr: str
    """PEM."""


class CertImportRequest(_Strict):
    certificate: Annotated[str, StringConstraints(min_length=1, max_length=65536)]
    """PEM."""


class CertResponse(BaseModel):
    slot: str
    credential_id: str
    certificate: str


Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class AuditCheckpoint(_Strict):
    """A signed audit checkpoint, as exported (one line of the checkpoint file)."""

    seq: int = Field(ge=0)
    hash: Hex64
    count: int = Field(ge=0)
    time: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    mac: Hex64


class AuditVerifyRequest(_Strict):
    checkpoints: list[AuditCheckpoint] = Field(min_length=1, max_length=64)
    """Checkpoints exported earlier (the latest one covers every record before it)."""


class AuditVerifyResponse(BaseModel):
    ok: bool
    records: int
    first_bad: int | None = None
    reason: str | None = None


class AuditRecordOut(BaseModel):
    seq: int
    time: str
    actor: str
    event: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str
    mac: str


class HealthResponse(BaseModel):
    status: Literal["ok"]
