"""Fixtures for the pure card tests: one pre-generated soft card, copied per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from piv_host import KEYS, Host

from vcard.card import VirtualCard
from vcard.softkeys import SoftKeyBackend


@pytest.fixture(scope="session")
def card_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A soft card with every key type, generated once (RSA-4096 takes seconds)."""
    path = tmp_path_factory.mktemp("template") / "card"
    backend = SoftKeyBackend.create(path)
    for slot, key_type in KEYS.items():
        backend.generate_key(slot, key_type)
    return path


@pytest.fixture
def card_dir(card_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "card"
    shutil.copytree(card_template, path)
    return path


@pytest.fixture
def backend(card_dir: Path) -> SoftKeyBackend:
    return SoftKeyBackend.open(card_dir)


@pytest.fixture
def card(backend: SoftKeyBackend) -> VirtualCard:
    return VirtualCard(backend)


@pytest.fixture
def host(card: VirtualCard) -> Iterator[Host]:
    yield Host(card)
