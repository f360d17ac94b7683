"""What every command shares: one line for a known error, its exit status, quiet libraries, and the
`--config=FILE` commands' flag parsing and validation.

`run(main)` runs a command's `main(argv)`. An error of a known class (`sdft_jax.errors`: configuration,
data, model, checkpoint, divergence) is printed as one line, `python -m sdft_jax.X: <class>: <message>`,
and the command exits with that class's status; `--debug` anywhere on the command line (taken out
before the command parses its arguments) lets the error through with its traceback. Any other error
is a bug and keeps its traceback.

The `--config` commands (`python -m sdft_jax.train`, `python -m sdft_jax.continual`) take exactly one
flag, an ml_collections config file, and validate it completely before anything is imported that
compiles or loads a model: a mistake costs seconds, and names the key.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import ml_collections
from absl import app, flags
from absl.flags import FlagHolder
from ml_collections.config_flags import config_flags  # the module: its file parser is not re-exported

from sdft_jax import errors

T = TypeVar("T")

DEBUG_FLAG = "--debug"
DEBUG_HELP = f"{DEBUG_FLAG}: show the traceback of an error instead of its one-line message"

# Library messages that do not apply to a run of this project, each matched by its logger and text:
# everything else a library says still shows. (logger, message regex)
_NOISE: tuple[tuple[str, str], ...] = (
    # jax looks for a TPU first on every host; on a CPU or GPU host that is expected, not an error
    ("jax._src.xla_bridge", r"Unable to initialize backend 'tpu'"),
    # the tokenizer and config loaders of transformers never use torch here
    ("transformers", r"None of PyTorch, TensorFlow >= 2.0, or Flax have been found"),
    ("transformers", r"PyTorch was not found"),
)


# Loggers whose INFO lines a run does not show (see `validated_config`).
QUIET_AT_INFO = ("absl", "sdft_jax.sampling.sampler")


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_libraries() -> None:
    """Drops the messages in `_NOISE` (each by its logger and text; nothing else is filtered).

    transformers logs "PyTorch was not found" when it is imported without torch, jax "Unable to
    initialize backend 'tpu'" on a host without one: both are about setups this project does not use.
    Runs when this module is imported, so before a command imports those libraries (this module
    imports neither).
    """
    for name, pattern in _NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))


quiet_libraries()


def one_line(message: str) -> str:
    """`message` on one line: its line breaks (and the indentation after them) become single spaces."""
    return re.sub(r"\s*\n\s*", " ", message).strip()


class _Usage(Exception):
    """An absl `UsageError` carried past `app.run` (which would print the whole usage text for it)."""


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *, prog: str) -> int:
    """Runs a command's `main(argv)` and returns its exit status (0 when it returns None).

    An error of a class in `errors.ERROR_CLASSES`, or an absl `UsageError`, is printed on stderr as
    one line naming the command and the class, and gives that class's status; with `--debug` in
    `argv` it is raised as it is (traceback). `argv` defaults to `sys.argv[1:]`. (argparse reports its
    own usage errors in one line, with status 2.)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv) or 0
    except (app.UsageError, _Usage) as e:
        if debug:
            raise
        print(f"{prog}: usage error: {one_line(str(e))} (--help lists the arguments)", file=sys.stderr)
        return errors.USAGE
    except Exception as e:  # noqa: BLE001 -- classified below; anything unknown is re-raised
        error_class = errors.classify(e)
        if debug or error_class is None:
            raise
        print(f"{prog}: {error_class.label}: {one_line(str(e))}", file=sys.stderr)
        return error_class.status


def run_absl(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *, prog: str) -> int:
    """`run` for an absl command: flags parsed by `parse_flags`, then `main(argv)` as `app.run` calls it.
    Runs once per process (absl registers its flags once)."""

    def main_of_app(args: list[str]) -> int | None:
        try:
            return main(args)
        except app.UsageError as e:
            raise _Usage(str(e)) from e

    def absl_main(args: list[str]) -> int:
        try:
            app.run(main_of_app, argv=[prog, *args], flags_parser=parse_flags)
        except SystemExit as e:  # app.run ends with sys.exit(main's status); --help with sys.exit(0)
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            raise
        return 0

    return run(absl_main, argv, prog=prog)


