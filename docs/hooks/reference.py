"""MkDocs hook: the reference pages' tables, generated at build time from the code itself.

A page asks for a table with a marker on a line of its own:

- `<!-- reference: commands -->`: every command of the `pipeline` typer app, a line each;
- `<!-- reference: command NAME [module:Config] -->`: one command's usage, arguments and options. With a
  config class, an option whose parameter is a field of that class takes its type, default, limits and
  description from the field (its docstring, through `use_attribute_docstrings`), and the fields that no
  flag sets are listed after it as config-file keys;
- `<!-- reference: fields module:Model -->`: the fields of a pydantic model (e.g. a harvest source mapping).

Everything is read from the live objects (`typer.main.get_command(pipeline.app)` and `Model.model_fields`),
so a new option or field appears on the next build, and a removed one disappears.
"""

import importlib
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!--\s*reference:\s*(.+?)\s*-->\s*$", re.MULTILINE)
NO_DEFAULT = "—"


def _import(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _cli():
    """The click group behind the typer app, with its commands in the order pipeline.py declares them."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import typer.main

    import pipeline

    return typer.main.get_command(pipeline.app)


def _cell(text: str) -> str:
    """One table cell: a single line; outside code spans, pipes escaped and `<` kept as text, not HTML."""
    parts = re.split(r"(`[^`]*`)", " ".join(str(text).split()))
    return "".join(p if p.startswith("`") else p.replace("|", r"\|").replace("<", "&lt;") for p in parts)


def _code(value: str) -> str:
    return f"`` {value} ``" if "`" in value else f"`{value}`"


def _annotation(annotation) -> str:
    """A field's type as a reader would say it: `int`, `path`, one of `a`, `b`; list of ...; sources."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(_code(str(a)) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(_annotation(a) for a in args)
    if origin in (list, tuple, set):
        (inner, *_) = get_args(annotation) or (Any,)
        return f"list of {_annotation(inner)}"
    if inspect.isclass(annotation):
        if issubclass(annotation, Path):
            return "path"
        if getattr(annotation, "model_fields", None) is not None:  # a nested pydantic model
            return annotation.__name__
        return {"str": "text", "bool": "bool", "int": "int", "float": "float"}.get(annotation.__name__,
                                                                                   annotation.__name__)
    return str(annotation)


def _limits(field) -> str:
    """The field's numeric bounds (pydantic's ge/gt/le/lt), e.g. `> 0, < 1`."""
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = []
    for item in field.metadata:
        for attr, sign in signs.items():
            if getattr(item, attr, None) is not None:
                found.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(found)


def _plain(value: Any) -> Any:
    """A default as it would be written in YAML: a source mapping with only `source` set is that string."""
    if hasattr(value, "model_dump"):
        dumped = value.model_dump(mode="json", exclude_defaults=True)
        return dumped.get("source", dumped) if len(dumped) == 1 else dumped
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _show(value: Any) -> str:
    if value is None or value == "":
        return NO_DEFAULT
    if isinstance(value, bool):
        return _code("true" if value else "false")
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value) if value else "none"
    return _code(str(value))


def _field_default(field) -> str:
    if field.default_factory is not None:
        return _show(_plain(field.default_factory()))
    return _show(_plain(field.default))


def _flags(param) -> str:
    names = [*param.opts, *getattr(param, "secondary_opts", [])]
    return " / ".join(_code(n) for n in names)


def _param_type(param) -> str:
    """A command-line parameter's type, from the annotation typer built it from."""
    if getattr(param, "is_flag", False) and not param.secondary_opts:
        return "flag"
    annotation = param.type_descriptor.annotation
    if param.multiple or param.nargs == -1:  # typer annotates a repeatable option as list[X]
        (annotation, *_) = get_args(annotation) or (annotation,)
    kind = _annotation(annotation)
    return kind + (", repeatable" if param.multiple or param.nargs == -1 else "")


def _param_default(param) -> str:
    default = param.default
    if getattr(param, "is_flag", False) and param.secondary_opts:
        return _code(param.opts[0] if default else param.secondary_opts[0])
    if getattr(param, "is_flag", False):
        return "off" if not default else "on"
    if callable(default):
        default = default()
    return _show(_plain(default))


def _help(param) -> str:
    return getattr(param, "help", None) or ""


def _field_row(name: str, field, flag: str, extra: str = "", repeatable: bool = False) -> str:
    kind = _annotation(field.annotation)
    limits = _limits(field)
    if limits:
        kind += f", {limits}"
    if repeatable:
        kind += "; the flag repeats"
    text = field.description or ""
    if extra and extra.strip() != text.strip():
        text = f"{text} On the command line: {extra}" if text else extra
    return f"| {flag} | `{name}` | {_cell(kind)} | {_field_default(field)} | {_cell(text)} |"


