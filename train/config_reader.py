"""The one reader of every stage's config: TOML presets, ``--section.key=value`` overrides, ``to_toml``, ``--help``.

    from train.config import RunConfig                  # pretraining; rlhf's stages subclass it
    cfg = RunConfig.from_toml("configs/pretrain/tiny_cpu.toml", ["--train.steps=20", "--run.dir", "runs/x"])
    print(RunConfig.help_text(prog="python -m train", example="--config configs/pretrain/tiny_cpu.toml"))

A root config is a frozen dataclass whose fields are *sections*, themselves frozen dataclasses with a docstring
per field (one TOML table each). Every stage's root config is the shared run sections of ``train.config.RunConfig``
plus its own section(s) (``[sft]``, ``[rm]``, ``[gatt]``, PPO's ``[ppo]`` ...), read by the code below:

- values are coerced to the field's type; an unknown section or key, a value of the wrong type, a section that
  is not a table, a file that is not TOML: ``ConfigError`` quoting the value and naming the fix;
- a field typed ``dict`` is a free table (``--model.overrides.vocab_size=4096``), checked by the root's
  ``coerce_table``;
- a stage changes a shared section's defaults by its field's default (``train: TrainSection =
  field(default_factory=lambda: TrainSection(steps=0))``): omitted keys take the stage's defaults;
- ``MOVED`` maps keys a stage renamed to their new place (the error says where); ``UNUSED`` lists shared keys a
  stage does not read (``--help`` says so, ``check_unused`` refuses a changed value instead of ignoring it).

``ConfigError`` is a ``ValueError``: the stage CLIs print it as one ``error: ...`` line (exit 2) and leave every
other exception, raised inside training, with its traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

R = TypeVar("R", bound="RootConfig")


class ConfigError(ValueError):
    """A config value, or a file a config names, that cannot be used; the message quotes it and names the fix."""


def check(ok: bool, message: str, *, what: str = "run config") -> None:
    """Raise ``ConfigError("invalid {what}: {message}")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid {what}: {message}")


