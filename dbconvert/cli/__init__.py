"""The `dbconvert` command line (see `dbconvert.cli.app`)."""

from dbconvert.cli.app import app, main

__all__ = ["app", "main"]
