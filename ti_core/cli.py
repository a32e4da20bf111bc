"""`python -m ti_core`: create, inspect and train embeddings from the command line.

Exit codes: 0 success, 2 usage errors, 1 everything else; errors are one `error: ...` line on
stderr, with a traceback only under --debug. The libraries' warnings, logs and progress bars show only
under --verbose.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .quiet import quiet_libraries

VERBOSE_HELP = "show the libraries' warnings, log lines and progress bars"


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block; one line is enough
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m ti_core", description="Create, inspect and train Textual Inversion embeddings.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    create = commands.add_parser("create", help="create an untrained embedding from an init text")
    add_model_arguments(create, required=True)
    create.add_argument("--name", required=True, help="the embedding's name: its file stem and prompt token")
    create.add_argument("--init-text", default="*", help="text whose tokens start the vectors ('' for zeros)")
    create.add_argument("--vectors", type=int, default=1, help="vectors per token, 1 to 75")
    create.add_argument("--embeddings-dir", type=Path, required=True)
    create.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")
    create.set_defaults(run=run_create)

    inspect = commands.add_parser("inspect", help="show an embedding file's layout, vectors and metadata")
    inspect.add_argument("file", type=Path)
    add_model_arguments(inspect, required=False)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=run_inspect)

    from .train_cli import add_train_parser

    add_train_parser(commands)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    # Every command takes a model, so --verbose is accepted after the command name too.
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    parser.add_argument("--model", required=required, help="diffusers folder, .safetensors/.ckpt file or hub id")
    parser.add_argument("--model-config", help="diffusers-format config folder for a single-file checkpoint")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), help="override the model's")


def load_model_from_args(args):
    from .models import load_model

    return load_model(args.model, config=args.model_config, prediction_type=args.prediction_type)


def run_create(args) -> int:
    from .create import create_embedding
    from .formats import refuse_name_clash, save_embedding
    from .names import embedding_path

    target = embedding_path(args.embeddings_dir, args.name)  # validate before the slow model load
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    refuse_name_clash(args.embeddings_dir, args.name, target)
    model = load_model_from_args(args)
    embedding = create_embedding(model, args.name, args.init_text, args.vectors)
    metadata = {"base_model_hash": model.shorthash() or ""}
    print(save_embedding(embedding, args.embeddings_dir, overwrite=args.overwrite, metadata=metadata))
    return 0


def run_inspect(args) -> int:
    from .formats import load_embedding
    from .inspect import describe, nearest_tokens

    model = load_model_from_args(args) if args.model else None
    embedding = load_embedding(args.file, widths=model.widths if model else None)
    info = describe(args.file, embedding)
    if model:
        info["nearest_tokens"] = nearest_tokens(model, embedding)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("file", "token", "format", "architecture", "vectors", "widths", "step"):
        print(f"{key:>13}: {info[key]}")
    for key, norms in info["norms"].items():
        print(f"{'norms ' + key:>13}: {', '.join(f'{n:.3f}' for n in norms)}")
    for key, value in info["metadata"].items():
        print(f"{key:>13}: {value}")
    for key, rows in info.get("nearest_tokens", {}).items():
        for index, row in enumerate(rows):
            print(f"{f'{key}[{index}]':>13}: " + ", ".join(f"{token} ({score:.2f})" for token, score in row))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
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
        if not isinstance(error, (ValueError, OSError, RuntimeError)):
            message = f"unexpected {type(error).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
