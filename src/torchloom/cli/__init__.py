"""The ``torchloom`` command (Typer + Rich): the app and its commands, one module per group.

A user mistake (unknown knob, bad value, no Weaver reachable) prints one line
and exits non-zero: 2 for a refused request, 3 when nothing answers, 1 otherwise.

=================  ===========================================================
module             commands
=================  ===========================================================
``serve``          ``up`` (and the stack options and builder ``demo`` shares)
``demo``           ``demo``
``steer``          ``set``, ``pause``, ``resume``, ``stop``, ``drain``, ``forget``
``look``           ``status``, ``knobs``, ``events``
``run``            ``run``
``chaos``          ``chaos``
``creds``          ``creds``
``policy``         ``policy list|enable|disable|set|export``
``checkpoint``     ``checkpoint save|list``, ``rollback``
``sim``            ``sim``
=================  ===========================================================
"""

from __future__ import annotations

import sys

import typer

from torchloom.cli import chaos, checkpoint, creds, demo, look, policy, run, serve, sim, steer
from torchloom.cli.options import err
from torchloom.errors import InvalidRequestError, NotReachableError, TorchloomError

app = typer.Typer(
    name="torchloom",
    help="An active controller for distributed PyTorch training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(serve.up)
app.command()(creds.creds)
app.command()(demo.demo)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(run.run)
app.command("set")(steer.set_)
app.command("pause")(
    steer.state_command(
        "pause", "Hold every rank at the same step boundary until `torchloom resume`."
    )
)
app.command("resume")(
    steer.state_command("resume", "Let a paused job go on from the step it paused at.")
)
app.command("stop")(
    steer.state_command("stop", "End the job: every rank leaves its step loop at the same step.")
)
app.command()(steer.drain)
app.command()(steer.forget)
app.command()(chaos.chaos)
app.command()(look.status)
app.command()(look.knobs)
app.command()(look.events)
app.add_typer(policy.app, name="policy")
app.add_typer(checkpoint.app, name="checkpoint")
app.command()(checkpoint.rollback)
app.command("sim")(sim.sim)


def main() -> None:
    """Entry point of the ``torchloom`` command: one clear line for every torchloom error."""
    try:
        app()
    except TorchloomError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        sys.exit(exit_code(exc))


def exit_code(exc: TorchloomError) -> int:
    """2: refused (by the Weaver, or a mistake on the command line); 3: nothing answered; 1:
    anything else."""
    if exc.remote or isinstance(exc, InvalidRequestError):
        return 2
    return 3 if isinstance(exc, NotReachableError) else 1
