"""``python -m huatuo_ray STAGE --config FILE [key.sub=value ...] [--key value ...] [--debug]``.

Every stage is one recipe; this only parses the command line, loads and checks the config and the
stage's inputs, and calls the recipe's ``main``. Inside a Ray job's temporary copy of the working
directory, relative paths resolve against ``root=`` or ``$HUATUO_ROOT`` first
(:mod:`huatuo_ray.locations`); a stage ends by printing where its outputs are. ``--help`` lists the stages; ``STAGE --help``
documents its config.

Exit codes: 0 done; 2 a mistake the user can fix (a config error, a missing input, an unreachable
cluster: one line, its traceback only with ``--debug``); 1 a teacher stage that cannot succeed
(a fatal teacher error, too many rejects: one line) or a bug (with its traceback).
"""

from __future__ import annotations

import logging
import re
import sys

from huatuo_ray import locations
from huatuo_ray.config import ConfigError, describe, load_config
from huatuo_ray.inputs import check_inputs, user_error_in
from huatuo_ray.stages import STAGES

USAGE = (
    "usage: python -m huatuo_ray STAGE [--config FILE] [key.sub=value ...] [--key value ...]"
    " [--debug]"
)


def _overview() -> str:
    width = max(len(n) for n in STAGES)
    lines = [USAGE, "", "HuatuoGPT's recipe as Ray jobs. Stages:"]
    lines += [f"  {name:<{width}}  {stage.summary}" for name, stage in STAGES.items()]
    lines += ["", "python -m huatuo_ray STAGE --help documents a stage's config."]
    return "\n".join(lines)


def split_args(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """(config path, overrides, help wanted). ``--a.b value`` and ``--a.b=value`` are overrides."""
    config, overrides, want_help = None, [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("command line: --config needs a file")
                i += 1
                config = argv[i]
        elif arg.startswith("--"):
            key = arg[2:].replace("-", "_")
            if "=" in key:
                overrides.append(key)
            elif i + 1 >= len(argv) or re.match(r"--|[a-z_][\w.]*=", argv[i + 1]):
                overrides.append(f"{key}=true")  # a bare flag: --dry-run, --strict
            else:
                i += 1
                overrides.append(f"{key}={argv[i]}")
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"command line: unexpected argument {arg!r} (want key=value)")
        i += 1
    return config, overrides, want_help


def _root_override(overrides: list[str]) -> str | None:
    roots = [o.split("=", 1)[1] for o in overrides if o.startswith("root=")]
    return roots[-1] if roots else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0
    name, rest = argv[0], [a for a in argv[1:] if a != "--debug"]
    debug = len(rest) < len(argv) - 1
    if name not in STAGES:
        print(f"unknown stage {name!r}\n\n{_overview()}", file=sys.stderr)
        return 2
    config_cls, run = STAGES[name].load()
    try:
        config_path, overrides, want_help = split_args(rest)
        if want_help:
            print(f"python -m huatuo_ray {name}: {STAGES[name].summary}\n")
            print((config_cls.__doc__ or "").strip() + "\n\nConfig keys:")
            print("\n".join(describe(config_cls)))
            return 0
        if STAGES[name].config_names and config_path:  # `plan --config X`: X is its subject
            overrides, config_path = (
                [f"{STAGES[name].config_names}={config_path}", *overrides],
                None,
            )
        config = load_config(config_cls, config_path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from huatuo_ray.teacher.client import TeacherFatalError
    from huatuo_ray.teacher.stage import TooManyRejects

    try:
        locations.settle(name, config, _root_override(overrides))
        check_inputs(config)
        run(config)
        locations.report(name, config)
    except Exception as e:
        if debug:
            raise
        if isinstance(
            e, (TeacherFatalError, TooManyRejects)
        ):  # a teacher stage that cannot succeed
            print(f"{name} failed: {e}", file=sys.stderr)
            return 1
        mistake = user_error_in(e)
        if mistake is None:
            raise
        print(f"{name}: {mistake}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
