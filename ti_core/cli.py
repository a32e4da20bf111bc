"""`python -m ti_core`: create, inspect, export, train and compare embeddings from the command line.

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

from .command_line import add_model_arguments, load_model_from_args, run_command, top_parser
from .train_cli import add_compare_parser, add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser, commands = top_parser()

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

    promote = commands.add_parser(
        "promote",
        help="make a snapshot of a run (LOG_DIR/NAME/NAME-STEP) the embedding; the old file goes to the trash",
    )
    promote.add_argument("--embeddings-dir", type=Path, required=True)
    promote.add_argument("--log-dir", type=Path, required=True)
    promote.add_argument("--name", required=True, help="the embedding's name")
    promote.add_argument("--step", required=True, help="the snapshot's step, or 'best'")
    promote.set_defaults(run=run_promote)

    add_train_parser(commands)
    add_compare_parser(commands)
    return parser


def run_promote(args) -> int:
    from .files import promote_snapshot

    print(promote_snapshot(args.embeddings_dir, args.log_dir, args.name, args.step))
    return 0


def run_create(args) -> int:
    from .create import create_embedding_file

    # Everything that can be checked without the model is checked before its slow load.
    embedding, path = create_embedding_file(
        lambda: load_model_from_args(args), args.embeddings_dir, args.name, args.init_text, args.vectors,
        overwrite=args.overwrite, overwrite_hint="add --overwrite to replace it",
    )  # fmt: skip
    print(path)
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
    return run_command(build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