def _usage(name: str, command) -> str:
    pieces = ["pipeline", name, "[OPTIONS]"]
    for p in command.params:
        if p.param_type_name == "argument":
            piece = p.name.upper() + ("..." if p.nargs == -1 else "")
            pieces.append(piece if p.required else f"[{piece}]")
    return " ".join(pieces)


def _command(cli, name: str, config_spec: str | None) -> str:
    command = cli.commands.get(name)
    if command is None:
        raise ValueError(f"reference: `pipeline` has no command {name!r} (it has {sorted(cli.commands)})")
    config = _import(config_spec) if config_spec else None
    fields = dict(config.model_fields) if config else {}
    out = [f"```\n{_usage(name, command)}\n```", "", inspect.cleandoc(command.help or ""), ""]

    arguments = [p for p in command.params if p.param_type_name == "argument"]
    if arguments:
        out += ["**Arguments**", "", "| Argument | Type | Required | Description |", "|---|---|---|---|"]
        for p in arguments:
            out.append(f"| `{p.name.upper()}` | {_cell(_param_type(p))} | {'yes' if p.required else 'no'} | "
                       f"{_cell(_help(p))} |")
        out.append("")

    options = [p for p in command.params if p.param_type_name == "option"]
    config_options = [p for p in options if p.name in fields]
    other_options = [p for p in options if p.name not in fields]
    if config_options:
        where = config.__module__.replace(".", "/") + ".py"
        out += [f"**Options** (fields of `{config.__name__}` in `{where}`: each is also a key of a YAML config "
                "file; a flag that is given wins over the file)", "",
                "| Flag | Config key | Type | Default | Description |", "|---|---|---|---|---|"]
        for p in config_options:
            out.append(_field_row(p.name, fields[p.name], _flags(p), _help(p), repeatable=p.multiple))
        out.append("")
    if other_options:
        title = "Options of the command line only" if config_options else "Options"
        out += [f"**{title}**", "", "| Flag | Type | Default | Description |", "|---|---|---|---|"]
        for p in other_options:
            out.append(f"| {_flags(p)} | {_cell(_param_type(p))} | {_param_default(p)} | {_cell(_help(p))} |")
        out.append("")
    unflagged = [n for n in fields if n not in {p.name for p in options}]
    if unflagged:
        out += [f"**Config-file keys without a flag** (set them in the YAML file)", "",
                "| Flag | Config key | Type | Default | Description |", "|---|---|---|---|---|"]
        out += [_field_row(n, fields[n], NO_DEFAULT) for n in unflagged]
        out.append("")
    return "\n".join(out)


def _fields(spec: str) -> str:
    model = _import(spec)
    out = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind = _annotation(field.annotation)
        if _limits(field):
            kind += f", {_limits(field)}"
        default = "required" if field.is_required() else _field_default(field)
        out.append(f"| `{name}` | {_cell(kind)} | {default} | {_cell(field.description or '')} |")
    return "\n".join(out) + "\n"


def _commands(cli) -> str:
    out = ["| Command | What it does |", "|---|---|"]
    for name, command in cli.commands.items():
        summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
        out.append(f"| [`pipeline {name}`](#pipeline-{name}) | {_cell(summary)} |")
    return "\n".join(out) + "\n"


def _every_command(cli, configs: dict[str, str]) -> str:
    """A section per command; those with a config page of their own are a line each, linking to it, and no
    section (a section would put them in the navigation a second time, beside their own page)."""
    out = ["Commands with a page of their own (usage, arguments and every option):", ""]
    for name in (n for n in cli.commands if n in configs):
        summary = " ".join(inspect.cleandoc(cli.commands[name].help or "").split("\n\n")[0].split())
        # the id keeps the command table's `#pipeline-NAME` link landing here, one click from the page
        out.append(f"- [`pipeline {name}`]({configs[name]}){{#pipeline-{name}}}: {summary}")
    out.append("")
    for name in (n for n in cli.commands if n not in configs):
        out += [f"## `pipeline {name}`", "", _command(cli, name, None), ""]
    return "\n".join(out)


def expand(markdown: str) -> str:
    """The page with every reference marker replaced by its generated table."""
    if not MARKER.search(markdown):
        return markdown
    cli = _cli()

    def replace(match: re.Match) -> str:
        kind, *args = match.group(1).split()
        if kind == "commands":
            return _commands(cli)
        if kind == "command":
            return _command(cli, args[0], args[1] if len(args) > 1 else None)
        if kind == "fields":
            return _fields(args[0])
        if kind == "every-command":  # NAME=page.md ... for the commands documented on pages of their own
            return _every_command(cli, dict(a.split("=", 1) for a in args))
        if kind == "global-options":
            options = [p for p in cli.params if p.param_type_name == "option"]
            rows = [f"| {_flags(p)} | {_cell(_help(p))} |" for p in options]
            return "\n".join(["| Flag | Description |", "|---|---|", *rows]) + "\n"
        raise ValueError(f"unknown reference marker: {match.group(0)}")

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return expand(markdown)
