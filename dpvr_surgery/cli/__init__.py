"""The `dpvr-surgery` command line: thin commands over the library functions."""

import click

from .. import __version__
from .analyze import analyze
from .bench import bench
from .convert import convert
from .demo import demo
from .eval import eval_command
from .export import export
from .finetune import finetune
from .generate import generate
from .inspect import inspect
from .push import push


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dpvr-surgery")
def main():
    """Convert LLaVA-style models to dual-path vision token routing with late-layer fusion (DPVR-LF)."""


main.add_command(analyze)
main.add_command(bench)
main.add_command(convert)
main.add_command(demo)
main.add_command(eval_command)
main.add_command(export)
main.add_command(finetune)
main.add_command(generate)
main.add_command(inspect)
main.add_command(push)
