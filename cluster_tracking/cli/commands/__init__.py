"""The CLI's commands, one module each: ``demo``, ``audit`` and ``compare``.

Each module holds one plain function whose parameters are the command's options (Typer reads
them) and whose docstring is its ``--help``; :mod:`cluster_tracking.cli.app` registers them.
"""
