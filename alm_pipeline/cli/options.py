"""Command-line options generated from a tree of config dataclasses.

Every leaf field of the tree becomes one flat option named after the field (``lr`` → ``--lr``; nested sections
are flattened, so names must be unique in a tree), or after ``metadata["cli"]`` when the option name differs
from the field name (``CombineConfig.method`` → ``--loss-combination``). The field's default is the option's
default and ``metadata["help"]`` its help text, so both are written once, on the dataclass. Types:

* ``bool`` → ``--x/--no-x`` (``bool | None``: unset unless given);
* ``str``, ``int``, ``float``, ``Path`` and ``X | None`` of those → a typed option (``None``: unset);
* ``Literal[...]`` → a choice (``click.Choice``);
* ``tuple[X, ...]`` → a repeatable option (``--student a --student b``);
* a field without a default → a required option;
* ``metadata={"argument": True}`` → a positional argument instead of an option.

:func:`config_command` turns a function ``body(config, **extras)`` into a typer command whose options are the
tree's; the config is built back with :func:`build_config` (nested sections from the flat values; the
dataclasses' own ``__post_init__`` validates) and a ``ValueError`` is reported as a CLI error (exit code 2).

Like torchtitan's ``ConfigManager`` (tyro over a nested ``JobConfig``) or litgpt's jsonargparse CLI, the
dataclasses are the single source; unlike them the option names stay flat, as the commands always had them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from alm_pipeline.cli.console import fail

__all__ = ["ConfigOption", "build_config", "config_command", "config_options"]

_SCALARS = (str, int, float, bool, Path)


@dataclass(frozen=True)
class ConfigOption:
    """One leaf field of a config tree, as a command-line option."""

    name: str  # the Python parameter name: --name-with-dashes on the command line
    path: tuple[str, ...]  # field names from the root of the tree
    annotation: Any  # the field's type
    default: Any  # dataclasses.MISSING: a required option
    help: str
    argument: bool = False  # metadata={"argument": True}: a positional argument instead of an option


def _nested(annotation: Any) -> type | None:
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_options(cls: type, exclude: Sequence[str] = ()) -> list[ConfigOption]:
    """The leaf fields of the dataclass tree ``cls`` as options (``exclude``: option names to leave out, which
    then keep their dataclass defaults)."""
    out: list[ConfigOption] = []

    def walk(c: type, prefix: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            if not f.init:
                continue
            sub = _nested(hints[f.name])
            if sub is not None:
                walk(sub, (*prefix, f.name))
                continue
            name = f.metadata.get("cli", f.name)
            if name in exclude:
                continue
            out.append(
                ConfigOption(
                    name,
                    (*prefix, f.name),
                    hints[f.name],
                    _field_default(f),
                    f.metadata.get("help", ""),
                    bool(f.metadata.get("argument", False)),
                )
            )

    walk(cls, ())
    seen: dict[str, tuple[str, ...]] = {}
    for opt in out:
        if opt.name in seen:
            raise TypeError(
                f"{cls.__name__}: option --{opt.name} would set both {'.'.join(seen[opt.name])} and "
                f"{'.'.join(opt.path)}; give one of them metadata={{'cli': ...}}"
            )
        seen[opt.name] = opt.path
    return out


def build_config(cls: type, values: dict[str, Any], exclude: Sequence[str] = ()) -> Any:
    """The dataclass tree ``cls`` from flat option values (``{option name: value}``; a missing name keeps its
    field's default). Lists become tuples and paths strings where the field says so."""
    by_path = {opt.path: opt for opt in config_options(cls, exclude)}
    unknown = sorted(set(values) - {opt.name for opt in by_path.values()})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")

    def build(c: type, prefix: tuple[str, ...]) -> Any:
        hints = typing.get_type_hints(c)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(c):
            if not f.init:
                continue
            path = (*prefix, f.name)
            sub = _nested(hints[f.name])
            if sub is not None:
                kwargs[f.name] = build(sub, path)
            elif path in by_path and by_path[path].name in values:
                kwargs[f.name] = _convert(values[by_path[path].name], hints[f.name])
        return c(**kwargs)

    return build(cls, ())


def _convert(value: Any, annotation: Any) -> Any:
    if value is None:
        return None
    base = _strip_optional(annotation)
    if typing.get_origin(base) is tuple:
        return tuple(value)
    if base is str and isinstance(value, Path):
        return str(value)
    return value


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _parameter(opt: ConfigOption) -> inspect.Parameter:
    base = _strip_optional(annotation=opt.annotation)
    optional = base is not opt.annotation
    decls: list[str] = []
    kw: dict[str, Any] = {"help": opt.help}
    default = opt.default
    if typing.get_origin(base) is Literal:  # typer makes it a click.Choice
        py_type: Any = base
    elif typing.get_origin(base) is tuple:
        (item, *_rest) = typing.get_args(base)
        py_type = list[item]
        if default is not dataclasses.MISSING and default is not None:
            default = list(default)
    elif base in _SCALARS:
        py_type = base
        if base is bool and not opt.argument:
            dashed = opt.name.replace("_", "-")
            decls = [f"--{dashed}/--no-{dashed}"]
    else:
        raise TypeError(f"option --{opt.name}: unsupported type {opt.annotation!r}")
    info = typer.Argument(**kw) if opt.argument else typer.Option(*decls, **kw)
    annotation = Annotated[py_type | None if optional else py_type, info]
    return inspect.Parameter(
        opt.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=inspect.Parameter.empty if default is dataclasses.MISSING else default,
    )


def config_command(
    cls: type, *, exclude: Sequence[str] = (), extras: Sequence[inspect.Parameter] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: ``body(config, **extras)`` becomes a typer command with one option per field of ``cls`` (see
    the module docstring) plus the ``extras`` parameters (``inspect.Parameter`` with typer annotations), passed
    to ``body`` by name. Register the result with ``app.command(name)(...)``; its help is ``body``'s
    docstring."""
    options = config_options(cls, exclude)
    params = [_parameter(opt) for opt in options]
    extra_names = {p.name for p in extras}
    signature = inspect.Signature([*params, *extras])  # all keyword-only: the tree's order

    def decorate(body: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(body)
        def command(**kwargs: Any) -> None:
            values = {k: v for k, v in kwargs.items() if k not in extra_names}
            try:
                config = build_config(cls, values, exclude)
            except ValueError as err:
                fail(str(err))
            body(config, **{k: kwargs[k] for k in extra_names})

        command.__signature__ = signature  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        del command.__wrapped__  # typer must read the generated signature, not body's
        return command

    return decorate
