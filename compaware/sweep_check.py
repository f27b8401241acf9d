"""The command line checked before Hydra composes: names (:func:`check_names`), and a
sweep's values before any job runs (:func:`check_sweep`, ``compaware train -m ...``).

Hydra answers a misspelt group or key (``regularizr=lowrank``) with the advice to add it
(``+regularizr=lowrank``), which the schema then refuses anyway. :func:`check_names` names
the group, key or option that does not exist, the closest that does, and those available.

Hydra composes each job's config only when the job starts, so one ill-typed value
(``-m schedule.epochs=1,abc,1``) or unknown option (``model=lenet300,resnet5``) used to stop
the sweep at that job, after the jobs before it and with the rest never run. Every value of
every enumerable sweep (lists, ``range``, ``choice``) is composed, validated and instantiated
here first, one value at a time with the other overrides; if any is refused the whole sweep
is, with one message naming every invalid value, and nothing runs. Searches over intervals
(Optuna) draw their values later and are checked by each trial.
"""

from __future__ import annotations

import difflib

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from compaware.config import (
    COMPRESS_RUN,
    CONF_DIR,
    UserError,
    check_compress_run,
    instantiate,
    validate,
)
from compaware.train_help import (
    TARGET_GROUPS,
    chosen_options,
    groups,
    option_keys,
    schema_keys,
    schema_nodes,
    top_level_keys,
)

MULTIRUN_FLAGS = ("-m", "--multirun")


def _overrides(argv: list[str]) -> list[str]:
    """The overrides of ``argv`` (the command line after ``train``) that are compaware's,
    not flags nor Hydra's own settings."""
    return [arg for arg in argv if not arg.startswith("-")
            and not arg.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]


def check_names(argv: list[str]) -> None:
    """Raise a :class:`UserError` for the first override of ``argv`` that changes a group,
    key or option compaware does not have. Additions (``+key=value``) and deletions
    (``~key``) keep Hydra's meaning and its checks."""
    try:
        parsed = OverridesParser.create().parse_overrides(_overrides(argv))
    except HydraException:
        return  # a syntax error: Hydra's own message says where
    options = _known_options(argv)
    for override in parsed:
        if override.type is OverrideType.CHANGE:
            problem = _unknown_name(override) or _unknown_option_key(override, options)
            if problem:
                raise UserError(f"{override.input_line}: {problem}")


def _unknown_name(override: Override) -> str | None:
    """What ``override`` names that does not exist, with the closest names, or None."""
    options, nodes = groups(), schema_nodes()
    head, _, rest = override.key_or_group.partition(".")
    if head not in options and head not in nodes and head not in top_level_keys():
        names = [*options, *top_level_keys()]
        return (f"compaware train has no config group or key {head!r}.{_close(head, names)} "
                f"The groups: {', '.join(options)}; the top-level keys: "
                f"{', '.join(top_level_keys())} (`compaware train --help` describes them).")
    if rest and head in nodes:
        keys = list(schema_keys(nodes[head]))
        key = rest.partition(".")[0]
        if key not in keys:
            return (f"{head} has no key {key!r}.{_close(key, keys)} Its keys: "
                    f"{', '.join(keys)}.")
    if not rest and head in options and not override.is_sweep_override():
        # a sweep's unknown options are named, every one, by check_sweep
        unknown = [value for value in _values(override) if value not in options[head]]
        if unknown:
            return (f"there is no option {head}/{unknown[0]} (no "
                    f"compaware/conf/{head}/{unknown[0]}.yaml).{_close(unknown[0], options[head])}"
                    f" The options of {head}: {', '.join(options[head])}.")
    return None


def _known_options(argv: list[str]) -> dict[str, str | None]:
    """The option of each ``_target_`` group whose keys ``argv`` leaves certain: not where an
    experiment may switch it, a sweep picks several, or ``group._target_`` names another
    factory (whose keys are its own)."""
    if any(arg.startswith(("experiment=", "+experiment=")) for arg in argv):
        return {}
    def uncertain(group: str) -> bool:
        return any(arg.startswith(f"{group}=") and "," in arg
                   or arg.startswith(f"{group}._target_=") for arg in argv)

    chosen = chosen_options(argv)
    return {group: chosen.get(group) for group in TARGET_GROUPS if not uncertain(group)}


def _unknown_option_key(override: Override, options: dict[str, str | None]) -> str | None:
    """What a key of a ``_target_`` group's option (``regularizer.lamm``) names that the
    option does not take, with the closest, or None."""
    head, _, rest = override.key_or_group.partition(".")
    keys = option_keys(head, options[head]) if rest and head in options else None
    key = rest.partition(".")[0]
    if keys is None or key in keys:
        return None
    return (f"{head}={options[head]} has no key {key!r}.{_close(key, keys)} Its keys: "
            f"{', '.join(keys)} (`compaware train {head}={options[head]} --help` describes "
            f"them).")


def _values(override: Override) -> list[str]:
    """The options a group override picks (one, or a sweep's list); none where the sweeper
    chooses them later (globs) or the value removes the group (null)."""
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except HydraException:
            return []
    value = override.value()
    return [] if value is None else [str(value)]


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f" Did you mean {close[0]}?" if close else ""


def check_sweep(argv: list[str], config_name: str = "config") -> None:
    """Raise a :class:`UserError` naming every invalid value of the sweep in ``argv`` (the
    command line after ``train``, or ``compress``: ``config_name`` is then
    :data:`~compaware.config.COMPRESS_RUN`); nothing when it is not a sweep."""
    if not any(arg in MULTIRUN_FLAGS for arg in argv):
        return
    overrides = _overrides(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # a syntax error: Hydra's own message says where
    fixed = [text for text, o in zip(overrides, parsed, strict=True) if not o.is_sweep_override()]
    invalid = []
    for override in parsed:
        try:
            values = list(dict.fromkeys(override.sweep_string_iterator()))
        except HydraException:
            continue  # not enumerable before the sweeper runs (intervals, globs)
        for value in values:
            job = f"{override.get_key_element()}={value}"
            reason = _unknown_name(OverridesParser.create().parse_override(job)) or _refusal(
                [*fixed, job], config_name)
            if reason:
                invalid.append(f"{job}: {reason}")
    if invalid:
        raise UserError("the sweep has invalid values, so none of its jobs ran:\n  "
                        + "\n  ".join(invalid)
                        + "\nCorrect or drop these values and start the sweep again.")


def _refusal(overrides: list[str], config_name: str) -> str | None:
    """Why the job of ``overrides`` (composed from ``config_name``) would be refused at its
    start, or None."""
    if GlobalHydra.instance().is_initialized():  # inside a running app: compose its own way
        return None
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=[*overrides, "paths.run_dir=sweep-check"])
        if config_name == COMPRESS_RUN:
            check_compress_run(cfg)
        validate(cfg)
        regularizer = instantiate(cfg.regularizer, "regularizer")
        compressor = instantiate(cfg.compress, "compress")
        compressor.check_requires(regularizer.publishes,
                                  f"this run's regularizer, {type(regularizer).__name__}")
    except (UserError, HydraException, OmegaConfBaseException) as e:
        why = [str(e).strip().splitlines()[0]]
        if e.__cause__ is not None:  # Hydra's composition errors keep the reason here
            why.append(str(e.__cause__).strip().splitlines()[0])
        return ": ".join(why)
    return None
