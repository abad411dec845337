"""The ``cluster-tracking`` command line: a thin Typer layer over the package's functions.

Each command lives in its own module of :mod:`cluster_tracking.cli.commands` (``demo``, ``audit``,
``compare``): it parses its options (the shared ones are in :mod:`cluster_tracking.cli.options`),
calls one function of the module that implements it (``demo`` ->
:func:`cluster_tracking.cli.demo.run_demo`), and prints the result, inside the one error guard
(:func:`cluster_tracking.cli.guard.cli_errors`): errors a user can cause
(:class:`~cluster_tracking.errors.ClusterTrackingError`) become one red line on stderr and the
exit code of their kind (:data:`cluster_tracking.errors.EXIT_STATUSES`), never a traceback.

To add a command, write it as a function in its own module of ``commands/`` and register it
below with ``app.command()(function)``::

    def audit(source: Annotated[str, typer.Argument(help="...")]) -> None:
        \"\"\"One line for the command list. More lines for its --help.\"\"\"
        with cli_errors():
            from cluster_tracking.cli.audit_output import run_audit
            ...
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from cluster_tracking.cli.commands.audit import AUDIT_EPILOG, audit
from cluster_tracking.cli.commands.compare import COMPARE_EPILOG, compare
from cluster_tracking.cli.commands.demo import demo
from cluster_tracking.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, exit_codes_text

# Click's exception classes, wherever this Typer takes Click from (click, or its vendored copy).
_CLICK_ERRORS = sys.modules[typer.BadParameter.__module__]
_UsageError: type[Exception] = _CLICK_ERRORS.UsageError
_ClickException: type[Exception] = _CLICK_ERRORS.ClickException
_NoArgsIsHelp: type[Exception] | None = getattr(_CLICK_ERRORS, "NoArgsIsHelpError", None)


class _OneLineTyper(typer.Typer):
    """Typer, with every command-line mistake (unknown option, missing source, a value out of
    range) as one line on stderr, ``error: ... (see cluster-tracking COMMAND --help)``, and exit
    code 2, like every other error of the CLI (not Typer's boxed usage message)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        command = typer.main.get_command(self)
        arguments = list(args[0]) if args else kwargs.pop("args", None)
        try:
            code = command.main(
                args=arguments,
                prog_name=kwargs.pop("prog_name", "cluster-tracking"),
                standalone_mode=False,
                **kwargs,
            )
        except _UsageError as error:
            if _NoArgsIsHelp is not None and isinstance(error, _NoArgsIsHelp):
                error.show()  # type: ignore[attr-defined]  # the help page, as Typer shows it
                sys.exit(getattr(error, "exit_code", EXIT_USAGE))
            context = getattr(error, "ctx", None)
            where = context.command_path if context is not None else "cluster-tracking"
            message = " ".join(error.format_message().split())  # type: ignore[attr-defined]
            typer.echo(f"error: {message} (see {where} --help)", err=True)
            sys.exit(EXIT_USAGE)
        except typer.Abort:
            typer.echo("error: interrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except _ClickException as error:
            message = " ".join(error.format_message().split())  # type: ignore[attr-defined]
            typer.echo(f"error: {message}", err=True)
            sys.exit(getattr(error, "exit_code", EXIT_INTERNAL))
        sys.exit(code if isinstance(code, int) else 0)


app = _OneLineTyper(
    name="cluster-tracking",
    help=(
        "Measure how clusterable neural networks are (Filan et al. 2021, arXiv:2103.03386) and "
        "track it in MLflow or Weights & Biases.\n\n"
        "Start with **cluster-tracking demo**: it trains a small network, tracks its "
        "clusterability every epoch, and logs it to a local MLflow store. Measure models "
        "saved or logged before with **cluster-tracking audit** (checkpoints, MLflow runs and "
        "models, W&B artifacts) and rank many with **cluster-tracking compare**.\n\n"
        f"Exit codes of audit and compare: {exit_codes_text()}. "
        "Usage mistakes are one line and exit 2; the readers' limits (--max-memory, "
        "--shuffles, --jobs) are in cluster-tracking audit --help."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        from cluster_tracking.version import __version__

        typer.echo(f"cluster-tracking {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Measure how clusterable neural networks are and track it in MLflow or W&B."""


app.command()(demo)
app.command(epilog=AUDIT_EPILOG)(audit)
app.command(epilog=COMPARE_EPILOG)(compare)


if __name__ == "__main__":
    app()
