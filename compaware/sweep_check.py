"""A sweep's values checked before any job runs (``compaware train -m ...``).

Hydra composes each job's config only when the job starts, so one ill-typed value
(``-m schedule.epochs=1,abc,1``) or unknown option (``model=lenet300,resnet5``) used to stop
the sweep at that job, after the jobs before it and with the rest never run. Every value of
every enumerable sweep (lists, ``range``, ``choice``) is composed, validated and instantiated
here first, one value at a time with the other overrides; if any is refused the whole sweep
is, with one message naming every invalid value, and nothing runs. Searches over intervals
(Optuna) draw their values later and are checked by each trial.
"""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from compaware.config import CONF_DIR, UserError, instantiate, validate

MULTIRUN_FLAGS = ("-m", "--multirun")


def check_sweep(argv: list[str]) -> None:
    """Raise a :class:`UserError` naming every invalid value of the sweep in ``argv`` (the
    command line after ``train``); nothing when it is not a sweep."""
    if not any(arg in MULTIRUN_FLAGS for arg in argv):
        return
    overrides = [arg for arg in argv if not arg.startswith("-")
                 and not arg.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
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
            reason = _refusal([*fixed, f"{override.get_key_element()}={value}"])
            if reason:
                invalid.append(f"{override.get_key_element()}={value}: {reason}")
    if invalid:
        raise UserError("the sweep has invalid values, so none of its jobs ran:\n  "
                        + "\n  ".join(invalid)
                        + "\nCorrect or drop these values and start the sweep again.")


def _refusal(overrides: list[str]) -> str | None:
    """Why the job of ``overrides`` would be refused at its start, or None."""
    if GlobalHydra.instance().is_initialized():  # inside a running app: compose its own way
        return None
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "paths.run_dir=sweep-check"])
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
