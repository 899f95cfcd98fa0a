# SPDX-License-Identifier: Apache-2.0
"""An :class:`~server.hsm.Hsm` handle on a network HSM (``p11-kit server`` exporting a SoftHSM2
token) survives a restart of that server: operations fail as unavailable while it is down and
succeed again once it is back, in the same process, with no new handle.

The handle lives in a child process (a PKCS#11 module is loaded once per process), driven line
by line: the parent stops and starts the p11-kit server between the child's signatures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import P11KIT_CLIENT, NetworkHsm

pytestmark = pytest.mark.hsm

CHILD = """
import sys
from server.hsm import Hsm, KeyAlg
hsm = Hsm.open(sys.argv[1], sys.argv[2], sys.argv[3])
ref = hsm.generate_key(KeyAlg.P256, "restart-test")
print("ready", flush=True)
for _ in sys.stdin:
    try:
        hsm.sign_digest(ref, bytes(32), "sha256")
        print("signed", flush=True)
    except Exception as e:
        print(type(e).__name__, flush=True)
"""


@pytest.fixture
def network_hsm(tmp_path: Path) -> Iterator[NetworkHsm]:
    net = NetworkHsm(tmp_path)
    net.start()
    yield net
    net.stop()


def test_a_handle_survives_a_restart_of_the_network_hsm(network_hsm: NetworkHsm) -> None:
    pin = network_hsm.pin_file.read_text().strip()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, P11KIT_CLIENT, network_hsm.label, pin],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **network_hsm.client_env},
    )  # fmt: skip
    stdin, stdout, stderr = child.stdin, child.stdout, child.stderr
    assert stdin is not None and stdout is not None and stderr is not None

    def sign() -> str:
        stdin.write("sign\n")
        stdin.flush()
        return stdout.readline().strip()

    try:
        assert stdout.readline().strip() == "ready"
        assert sign() == "signed"
        network_hsm.stop()
        assert [sign(), sign()] == ["HsmUnavailable", "HsmUnavailable"]
        network_hsm.start()
        assert [sign(), sign()] == ["signed", "signed"]
    finally:
        stdin.close()
        child.wait(timeout=30)
    assert child.returncode == 0
    assert "Traceback" not in stderr.read()
