"""``compaware train --help``: the config groups with their options and the keys, each
described, read from the config tree and the schema without importing torch (the help
answers in about a second, not in the twenty seconds the run's imports take).

The descriptions are the comments of compaware/conf: an option's is the first sentence of
its file's leading comment, a key's is its line's comment (or the comment lines just above
it) in the file that sets it, else in the schema (compaware/config.py). The same names serve
the check of overrides before Hydra composes (compaware/sweep_check.py).
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import re
import shutil
import typing
from pathlib import Path

import yaml

from compaware import config
from compaware.config import CONF_DIR, RunConfig

CONF = Path(CONF_DIR)
HELP_FLAGS = ("--help", "-h")
# Groups whose options are instantiated from ``_target_``: their keys depend on the option.
TARGET_GROUPS = ("model", "regularizer", "compress")
SKIPPED_KEYS = ("paths",)  # the run directory: set with hydra.run.dir, not by hand
# The layer selection every regularizer and most compressors take (compaware/layers.py),
# described once here rather than in each of their files.
LAYER_KEYS = {"layers": "the layers acted on: all | conv | linear",
              "skip_first": "leave the model's first weight layer alone",
              "skip_last": "leave the model's last weight layer (the classifier) alone"}
KEY_LINE = re.compile(r"^(\w+)\s*:\s*([^#]*?)\s*(?:#\s?(.*))?$")  # key: value # text


@functools.cache  # read once per process: every override's check asks
def groups() -> dict[str, list[str]]:
    """Each config group of compaware/conf (Hydra's own excepted) → its options, sorted."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONF.iterdir()) if d.is_dir() and d.name != "hydra"}


@functools.cache
def schema_nodes() -> dict[str, type]:
    """The nodes of the run's schema that are dataclasses (``schedule`` → ScheduleConfig)."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)
            if dataclasses.is_dataclass(hints[f.name])}


@functools.cache
def top_level_keys() -> list[str]:
    """The keys of the run's top level that are values, not nodes (``seed``, ``device``)."""
    nodes = schema_nodes()
    return [f.name for f in dataclasses.fields(RunConfig)
            if f.name not in nodes and f.name not in groups()]


def defaults() -> dict[str, str | None]:
    """Each group's default option, from config.yaml's defaults list."""
    chosen: dict[str, str | None] = {}
    for entry in yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            (group, option), = entry.items()
            if not group.startswith("override"):
                chosen[group] = option
    return chosen


def _leading_comment(path: Path) -> str:
    """The comment lines at the top of ``path``, joined (Hydra's ``@package`` line left out)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def first_sentence(text: str) -> str:
    """``text`` up to its first full stop followed by a space (or all of it)."""
    end = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.\s", text + " ")  # not "et al. "
    return text[:end.start() + 1] if end else text


def commented_keys(lines: list[str]) -> dict[str, tuple[str, str]]:
    """``key: value  # comment`` lines at the top level of a YAML file → {key: (value,
    comment)}, the comment being the line's own or else the comment lines just above it (the
    file's leading comment describes the file, not its first key)."""
    keys, above = {}, []
    start = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    for line in lines[start:]:
        if line.startswith("#"):
            above.append(line.lstrip("#").strip())
            continue
        match = KEY_LINE.match(line)
        if match and match[1] not in ("defaults", "_target_", "hydra"):
            keys[match[1]] = (match[2], match[3] or " ".join(above))
        above = []
    return keys


def _as_value(value: object) -> str:
    """A default of the schema as it is written on the command line (null, true, [a,b])."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return "[" + ",".join(map(_as_value, value)) + "]"
    return str(value)


@functools.cache
def schema_keys(schema: type) -> dict[str, tuple[str, str]]:
    """The fields of the dataclass ``schema`` → (default, the comment of its line in
    compaware/config.py, or the comment lines just above it)."""
    source = Path(config.__file__).read_text()
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == schema.__name__:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    own = lines[stmt.end_lineno - 1][stmt.end_col_offset:].partition("#")[2]
                    above = []
                    for line in reversed(lines[:stmt.lineno - 1]):
                        if not line.strip().startswith("#"):
                            break
                        above.insert(0, line.strip().lstrip("#").strip())
                    comments[stmt.target.id] = own.strip() or " ".join(above)
    keys = {}
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "…" if default is dataclasses.MISSING or default == "???" else _as_value(default)
        keys[f.name] = (shown, comments.get(f.name, ""))
    return keys


def chosen_options(argv: list[str]) -> dict[str, str | None]:
    """The option of each group: ``group=option`` from ``argv``, else config.yaml's default."""
    chosen = defaults()
    for arg in argv:
        group, _, option = arg.partition("=")
        if group in chosen and option and "," not in option:
            chosen[group] = option
    return chosen


