"""Real PC/SC stack fixtures: soft cards run by `cardbridge card run` in vpcd's reader, and
remote cards whose keys are in a real server process's SoftHSM2 token.

scripts/test starts pcscd with etc/reader.conf.d; these tests fail (never skip) when it or
the reader is missing. Only one card is in the reader at a time: presenting another card
stops the current one and waits until pcscd has seen it removed, so OpenSC never meets a
stale card.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import RemoteCard, enroll_card
from live_server import LiveServer, init_data_dir, start_server
from pcsc_stack import ALGS, READER, CardSlot, SoftCard, card_present, make_card

from vcard.doctor import PcscError, list_readers

BRIDGE_ALGS = ["rsa2048", "p256"]


@pytest.fixture(scope="session")
def reader() -> str:
    """The project's vpcd reader; fails loudly when pcscd or the reader is missing."""
    try:
        readers = list_readers()
    except PcscError as e:
        pytest.fail(f"pcscd is not reachable ({e}); run the tests with scripts/test")
    if READER not in readers:
        pytest.fail(f"reader {READER!r} not listed ({readers}); run the tests with scripts/test")
    if card_present():
        pytest.fail(f"another card is already in {READER!r}; stop it before running the tests")
    return READER


@pytest.fixture(scope="session")
def card_slot(reader: str) -> Iterator[CardSlot]:
    slot = CardSlot()
    yield slot
    slot.remove()


@pytest.fixture(scope="session", params=ALGS)
def alg_card(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SoftCard:
    """One provisioned card per algorithm (session scope, so pytest groups tests by it)."""
    alg: str = request.param
    return make_card(tmp_path_factory.mktemp("cards") / alg, alg)


@pytest.fixture
def soft_card(alg_card: SoftCard, card_slot: CardSlot) -> SoftCard:
    """The shared card of each algorithm, in the reader (tests must not change its state)."""
    return card_slot.present(alg_card)


@pytest.fixture
def fresh_card(tmp_path: Path, card_slot: CardSlot) -> Iterator[SoftCard]:
    """A new P-256 card for tests that change PINs or keys; removed afterwards."""
    card = card_slot.present(make_card(tmp_path / "card", "p256"))
    yield card
    card_slot.remove()


# --- the bridge: the real server process and cards enrolled with it ---------------------------


@pytest.fixture(scope="session")
def bridge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One `cardbridge server run` (SQLite, SoftHSM2) for the bridge tests that share it."""
    data = tmp_path_factory.mktemp("bridge") / "data"
    init_data_dir(data)
    server = start_server(data)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="session", params=BRIDGE_ALGS)
def enrolled_card(
    request: pytest.FixtureRequest,
    bridge_server: LiveServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> RemoteCard:
    """A user per algorithm with a card enrolled on this workstation (session scope)."""
    alg: str = request.param
    return enroll_card(bridge_server, f"bridge-{alg}", tmp_path_factory.mktemp(alg), alg=alg)


@pytest.fixture
def remote_card(enrolled_card: RemoteCard, card_slot: CardSlot) -> RemoteCard:
    """The enrolled card in the reader with its session open."""
    card = card_slot.present(enrolled_card)
    if not card.status()["session"]["active"]:
        card.login()
    return card
