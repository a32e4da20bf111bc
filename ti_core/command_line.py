"""What every `python -m ti_core` command shares: the parser that answers a usage mistake in one line, the
model arguments, and running a command with one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .quiet import quiet_libraries

VERBOSE_HELP = "show the libraries' warnings, log lines and progress bars"


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block; one line is enough
        raise UsageError(message)


def top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """`python -m ti_core` with its global options, and the subparsers each command adds itself to."""
    parser = Parser(prog="python -m ti_core", description="Create, inspect and train Textual Inversion embeddings.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    return parser, commands


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    # Every command takes a model, so --verbose is accepted after the command name too.
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    parser.add_argument("--model", required=required, help="diffusers folder, .safetensors/.ckpt file or hub id")
    parser.add_argument("--model-config", help="diffusers-format config folder for a single-file checkpoint")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), help="override the model's")
    parser.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        help="the model was trained with zero-terminal-SNR betas (default: what the checkpoint says)",
    )


def load_model_from_args(args):
    from .models import load_model

    return load_model(
        args.model,
        config=args.model_config,
        prediction_type=args.prediction_type,
        zero_terminal_snr=getattr(args, "zero_terminal_snr", None),
    )


def run_command(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the command: exit code 0 on success, 2 for a usage mistake, 1 for an error, each
    error one line on stderr (the traceback only with --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with quiet_libraries(verbose="--verbose" in argv):
            args = build_parser().parse_args(argv)
            return args.run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as error:  # one line for the user; the traceback only when asked for
        if debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, OSError) and error.strerror:  # not "[Errno 2] No such file or directory: 'x'"
            message = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
        if not isinstance(error, (ValueError, OSError, RuntimeError)):
            message = f"unexpected {type(error).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 1