def option_keys(group: str, option: str | None) -> list[str] | None:
    """The keys the option ``group/option`` takes (its file's), or None where they cannot be
    read without composing: no such file, or a file that composes others."""
    path = CONF / group / f"{option}.yaml"
    if not path.is_file():
        return None
    content = yaml.safe_load(path.read_text()) or {}
    return None if "defaults" in content else list(content)


def _key_rows(prefix: str, keys: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{prefix}{key}={value or '…'}", comment) for key, (value, comment) in keys.items()]


def _merged(from_yaml: tuple[str, str] | None,
            from_schema: tuple[str, str]) -> tuple[str, str]:
    """A key's default and description: the YAML file's where it sets them (Hydra composes
    it over the schema), else the schema's."""
    if from_yaml is None:
        return from_schema
    return from_yaml[0] or from_schema[0], from_yaml[1] or from_schema[1]


def key_sections(argv: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(key=default, description)]) for the top level, each schema node and the
    options of the ``_target_`` groups chosen in ``argv`` (or by default)."""
    chosen = chosen_options(argv)
    config_keys = commented_keys((CONF / "config.yaml").read_text().splitlines())
    schema_top = schema_keys(RunConfig)
    top = {key: _merged(config_keys.get(key), schema_top[key]) for key in top_level_keys()}
    sections = [("top level", _key_rows("", top))]
    for name, schema in schema_nodes().items():
        if name in SKIPPED_KEYS:
            continue
        path = CONF / name / f"{chosen.get(name)}.yaml"
        from_yaml = commented_keys(path.read_text().splitlines()) if path.is_file() else {}
        keys = {key: _merged(from_yaml.get(key), entry)
                for key, entry in schema_keys(schema).items()}
        title = f"{name} ({chosen[name]})" if chosen.get(name) else name
        sections.append((title, _key_rows(f"{name}.", keys)))
    for group in TARGET_GROUPS:
        path = CONF / group / f"{chosen[group]}.yaml"
        if path.is_file():
            target = yaml.safe_load(path.read_text()).get("_target_", "")
            keys = {key: (value, comment or LAYER_KEYS.get(key, "")) for key, (value, comment)
                    in commented_keys(path.read_text().splitlines()).items()}
            sections.append((f"{group} ({chosen[group]}: {target})",
                             _key_rows(f"{group}.", keys) or [("(no keys)", "")]))
    return sections


def _cut(line: str, width: int) -> str:
    return line if len(line) <= width else line[:width - 1] + "…"


def _rows(rows: list[tuple[str, str]], indent: int, width: int) -> list[str]:
    """Two columns, the name then its description, each line cut to ``width``; a name too
    long for the first column has its description on the next line."""
    column = min(max((len(name) for name, _ in rows), default=0) + 2, 34)
    lines = []
    for name, text in rows:
        if len(name) >= column:
            lines.append(_cut(" " * indent + name, width))
            if not text:
                continue
            name = ""
        lines.append(_cut((" " * indent + name.ljust(column) + text).rstrip(), width))
    return lines


def describe(argv: list[str]) -> str:
    """The help of ``compaware train``; ``argv`` (the arguments after ``train``) may choose
    options whose keys it then describes (``compaware train compress=kmeans --help``)."""
    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    hydra_help = yaml.safe_load((CONF / "config.yaml").read_text())["hydra"]["help"]
    chosen = chosen_options(argv)
    lines = [hydra_help["header"], "",
             "usage: compaware train [group=option ...] [key=value ...] [-m] [--cfg job] "
             "[--help]", "",
             "Config groups: pick an option with group=option (* the default, > chosen here);",
             "-m group=a,b sweeps over options.", ""]
    for group, options in groups().items():
        lines.append(f"  {group}:")
        rows = []
        for option in options:
            mark = ("*" if option == defaults().get(group) else " ") + (
                ">" if option == chosen.get(group) != defaults().get(group) else " ")
            rows.append((f"{mark}{option}",
                         first_sentence(_leading_comment(CONF / group / f"{option}.yaml"))))
        lines += _rows(rows, 4, width)
    lines += ["", "Keys: change a value with key=value (the default shown; the keys of "
              "model, regularizer and",
              "compress are those of the option chosen: name it before --help to see "
              "another's).", ""]
    for title, rows in key_sections(argv):
        lines.append(f"  {title}")
        lines += _rows(rows, 4, width)
    lines += ["", "Hydra: --cfg job prints the composed config, --hydra-help Hydra's own "
              "options,", "hydra.run.dir=<dir> sets the run directory.", "",
              hydra_help["footer"]]
    return "\n".join(lines)


def wants_help(argv: list[str]) -> bool:
    """Whether the arguments after ``train`` ask for this help."""
    return any(arg in HELP_FLAGS for arg in argv)
