# SPDX-License-Identifier: Apache-2.0
"""The default HSM: a SoftHSM2 token stored in the server's data directory."""

from __future__ import annotations

import os
import shutil
import subprocess  # noqa: S404 (softhsm2-util is the only way to C_InitToken here)
from pathlib import Path
from typing import Final

from server.errors import HsmError

SOFTHSM_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
SOFTHSM_UTIL: Final = "softhsm2-util"
_TOKENDIR: Final = "directories.tokendir"


def softhsm_conf(data_dir: Path | str) -> Path:
    """Path of the SoftHSM2 configuration file of a data directory."""
    return Path(data_dir) / "softhsm2.conf"


def use_conf(conf: Path) -> None:
    """Point ``SOFTHSM2_CONF`` of this process at a data directory's SoftHSM2 configuration
    (SoftHSM2 reads it when the module is initialised, see :meth:`server.hsm.Hsm.open`), and
    that configuration at the ``tokens/`` beside it: its line is rewritten when the data
    directory was copied or moved (SoftHSM2 takes no path relative to the file)."""
    tokendir = f"{_TOKENDIR} = {(conf.parent / 'tokens').resolve()}"
    lines = conf.read_text().splitlines()
    if tokendir not in lines:
        kept = [line for line in lines if not line.startswith(_TOKENDIR)]
        tmp = conf.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join([tokendir, *kept]) + "\n")
        os.replace(tmp, conf)
    os.environ["SOFTHSM2_CONF"] = str(conf.resolve())


def init_token(data_dir: Path | str, label: str, so_pin: str, pin: str) -> str:
    """Create ``DIR/softhsm2.conf`` and ``DIR/tokens/`` and a token labelled ``label``.

    Points ``SOFTHSM2_CONF`` of this process at the file (:func:`use_conf`). Idempotent: an
    existing token with that label is kept as it is. Returns the module path to open.

    softhsm2-util only takes PINs as arguments or from a terminal, so they appear briefly
    in this machine's process list while the token is created.
    """
    if not Path(SOFTHSM_MODULE).exists() or shutil.which(SOFTHSM_UTIL) is None:
        raise HsmError(f"SoftHSM2 is not installed ({SOFTHSM_MODULE}, {SOFTHSM_UTIL})")
    data = Path(data_dir)
    tokens = data / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = softhsm_conf(data)
    if not conf.exists():
        conf.write_text("objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n")
        conf.chmod(0o600)
    use_conf(conf)
    if label not in _token_labels():
        _util("--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin)
    return SOFTHSM_MODULE


def _token_labels() -> set[str]:
    """Labels of the initialised tokens under the current ``SOFTHSM2_CONF``."""
    labels = set()
    for line in _util("--show-slots").splitlines():
        name, _, value = line.strip().partition(":")
        if name == "Label" and value.strip():
            labels.add(value.strip())
    return labels


def _util(*args: str) -> str:
    proc = subprocess.run(  # noqa: S603 (fixed executable, no shell)
        [SOFTHSM_UTIL, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        # The command line holds PINs; report only the action and softhsm2-util's message.
        message = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise HsmError(f"softhsm2-util {args[0]} failed: {message[0]}")
    return proc.stdout
