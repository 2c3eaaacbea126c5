"""Recipe dataclasses: the one config system of noisealign.

Every stage parses its dataclass with :func:`parse_config`, which wraps ``trl.TrlParser``:
values come from ``--config recipe.yaml`` and are overridden by CLI flags
(``--output_dir runs/x``). ``TrlParser`` copies YAML values in as argparse defaults without
type conversion, so :meth:`BaseConfig.__post_init__` checks every field's type itself.

A field reads as its default (or :func:`arg` with limits) and a docstring under it; the
docstring becomes its ``--help`` text (:class:`DocumentedFields`). Limits live in the field's
metadata, and the same ``__post_init__`` applies them:

- ``"required": True``: the field must not be empty;
- ``"min"`` / ``"max"`` (with ``"min_exclusive"`` / ``"max_exclusive"``), ``"multiple_of"``: bounds
  of an int or float field, or of each item of a list of them;
- ``"choices": (...)``: the allowed values of a string field;
- ``"check"``: a function of the value returning what is wrong with it, or ``None``.

Every float must be finite unless its metadata says ``"allow_inf": True`` (NaN never is). A
stage's own ``__post_init__`` keeps only the checks that relate fields to each other. Every
failure is one line naming the field, raised before the stage reads or writes anything.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError
from .limits import LIMIT_KEYS, bounds, check_seeds, field_problem, matches, type_name

__all__ = [
    "LIMIT_KEYS",
    "TORCH_DTYPES",
    "BaseConfig",
    "DocumentedFields",
    "arg",
    "check_seeds",
    "field_docs",
    "parse_config",
]

T = typing.TypeVar("T")
TORCH_DTYPES = ("float32", "float16", "bfloat16")  # "choices" of every torch_dtype field


def arg(default: Any = dataclasses.MISSING, **limits: Any) -> Any:
    """A config field with limits (``min=0``, ``choices=(...)``...); list and dict defaults are
    copied for every instance, as ``default_factory`` would."""
    unknown = set(limits) - set(LIMIT_KEYS)
    if unknown:
        raise TypeError(f"unknown field limits {sorted(unknown)}; known: {', '.join(LIMIT_KEYS)}")
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=limits)
    return field(default=default, metadata=limits)


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a class body: the string right under each annotated name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (a class built at run time)
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:]):
        text = getattr(getattr(after, "value", None), "value", None)
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(text, str)
        ):
            docs[ast.unparse(node.target)] = " ".join(text.split())
    return docs


class DocumentedFields:
    """Base of the recipe dataclasses: each field's docstring becomes its ``"help"`` metadata,
    which ``--help`` prints. It runs as the class is created, before ``@dataclass`` reads it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, doc in field_docs(cls).items():
            value = cls.__dict__.get(name, dataclasses.MISSING)
            if not isinstance(value, dataclasses.Field):
                value = field(default=value)
            metadata = {**value.metadata, "help": doc}
            setattr(
                cls,
                name,
                field(
                    default=value.default, default_factory=value.default_factory, metadata=metadata
                ),
            )


