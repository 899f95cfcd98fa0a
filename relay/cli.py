"""The ``cardbridge`` command, composed from the sub-apps each package registers.

Packages register a typer app under the ``cardbridge.commands`` entry-point group, so the
command is assembled here without any package importing another. Only the sub-app a command
line names is loaded (all of them for ``--help``): ``cardbridge card run`` stays a small
process, without the server's or the demo's libraries.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

app = typer.Typer(
    name="cardbridge",
    help="A virtual PIV smart card whose keys live in an HSM behind a signing server.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register_subcommands(argv: list[str]) -> None:
    found = sorted(entry_points(group="cardbridge.commands"), key=lambda e: e.name)
    named = next((a for a in argv if not a.startswith("-")), None)
    wanted = [e for e in found if e.name == named] or found
    for ep in wanted:
        app.add_typer(ep.load(), name=ep.name)


def main() -> None:
    """Entry point of the ``cardbridge`` console script."""
    _register_subcommands(sys.argv[1:])
    app()
