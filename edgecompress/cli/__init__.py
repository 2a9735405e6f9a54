"""The ``edgecompress`` command line: a thin shell over the library.

Each command lives in its own module and only parses options, calls one library function and
prints. ``EdgeCompressError`` becomes a one-line message and the error's exit code at one
boundary (``_Group.invoke``); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import importlib
import logging

import click

from edgecompress.errors import EdgeCompressError

# command modules, each defining a click command named like the module (``export`` -> ``export``)
_COMMANDS = ("models", "export", "plan", "quantize", "bench", "mobile", "run")


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeCompressError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)

    def list_commands(self, ctx):
        return [name for name in _COMMANDS if self.get_command(ctx, name) is not None]

    def get_command(self, ctx, name):
        if name not in _COMMANDS:
            return None
        try:
            module = importlib.import_module(f"edgecompress.cli.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"edgecompress.cli.{name}_cmd":
                return None  # not built yet
            raise
        return getattr(module, "command")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgecompress")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Make trained PyTorch models smaller and faster for phones and small boards.

    \b
    Typical flow:
      edgecompress models                          # the reference zoo
      edgecompress plan resnet18 --method tucker --ratio 4
      edgecompress export resnet18 --method tucker --ratio 4 -o r18.onnx
      edgecompress quantize r18.onnx --int8 -o r18.int8.onnx
      edgecompress bench r18.onnx r18.int8.onnx --threads 1,2
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