@dataclass
class BaseConfig(DocumentedFields):
    """Fields shared by every stage."""

    output_dir: str = arg("", required=True)
    """Folder for this run's outputs (datasets, checkpoints, logs). Required."""
    overwrite_output_dir: bool = False
    """Delete the outputs of a *different* recipe found in output_dir instead of refusing to run.
    Outputs of the same recipe are always resumed."""
    report_to: str = arg("wandb", choices=("wandb", "none"))
    """Tracker for accelerate: 'wandb' or 'none'."""
    wandb_project: str = "noisealign"
    """wandb project name."""
    run_name: str | None = None
    """Run name for the tracker; defaults to output_dir's name."""
    seed: int = 0
    """Global seed for anything not keyed per sample."""
    num_threads: int | None = arg(None, min=1)
    """torch intra-op threads per process (unset: torch's default). Use 1 on a small shared CPU: two
    threads per process stall each other ~5-10x when other processes compete for the cores."""
    trust_remote_code: bool = False
    """Allow models whose code lives on the hub. Off unless you set it."""
    dry_run: bool = False
    """Run the recipe as written on tiny random models of the same classes (built offline), a few
    prompts, seeds and steps, with every path mirrored under dry_run_dir; ends with a report."""
    dry_run_dir: str = "dry_run"
    """Folder a dry run writes into (outputs, replicas, report), mirroring the recipe's paths:
    output_dir outputs/x becomes dry_run/outputs/x. A chain of dry runs shares it."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not matches(value, hints[f.name]):
                raise ConfigError(
                    f"recipe field '{f.name}' must be {type_name(hints[f.name])}, got "
                    f"{type(value).__name__} {value!r}; fix it in the YAML or on the command line"
                )
        for f in dataclasses.fields(self):  # the limits in each field's metadata
            problem = field_problem(getattr(self, f.name), f.metadata)
            if problem == "is required":
                raise ConfigError(
                    f"recipe field '{f.name}' is required: set it in the YAML or pass --{f.name}"
                )
            if problem:
                raise ConfigError(
                    f"recipe field '{f.name}' {problem}; fix it in the YAML or on the command line"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, for trackers and saved recipes."""
        return dataclasses.asdict(self)


def _json_dict(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _argument_error(message: str) -> typing.NoReturn:
    """argparse's error hook: YAML values pass through argparse too, so say where to fix them."""
    raise ConfigError(
        f"invalid recipe value: {message}; fix it in the YAML or on the command line "
        "(--help lists the fields)"
    )


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    """Where the YAML broke (line and column) and, for a tab, what YAML wants instead."""
    mark = exc.problem_mark
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}"
    message = f"{where}: {exc.problem or exc.context}"
    if "\\t" in str(exc.problem):  # PyYAML writes the character escaped
        message += " (a tab: YAML indents with spaces)"
    return message


def parse_config(config_cls: type[T], args: Sequence[str] | None = None) -> T:
    """Parse ``--config recipe.yaml`` plus CLI overrides into ``config_cls``.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or invalid values.
    """
    # lazy, in one place: trl and the dry run load torch, which importing the configs skips
    from trl import TrlParser

    from . import dry_run

    class RecipeParser(TrlParser):
        def add_argument(self, *names, **kwargs):  # HfArgumentParser passes metadata as kwargs
            limits = {key: kwargs.pop(key) for key in LIMIT_KEYS if key in kwargs}
            allowed = bounds(limits)
            if "choices" in limits:
                allowed = "one of " + ", ".join(map(str, limits["choices"]))
            if allowed and kwargs.get("help"):  # --help shows the limits too
                kwargs["help"] += f" [{allowed}]"
            return super().add_argument(*names, **kwargs)

    dry_run.reset()  # a dry run's state ends with its stage; this recipe decides for itself
    parser = RecipeParser([config_cls])
    parser.error = _argument_error  # one line naming the flag and value, not usage + exit
    for action in parser._actions:  # dict fields take JSON on the command line
        if action.type is dict:
            action.type = _json_dict
    args = list(args) if args is not None else sys.argv[1:]
    if "--config" in args:
        path = args[args.index("--config") + 1] if args.index("--config") + 1 < len(args) else ""
        if not os.path.isfile(path):
            raise ConfigError(
                f"recipe file '{path}' does not exist; pass --config path/to/recipe.yaml"
            )
    try:
        (config,) = parser.parse_args_and_config(args)
    except ConfigError:
        raise
    except Exception as exc:  # yaml errors, unknown keys from TrlParser
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
            message = _yaml_message(exc)
        if "Unknown arguments from config file" in message:
            known = sorted(f.name for f in dataclasses.fields(config_cls))
            message = f"{message.split('. Please')[0]}; known fields: {', '.join(known)}"
        raise ConfigError(f"cannot read the recipe: {message}") from exc
    if isinstance(config, BaseConfig) and config.dry_run:
        config = dry_run.prepare(config)
    return config
