"""``cardbridge card``: run and manage the virtual PIV card."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run and manage the virtual PIV card.", no_args_is_help=True)
