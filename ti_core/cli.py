"""`python -m ti_core`: create, inspect, export and train embeddings from the command line.

Exit codes: 0 success, 2 usage errors, 1 everything else; errors are one `error: ...` line on
stderr, with a traceback only under --debug. Names that work in some UIs only get `warning: ...` lines
on stderr; the command still does what it was asked. The libraries' warnings, logs and progress bars
show only under --verbose.
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

    from .formats import EXPORT_FORMATS

    export = commands.add_parser("export", help="write an embedding file in the format another tool loads")
    export.add_argument("file", type=Path)
    export.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="the format to write")
    export.add_argument(
        "--out", type=Path, help="folder to write into (default: exports/FORMAT here, one folder per format)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace files of the same name there")
    export.set_defaults(run=run_export)

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
    from .embedding import check_vector_count
    from .formats import refuse_name_clash, save_embedding
    from .names import embedding_path

    # Everything that can be checked without the model is checked before its slow load.
    target = embedding_path(args.embeddings_dir, args.name)
    check_vector_count(args.vectors)
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} already exists; add --overwrite to replace it")
    refuse_name_clash(args.embeddings_dir, args.name, target)
    model = load_model_from_args(args)
    embedding = create_embedding(model, args.name, args.init_text, args.vectors)
    model_hash = model.shorthash()
    metadata = {"base_model_hash": model_hash} if model_hash else None  # the demo model has no file to hash
    print(save_embedding(embedding, args.embeddings_dir, overwrite=args.overwrite, metadata=metadata))
    print_name_warnings(embedding.name)
    return 0


def print_name_warnings(name: str) -> None:
    from .names import name_warnings

    for warning in name_warnings(name):
        print(f"warning: {warning}", file=sys.stderr)


SHOWN = ("file", "token", "format", "architecture", "vectors", "widths", "step")
METADATA_ORDER = ("init_text", "base_model", "base_model_hash", "tool", "converted_from", "validation_loss")


def run_inspect(args) -> int:
    from .formats import EmbeddingFileError, load_embedding
    from .inspect import describe, model_norm_ratios, nearest_tokens

    model = load_model_from_args(args) if args.model else None
    embedding = load_embedding(args.file)
    info = describe(args.file, embedding)
    if model:
        try:  # as the model reads it: a file that does not fit is still shown, with the reason
            fitted = load_embedding(args.file, widths=model.widths)
        except EmbeddingFileError as error:
            info["fits"], info["does_not_fit_because"] = False, error.reason
        else:
            info["fits"], info["nearest_tokens"] = True, nearest_tokens(model, fitted)
            info["norm_ratios"] = model_norm_ratios(model, fitted)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [(key, info[key]) for key in SHOWN]
    if "fits" in info:
        rows.append(("fits", "yes" if info["fits"] else f"no, {info['does_not_fit_because']}"))
    rows += [(f"norms {key}", ", ".join(f"{n:.3f}" for n in norms)) for key, norms in info["norms"].items()]
    rows += [
        (f"norm/vocabulary {key}", ", ".join(f"{ratio:.2f}x" for ratio in ratios))
        for key, ratios in info["norm_ratios"].items()
    ]
    # The file's metadata in a fixed order (a safetensors header keeps none): the known keys first, then the
    # rest by name; empty values say nothing.
    metadata = info["metadata"]
    keys = [key for key in METADATA_ORDER if key in metadata] + sorted(set(metadata) - set(METADATA_ORDER))
    rows += [(key, metadata[key]) for key in keys if key not in SHOWN and str(metadata[key]).strip()]
    for key, nearest in info.get("nearest_tokens", {}).items():
        rows += [
            (f"{key}[{index}]", ", ".join(f"{token} ({score:.2f})" for token, score in row))
            for index, row in enumerate(nearest)
        ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}: {value}")
    return 0


def run_export(args) -> int:
    from .formats import default_export_dir, diffusers_loading_code, export_embedding, load_embedding

    out_dir = args.out if args.out is not None else default_export_dir(Path("."), args.to)
    try:
        written = export_embedding(args.file, args.to, out_dir, overwrite=args.overwrite)
    except OSError as error:
        if error.strerror is None:  # ours, already one sentence ("... already exists; ...")
            raise
        where = error.filename or out_dir
        raise OSError(f"cannot write the export to {where}: {error.strerror}; choose another --out folder") from None
    for path in written:
        print(path)
    if args.to == "diffusers":
        print(diffusers_loading_code(written))
    print_name_warnings(load_embedding(args.file).name)  # the token the other tool will use
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
        if isinstance(error, OSError) and error.strerror:  # not "[Errno 2] No such file or directory: 'x'"
            message = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
        if not isinstance(error, (ValueError, OSError, RuntimeError)):
            message = f"unexpected {type(error).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
