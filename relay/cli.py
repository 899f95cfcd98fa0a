"""The ``cardbridge`` command, composed from the sub-apps each package registers.

Packages register a typer app under the ``cardbridge.commands`` entry-point group, so the
command is assembled here without any package importing another.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

app = typer.Typer(
    name="cardbridge",
    help="A virtual PIV smart card whose keys live in an HSM behind a signing server.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register_subcommands() -> None:
    for ep in sorted(entry_points(group="cardbridge.commands"), key=lambda e: e.name):
        app.add_typer(ep.load(), name=ep.name)


def main() -> None:
    """Entry point of the ``cardbridge`` console script."""
    _register_subcommands()
    app()
