"""Options shared by several commands, declared once and shown in groups in `--help`."""

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import DpvrSurgeryError
from ..recipe import apply_overrides, load_recipe, validate_recipe

LOG_LEVEL_ENV = "DPVR_LOG_LEVEL"
LOG_FILE_ENV = "DPVR_LOG_FILE"
GROUP_ORDER = ("Model", "Plan", "Output", "Generation", "Performance", "Misc")


class GroupedOption(click.Option):
    """A click option that belongs to a named section of `--help`."""

    def __init__(self, *args, group: str = "Misc", **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose `--help` lists options by section, and whose package errors become exit codes."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):
                continue
            record = param.get_help_record(ctx)
            if record is None:
                continue
            group = getattr(param, "group", "Misc")
            sections.setdefault(group, []).append(record)
        for group in sorted(sections, key=lambda name: GROUP_ORDER.index(name) if name in GROUP_ORDER else 99):
            with formatter.section(f"{group} options"):
                formatter.write_dl(sections[group])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DpvrSurgeryError as error:
            logging.getLogger("dpvr_surgery").debug("Command failed", exc_info=True)
            click.echo(f"Error: {error}", err=True)
            ctx.exit(error.exit_code)


def option(*param_decls: str, group: str, **kwargs):
    """Declare a click option in a `--help` section."""
    return click.option(*param_decls, cls=GroupedOption, group=group, **kwargs)


@dataclass
class ModelOptions:
    """Where MODEL comes from and the dtype to load or write it in."""

    revision: str | None
    cache_dir: str | None
    dtype: str


@dataclass
class MiscOptions:
    """Logging, seeding and recipe settings of one run."""

    verbose: int
    quiet: bool
    log_file: str | None
    seed: int
    recipe: dict[str, dict]


def model_options(function):
    """Add --revision, --cache-dir and --dtype; pass them as `model_options: ModelOptions`."""

    @option("--revision", group="Model", help="Hub revision (branch, tag or commit) when MODEL is a Hub id.")
    @option(
        "--cache-dir",
        group="Model",
        type=click.Path(file_okay=False),
        help="Hugging Face cache folder to look up Hub ids in (default: the standard cache).",
    )
    @option(
        "--dtype",
        group="Model",
        type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
        default="auto",
        show_default=True,
        help="Weight dtype: auto keeps the checkpoint's.",
    )
    @functools.wraps(function)
    def wrapper(*args, revision, cache_dir, dtype, **kwargs):
        return function(*args, model_options=ModelOptions(revision, cache_dir, dtype), **kwargs)

    return wrapper


def misc_options(function):
    """Add -v, -q, --log-file, --seed, --recipe and --set; configure logging; pass `misc: MiscOptions`."""

    @option("-v", "--verbose", group="Misc", count=True, help="More log output (-v info from libraries, -vv debug).")
    @option("-q", "--quiet", group="Misc", is_flag=True, help="Only warnings and errors; no progress bars.")
    @option(
        "--log-file",
        group="Misc",
        type=click.Path(dir_okay=False),
        envvar=LOG_FILE_ENV,
        help=f"Also write the log to this file (env {LOG_FILE_ENV}).",
    )
    @option("--seed", group="Misc", type=int, default=0, show_default=True, help="Random seed.")
    @option(
        "--recipe",
        "recipe_path",
        group="Misc",
        type=click.Path(exists=True, dir_okay=False),
        help="YAML recipe with settings for this command; flags given here win over it.",
    )
    @option(
        "--set",
        "overrides",
        group="Misc",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one recipe setting, for example --set convert.split=18 (repeatable).",
    )
    @functools.wraps(function)
    def wrapper(*args, verbose, quiet, log_file, seed, recipe_path, overrides, **kwargs):
        configure_logging(verbose=verbose, quiet=quiet, log_file=log_file)
        sections = load_recipe(recipe_path) if recipe_path else validate_recipe({})
        if overrides:
            sections = apply_overrides(sections, list(overrides))
        misc = MiscOptions(verbose, quiet, log_file, seed, sections)
        return function(*args, misc=misc, **kwargs)

    return wrapper


def configure_logging(*, verbose: int, quiet: bool, log_file: str | None) -> None:
    """Send package logs to stderr (and a file); flags beat DPVR_LOG_LEVEL, which beats the default INFO."""
    if quiet:
        level = logging.WARNING
    elif verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1:
        level = logging.INFO
    else:
        level = logging.getLevelName(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())
        if not isinstance(level, int):
            raise click.BadParameter(
                f"{LOG_LEVEL_ENV}={os.environ[LOG_LEVEL_ENV]!r} is not a log level; use DEBUG, INFO, WARNING or ERROR."
            )

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    package_logger = logging.getLogger("dpvr_surgery")
    package_logger.handlers.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        package_logger.addHandler(handler)
    package_logger.setLevel(level)
    package_logger.propagate = False

    # Libraries stay at warnings (and hide their own progress bars) unless -v asks for more.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        transformers_logging.disable_progress_bar()


def show_progress(misc: MiscOptions) -> bool:
    """Whether progress bars are on for this run."""
    return not misc.quiet


def recipe_value(ctx: click.Context, misc: MiscOptions, section: str, parameter: str, key: str, value):
    """Return a flag's value, or the recipe's when the flag was left at its default."""
    source = ctx.get_parameter_source(parameter)
    if source in (click.core.ParameterSource.DEFAULT, None) and key in misc.recipe.get(section, {}):
        return misc.recipe[section][key]
    return value
