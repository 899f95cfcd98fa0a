"""Property-based API fuzzing: schemathesis generates requests for every operation of the
app's own ``/openapi.json`` and no answer may be a 5xx (DESIGN.md rule 8). Requests carry the
admin token on ``/api/v1/admin`` and a logged-in user's device-bound token (password + TOTP, PIN
verified) with a fresh DPoP proof elsewhere, so generation reaches past authentication into the
handlers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from apikit import Api, api_db_url_fixture, api_fixture  # noqa: F401
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import HOST

from relay.dpop import DpopAuth

MAX_EXAMPLES = 20
# /tsa takes a DER TimeStampReq (RFC 3161 §3.4): fuzzed as arbitrary bytes.
schemathesis.serializer.alias("application/timestamp-query", "application/octet-stream")
# Ending the shared session would only make the rest of the run see 401s; logout and revoke
# have their own tests.
SKIPPED = re.compile(r"^/(api/v1/auth/logout|csc/v[12]/auth/revoke)$")


Headers = Callable[[Any], dict[str, str]]


def _fuzz(operation: Any, headers: Headers, seen: Counter[int]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(headers=headers(case))
        seen[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error])

    run()


@pytest.mark.slow
def test_no_server_errors(api: Api) -> None:
    user = api.user(alg="p256", prefix="fuzz")
    auth: DpopAuth = api.login(user)
    assert api.verify_pin(user).status_code == 200
    assert auth.token is not None
    token = auth.token

    def user_headers(case: Any) -> dict[str, str]:
        url = f"http://{HOST}{case.formatted_path}"
        proof = user.device.proof(case.method.upper(), url, access_token=token)
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    def admin_headers(case: Any) -> dict[str, str]:
        return api.admin
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)

    failures: list[str] = []
    seen: Counter[int] = Counter()
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if SKIPPED.match(operation.path):
            continue
        headers = admin_headers if operation.path.startswith("/api/v1/admin") else user_headers
        try:
            _fuzz(operation, headers, seen)
        except Exception as e:  # noqa: BLE001 -- collect every operation's failure
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
        tested += 1
    assert tested >= 30, f"only {tested} operations in /openapi.json"
    assert not failures, "\n\n".join(failures)
    # Generation got past authentication and validation into the handlers.
    assert seen[200] + seen[201] + seen[204] > 50, seen
    assert seen[401] < sum(seen.values()) / 4, seen