@contextlib.contextmanager
def model_errors(option: str, value: str) -> Iterator[None]:
    """Reports an OSError or ValueError raised inside as a ModelError naming the option and its value
    (`--model 'x': ...`; only the option when the message already holds the value): what a command does
    inside reads a model, so a missing file or a bad value there is the model's. Errors that already
    have a class (`errors.classify`) pass unchanged."""
    try:
        yield
    except (OSError, ValueError) as e:
        if errors.classify(e) is not None:
            raise
        named = option if value in str(e) else f"{option} {value!r}"
        raise errors.ModelError(f"{named}: {e}") from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `minimum` (argparse then names the option in its one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def option_name(message: str, fields: dict[str, str]) -> str:
    """`message` with each `Class.field` of `fields` replaced by its command-line option (`--top-p`)."""
    for field, option in fields.items():
        message = message.replace(field, option)
    return message


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing, its errors sorted: a `--config` file or `--config.KEY=VALUE` that fails is a
    ConfigError naming the key, any other flag error an `app.UsageError` (exit status 2)."""
    from sdft_jax.config import ConfigError

    try:
        return flag_values(argv)
    except flags.Error as e:
        if "Traceback (most recent call last)" in str(e):  # the config file's get_config() raised
            raise ConfigError(_config_file_error(str(e))) from None
        message = one_line(str(e))
        unknown = re.search(r"Unknown command line flag '(config\.[\w.]+)'", message)
        if unknown:
            raise ConfigError(_unknown_key_message(unknown.group(1), argv, flag_values)) from None
        override = re.search(r"flag --?(config[\w.]*)", message)
        if override:
            raise ConfigError(f"{override.group(1)}: {message}") from None
        raise app.UsageError(message, exitcode=errors.USAGE) from None
    except (AttributeError, KeyError) as e:  # an override of a key the config file has not
        keys = [a.split("=", 1)[0].lstrip("-") for a in argv[1:] if a.startswith("--config.")]
        missing = [k for k in keys if not _has_key(k, argv, flag_values)]
        if missing:
            raise ConfigError(_unknown_key_message(missing[0], argv, flag_values)) from None
        raise ConfigError(f"--config: {one_line(str(e))}") from None
    except Exception as e:  # noqa: BLE001 -- the config file itself failed (its get_config raised, or a syntax error)
        where = _config_file_frame(e.__traceback__)
        raise ConfigError(f"--config: {type(e).__name__}: {one_line(str(e))}{where}") from None


def _config_file_error(text: str) -> str:
    """One line for ml_collections' 'Error whilst parsing config file' (its message holds a traceback):
    the error, and where in the config file it was raised."""
    lines = [line for line in text.splitlines() if line.strip()]
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    ours = [(f, n) for f, n in frames if "site-packages" not in f and "/ml_collections/" not in f]
    where = f" (at {ours[-1][0]}:{ours[-1][1]})" if ours else ""
    return f"--config: {lines[-1].strip()}{where}"


def _config_file_frame(traceback) -> str:
    """` (at FILE:LINE)` of the innermost frame outside the libraries, or ''."""
    where = ""
    while traceback is not None:
        path = traceback.tb_frame.f_code.co_filename
        library = any(part in path for part in ("site-packages", "/ml_collections/", "/absl/"))
        if not library and not path.startswith("<") and path != __file__:
            where = f" (at {path}:{traceback.tb_lineno})"
        traceback = traceback.tb_next
    return where


def _config_of(argv: list[str], flag_values: flags.FlagValues) -> ml_collections.ConfigDict | None:
    """The `--config` file's ConfigDict: the flag's value, or (while its overrides are being applied,
    before it has one) the file loaded again; None if there is none."""
    try:
        value = flag_values["config"].value
    except KeyError:
        return None
    if isinstance(value, ml_collections.ConfigDict):
        return value
    files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    try:
        value = config_flags.ConfigFileFlagParser("config").parse(files[-1]) if files else None
    except Exception:  # noqa: BLE001 -- the file's own error is reported elsewhere
        return None
    return value if isinstance(value, ml_collections.ConfigDict) else None


def _has_key(key: str, argv: list[str], flag_values: flags.FlagValues) -> bool:
    node = _config_of(argv, flag_values)
    for name in key.split(".")[1:]:
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            return False
        node = node[name]
    return True


def _unknown_key_message(key: str, argv: list[str], flag_values: flags.FlagValues) -> str:
    """`unknown config key --config.a.b (valid keys of config.a: ...)`, as `config.load_train_config` says it."""
    node, path = _config_of(argv, flag_values), "config"
    for name in key.split(".")[1:]:
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            break
        node, path = node[name], f"{path}.{name}"
    valid = f" (valid keys of {path}: {', '.join(sorted(node.keys()))})" if isinstance(
        node, ml_collections.ConfigDict) else ""
    return f"unknown config key --{key}{valid}"


def validated_config(argv: list[str], flag: FlagHolder[ml_collections.ConfigDict], example: str,
                     validate: Callable[[ml_collections.ConfigDict], T]) -> T:
    """`validate(flag.value)`, which raises ConfigError naming the key of an invalid config.

    Positional arguments and a missing flag are usage errors (`--config=EXAMPLE is required`); a
    config file that did not load is a ConfigError. Once the config is valid, logging is set up for a
    long run: INFO, except absl's own logger (through which orbax logs every file operation at INFO)
    and the sampler's (a line per compiled program; the metrics count them, `sampler/compilations`).
    """
    from sdft_jax.config import ConfigError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=errors.USAGE)
    if flag.value is None and not getattr(flag, "present", False):
        raise app.UsageError(f"--config={example} is required", exitcode=errors.USAGE)
    if not isinstance(flag.value, ml_collections.ConfigDict):
        try:  # a file that failed to load (ml_collections defers its error to the first access)
            flag.value.keys()
        except OSError as e:
            message = one_line(str(e))
            missing = re.search(r"No such file or directory: '([^']*)'", message)
            raise ConfigError(f"--config={missing.group(1)}: no such file" if missing else f"--config: {message}") from None
        except Exception:  # noqa: BLE001 -- not a ConfigDict: said below
            pass
        raise ConfigError(f"--config: the file's get_config() returned {type(flag.value).__name__}, not a ConfigDict")
    valid = validate(flag.value)
    logging.getLogger().setLevel(logging.INFO)
    for name in QUIET_AT_INFO:
        logging.getLogger(name).setLevel(logging.WARNING)
    return valid
