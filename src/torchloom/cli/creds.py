"""``torchloom creds``: where a role's credentials of a secure ``torchloom up`` are."""

from __future__ import annotations

from typing import Annotated

import typer

from torchloom.cli.options import StateDir
from torchloom.errors import InvalidRequestError, TorchloomError
from torchloom.paths import default_state_dir


def creds(
    role: Annotated[str, typer.Argument(help="job, operator or weaver")],
    job: Annotated[str | None, typer.Argument(help="the job id (role job)")] = None,
    state_dir: StateDir = None,
) -> None:
    """Print the path of a role's credentials file of a secure `torchloom up` on this machine;
    for a job, issue them first if it has none (the running NATS reloads its users).

    Example: export TORCHLOOM_CREDS=$(torchloom creds job mnist)"""
    from torchloom.secure import SecureDir

    sdir = state_dir or default_state_dir()
    secure_dir = SecureDir(sdir)
    if not secure_dir.dir.exists():
        raise TorchloomError(f"{sdir} has no credentials: start `torchloom up --secure` there")
    if role == "job":
        if not job:
            raise InvalidRequestError("give the job id: torchloom creds job JOB")
        path = secure_dir.issue_job(job)
    elif role in ("operator", "weaver"):
        path = secure_dir.creds_file(role)  # type: ignore[arg-type]
    else:
        raise InvalidRequestError(f"unknown role {role!r}: use job, operator or weaver")
    print(path)
