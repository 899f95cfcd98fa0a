# SPDX-License-Identifier: Apache-2.0
"""One SoftHSM2 token per test process, shared by every server test that needs an HSM.

SoftHSM2 reads SOFTHSM2_CONF once per process, so the token is created once and memoised
here even if several conftest/test modules import these fixtures (tests/server/conftest.py
re-exports them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.hsm import Hsm
from server.hsm.softhsm import init_token, softhsm_conf


@dataclass(frozen=True)
class HsmToken:
    """Where the shared test token lives and how to log in."""

    module: str
    label: str
    pin: str
    so_pin: str
    data_dir: Path


_token: HsmToken | None = None


@pytest.fixture(scope="session")
def hsm_token(tmp_path_factory: pytest.TempPathFactory) -> HsmToken:
    """The process's SoftHSM2 token (fails loudly when SoftHSM2 is missing)."""
    global _token
    if _token is None:
        data_dir = tmp_path_factory.mktemp("softhsm")
        module = init_token(data_dir, "cardbridge-test", "87654321", "123456")
        _token = HsmToken(module, "cardbridge-test", "123456", "87654321", data_dir)
    return _token


@pytest.fixture(scope="session")
def hsm(hsm_token: HsmToken) -> Iterator[Hsm]:
    """A logged-in :class:`Hsm` on the shared token."""
    os.environ["SOFTHSM2_CONF"] = str(softhsm_conf(hsm_token.data_dir).resolve())
    with Hsm.open(hsm_token.module, hsm_token.label, hsm_token.pin) as h:
        yield h