def coerce(value: Any, typ: Any, *, where: str) -> Any:
    """Convert a TOML value or a command-line string to ``typ`` (bool/int/float/str/Optional/dict/list; a list
    from the command line is comma-separated: ``--eval.tasks=boolq,piqa``)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], where=where)
    if origin is dict or typ is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ) or (str,)
        return [coerce(v, item, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        return _coerce_int(value, where=where)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        return str(value)
    return value


def _coerce_int(value: Any, *, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        as_float = float(str(value).replace("_", ""))
    except ValueError:
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if not as_float.is_integer():
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return int(as_float)


def parse_overrides(argv: list[str], *, sections: typing.Iterable[str] = ()) -> list[tuple[str, Any]]:
    """``["--a.b=1", "--c.d", "x", "--resume", "auto"]`` -> ``[("a.b", "1"), ("c.d", "x"), ("run.resume", "auto")]``."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        key, has_eq, value = arg[2:].partition("=")
        if not has_eq:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _is_number(argv[i + 1])):
                raise ConfigError(f"override {arg!r} has no value: write {arg}=VALUE or {arg} VALUE")
            value = argv[i + 1]
            i += 1
        key = key.replace("-", "_") if "." not in key else key
        if key == "resume":
            key = "run.resume"
        if "." not in key:
            raise ConfigError(f"override --{key}: write --section.key=value; sections: {sorted(sections)}")
        out.append((key, value))
        i += 1
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _did_you_mean(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def toml_value(v: Any) -> str:
    """One value in TOML syntax (bool, number, string, inline table, array)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and its dataclass bases), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == "builtins":
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        except (OSError, TypeError):  # no source (frozen or generated): no docs, not an error
            continue
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is dict or typ is dict:
        return "table"
    if typing.get_origin(typ) is list:
        return "list"
    return getattr(typ, "__name__", str(typ).replace("typing.", ""))


@dataclass(frozen=True)
class RootConfig:
    """Base of every root config: each dataclass field of a subclass is one section (see the module docstring)."""

    WHAT: ClassVar[str] = "config"
    """What ``check`` calls this config in its messages ("run config", "PPO config")."""
    PRESETS: ClassVar[str] = "configs/"
    """Where the presets of this stage live (named when a --config file does not exist)."""
    MOVED: ClassVar[dict[str, str]] = {}
    """``"old_section.key" -> "section.key"`` for keys this stage renamed."""
    UNUSED: ClassVar[tuple[str, ...]] = ()
    """``"section.key"`` of shared sections that this stage does not read."""
    DOCS: ClassVar[dict[str, str]] = {}
    """``"section.key" -> docstring`` where a shared key means something more specific in this stage."""

    # ---- schema ------------------------------------------------------------------------------------
    @classmethod
    def sections(cls) -> dict[str, type]:
        """Section name -> section dataclass (the root's dataclass fields; class variables excluded)."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def coerce_table(cls, section: str, key: str, table: dict[str, Any], *, source: str) -> dict[str, Any]:
        """Check and coerce the free table ``[section.key]`` (a ``dict`` field); the base takes it as given."""
        return table

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any], *, source: str = "<dict>") -> R:
        """Build the config from nested tables; omitted sections and keys take this stage's defaults."""
        sections = cls.sections()
        for name, table in data.items():
            for key in (table if isinstance(table, dict) else {}):
                cls._refuse_moved(f"{name}.{key}", source=source)
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; valid sections: {sorted(sections)}"
                              + _did_you_mean(unknown[0], sections))
        defaults = cls()
        built = {}
        for name, section_cls in sections.items():
            table = data.get(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [{name}] must be a table, got {table!r}")
            hints = typing.get_type_hints(section_cls)
            bad = sorted(set(table) - set(hints))
            if bad:
                raise ConfigError(f"{source}: unknown key(s) {bad} in [{name}]; valid keys: {sorted(hints)}"
                                  + _did_you_mean(bad[0], hints))
            kwargs = {k: coerce(v, hints[k], where=f"{source}: {name}.{k}") for k, v in table.items()}
            for key, value in kwargs.items():
                if isinstance(value, dict):
                    kwargs[key] = cls.coerce_table(name, key, value, source=source)
            built[name] = dataclasses.replace(getattr(defaults, name), **kwargs)
        return cls(**built)

    @classmethod
    def from_toml(cls: type[R], path: str | Path | None, overrides: list[str] | None = None) -> R:
        """Read a TOML preset (or start from the defaults with ``path=None``) and apply CLI overrides."""
        data: dict[str, Any] = {}
        source = "<defaults>"
        if path is not None:
            source = str(path)
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist; presets are in {cls.PRESETS}") from None
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{path}: not valid TOML: {err}") from None
        for key, value in parse_overrides(overrides or [], sections=cls.sections()):
            cls._set_dotted(data, key, value)
        return cls.from_dict(data, source=source + (" + overrides" if overrides else ""))

    @classmethod
    def _refuse_moved(cls, key: str, *, source: str) -> None:
        if key in cls.MOVED:
            new = cls.MOVED[key]
            section, _, field_name = new.partition(".")
            raise ConfigError(f"{source}: {key} is now {new} (every stage reads the same run sections): write "
                              f"--{new}=VALUE, or {field_name} = VALUE under [{section}] in the TOML")

    @classmethod
    def _set_dotted(cls, data: dict[str, Any], key: str, value: Any) -> None:
        sections = cls.sections()
        parts = key.split(".")
        cls._refuse_moved(".".join(parts[:2]), source=f"override --{key}")
        if parts[0] not in sections:
            raise ConfigError(f"override --{key}: unknown section {parts[0]!r}; valid sections: {sorted(sections)}"
                              + _did_you_mean(parts[0], sections))
        valid = typing.get_type_hints(sections[parts[0]])
        if len(parts) == 3 and parts[1] in valid and typing.get_origin(valid[parts[1]]) is dict:
            data.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = value
            return
        if len(parts) != 2:
            tables = [f"--{parts[0]}.{k}.FIELD" for k, t in valid.items() if typing.get_origin(t) is dict]
            raise ConfigError(f"override --{key}: expected --section.key" + (f" (or {', '.join(tables)})"
                                                                             if tables else ""))
        if parts[1] not in valid:
            raise ConfigError(f"override --{key}: unknown key {parts[1]!r} in [{parts[0]}]; valid keys: "
                              f"{sorted(valid)}" + _did_you_mean(parts[1], valid))
        data.setdefault(parts[0], {})[parts[1]] = value

    def replace(self: R, **sections: dict[str, Any]) -> R:
        """``cfg.replace(train={"steps": 5})``: a copy with some fields of some sections changed."""
        changes = {name: dataclasses.replace(getattr(self, name), **kw) for name, kw in sections.items()}
        return dataclasses.replace(self, **changes)

    def check_unused(self) -> None:
        """Refuse a changed value of a key this stage does not read (``UNUSED``): it would be ignored silently."""
        defaults = type(self)()
        for key in self.UNUSED:
            section, _, name = key.partition(".")
            mine, default = getattr(getattr(self, section), name), getattr(getattr(defaults, section), name)
            check(mine == default, f"{key}={mine!r} has no effect in this stage (it reads no {key}); remove it "
                  f"(default {default!r})", what=self.WHAT)

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """Serialise (scalars, then each free table as ``[section.table]``); ``from_toml`` reads it back equal."""
        lines: list[str] = []
        for name, table in self.to_dict().items():
            nested = {k: v for k, v in table.items() if isinstance(v, dict)}
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
            for sub, values in nested.items():
                lines.append(f"[{name}.{sub}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)

    def save_toml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())

    # ---- --help ------------------------------------------------------------------------------------
    @classmethod
    def help_text(cls, *, prog: str, example: str) -> str:
        """Every section and key with its type, this stage's default and its docstring; the override syntax."""
        defaults = cls()
        lines = [f"configuration ({cls.__name__}): a TOML preset (--config FILE, presets in {cls.PRESETS}) and/or",
                 "overrides --section.key=VALUE or --section.key VALUE (a table field: --section.table.FIELD=VALUE);",
                 "later overrides win. Example:", f"  {prog} {example}", ""]
        for name, section_cls in cls.sections().items():
            lines.append(f"[{name}]")
            docs = {**field_docs(section_cls), **{k.partition(".")[2]: v for k, v in cls.DOCS.items()
                                                  if k.partition(".")[0] == name}}
            hints = typing.get_type_hints(section_cls)
            for f in dataclasses.fields(section_cls):
                default = getattr(getattr(defaults, name), f.name)
                unused = "  (not read by this stage)" if f"{name}.{f.name}" in cls.UNUSED else ""
                lines.append(f"  --{name}.{f.name} ({_type_name(hints[f.name])}, default {toml_value(default)})"
                             + unused)
                if docs.get(f.name):
                    lines += textwrap.wrap(docs[f.name], width=110, initial_indent="      ",
                                           subsequent_indent="      ")
            lines.append("")
        return "\n".join(lines)


def add_config_arguments(parser: Any, config_cls: type[RootConfig], *, prog: str, example: str) -> None:
    """``--config FILE`` on an argparse parser, and the config's generated reference as its ``--help`` epilog
    (the parser needs ``formatter_class=argparse.RawDescriptionHelpFormatter``); overrides stay unparsed
    (``parse_known_args``) for ``from_toml``."""
    parser.add_argument("--config", default=None, help=f"a TOML preset ({config_cls.PRESETS}*.toml); "
                        "--section.key=VALUE overrides follow, see below")
    parser.epilog = config_cls.help_text(prog=prog, example=example)


class FlagHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of the flag CLIs (``rlhf.evaluate_rm``, ``rlhf.rejection_sampling``, ``rlhf.gatt build|eval``, ...):
    the module docstring as written (its example commands) and every flag's default after its help (required
    flags and switches have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and not action.required
        return f"{text} (default: %(default)s)" if shown and "%(default)" not in text else text

