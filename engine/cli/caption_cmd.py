"""`python -m engine caption ...` (caption a folder) and `python -m engine captions edit ...` (batch edits)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from engine.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from engine.config.choices import CAPTION_EXTENSIONS, dotted_caption_extension

# Captioner options as flags, generated from each captioner's options dataclass (see _captioner_flags).
_OPTION_PREFIX = "opt_"
_EXTENSION_HELP = f"the caption files' extension, one of {', '.join(CAPTION_EXTENSIONS)} (default .txt)"


def _caption_extension(text: str) -> str:
    """--caption-extension: one of the allowed text extensions (engine.config.choices.CAPTION_EXTENSIONS)."""
    try:
        return dotted_caption_extension(text)
    except ValueError as error:  # argparse prints this message and exits with 2
        raise argparse.ArgumentTypeError(str(error)) from None


def _field_flags() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every option of every captioner once, with its type: the same name (e.g. max_length) means the same thing."""
    from engine.caption.registry import CAPTIONER_LOADERS

    fields: dict[str, tuple[dataclasses.Field, Any]] = {}
    for load in CAPTIONER_LOADERS.values():
        options_type = load().options_type
        hints = typing.get_type_hints(options_type)
        for field in dataclasses.fields(options_type):
            fields.setdefault(field.name, (field, hints[field.name]))
    return fields


def _parse_value(annotation: Any, text: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple and typing.get_origin(typing.get_args(annotation)[0]) is tuple:
        # pairs, in sd-scripts' "src,dst;src2,dst2" form (WD14's tag replacements)
        from engine.caption.wd14_tags import parse_tag_replacement

        return parse_tag_replacement(text)
    if origin is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return {"int": int, "float": float}.get(getattr(annotation, "__name__", str(annotation)), str)(text)


def _captioner_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("captioner options (each applies to the captioners that have it)")
    hints = {}
    for name, (field, hint) in _field_flags().items():
        hints[name] = hint
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        if hint is bool:
            group.add_argument(flag, dest=_OPTION_PREFIX + name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default {default})")
        else:
            group.add_argument(flag, dest=_OPTION_PREFIX + name, default=None, metavar="VALUE",
                               help=f"(default {default!r})")
    parser.set_defaults(_option_hints=hints)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "caption", help="caption every image of a folder with BLIP, GIT or WD14",
        description="Caption a folder. Existing caption files are skipped unless --mode says overwrite or append; "
                    "nothing else is ever touched. Unreadable images are listed and skipped. Exit 0 when the run "
                    "finished, 2 for bad input or when no image could be captioned.",
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--captioner", choices=("blip", "git", "wd14"), required=True)
    parser.add_argument("--model", help="a local model folder or a Hugging Face id (default: the captioner's)")
    parser.add_argument("--mode", choices=("skip", "overwrite", "append"), default="skip")
    parser.add_argument("--caption-extension", type=_caption_extension, default=".txt",
                        help=_EXTENSION_HELP)
    parser.add_argument("--recursive", action="store_true")
    parser.add_argument("--prefix", default="", help="text put first in every caption, e.g. the trigger word")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    parser.add_argument("--workers", type=int, default=2, help="threads opening images ahead of the model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--events", metavar="FILE", help="append progress events (JSON lines) for the GUI")
    metadata = parser.add_argument_group(
        "fine-tune metadata", "write the captions into a metadata JSON (dataset.in_json) instead of caption files: "
        "BLIP and GIT fill each entry's \"caption\", WD14 its \"tags\"")
    metadata.add_argument("--metadata", type=Path, metavar="OUT_JSON",
                          help="the metadata file to write (a new file: an existing one is never overwritten)")
    metadata.add_argument("--in-json", "--in_json", dest="in_json", type=Path, metavar="FILE",
                          help="an existing metadata file to merge into (read, never changed); --mode applies to "
                               "its entries")
    metadata.add_argument("--full-path", "--full_path", dest="full_path", action="store_true",
                          help="key entries by absolute image path (default: the image's stem; with --recursive, "
                               "its path relative to the folder)")
    _captioner_flags(parser)
    parser.set_defaults(handler=run_caption)
    return parser


def add_edit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("captions", help="batch-edit existing caption files (captions edit ...)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    edit = actions.add_parser("edit", help="add/remove tags, find/replace, prefix/suffix, de-duplicate",
                              description="Edit every caption file of a folder; only files that change are written.")
    edit.add_argument("folder", type=Path)
    edit.add_argument("--add-tag", action="append", default=[], metavar="TAG")
    edit.add_argument("--remove-tag", action="append", default=[], metavar="TAG")
    edit.add_argument("--replace", nargs=2, action="append", default=[], metavar=("OLD", "NEW"))
    edit.add_argument("--prefix", default="")
    edit.add_argument("--suffix", default="")
    edit.add_argument("--dedupe", action="store_true")
    edit.add_argument("--caption-extension", type=_caption_extension, default=".txt",
                      help=_EXTENSION_HELP)
    edit.add_argument("--recursive", action="store_true")
    edit.add_argument("--dry-run", action="store_true")
    edit.set_defaults(handler=run_edit)
    return parser


def _captioner_values(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from engine.caption.registry import captioner_entry

    accepted = {field.name for field in dataclasses.fields(captioner_entry(name).options_type)}
    values = {}
    for option, hint in args._option_hints.items():
        raw = getattr(args, _OPTION_PREFIX + option)
        if raw is None:
            continue
        if option not in accepted:
            raise ValueError(f"--{option.replace('_', '-')} does not apply to {name}")
        values[option] = raw if isinstance(raw, bool) else _parse_value(hint, raw)
    return values


def _metadata_store(args: argparse.Namespace, field_name: str):
    """The MetadataStore --metadata asks for (None without it); checked before any model is loaded.

    Raises:
        ValueError: --in-json or --full-path without --metadata; an output that exists, an input that cannot be read
            (MetadataWriteError is a ValueError).
    """
    if args.metadata is None:
        if args.in_json is not None or args.full_path:
            raise ValueError("--in-json and --full-path describe the metadata file: add --metadata OUT_JSON")
        return None
    from engine.caption.metadata_out import MetadataStore

    return MetadataStore(args.folder, args.metadata, field_name, in_json=args.in_json, full_path=args.full_path,
                         recursive=args.recursive)


def run_caption(args: argparse.Namespace) -> int:
    from engine.caption.models import CaptionModelError, resolve_model
    from engine.caption.registry import build_captioner, captioner_entry
    from engine.caption.runner import FolderOptions, find_images, run_captioning
    from engine.events import EventWriter, Progress

    if not args.folder.is_dir():
        print(f"error: {args.folder}: no such folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    entry = captioner_entry(args.captioner)
    try:
        values = _captioner_values(args, args.captioner)
        store = _metadata_store(args, entry.metadata_field)
        model_dir = resolve_model(args.model or entry.default_model, needs=entry.model_files,
                                  label=args.captioner.upper(),
                                  allow_patterns=list(entry.allow_patterns) if entry.allow_patterns else None)
        captioner = build_captioner(args.captioner, str(model_dir), values, device=args.device)
    except (ValueError, OSError, CaptionModelError) as error:  # OSError: a model folder that lacks a file
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = FolderOptions(caption_extension=args.caption_extension, recursive=args.recursive, mode=args.mode,
                            prefix=args.prefix, suffix=args.suffix, dry_run=args.dry_run,
                            batch_size=values.get("batch_size", 1), workers=args.workers,
                            separator=getattr(captioner, "separator", ", ") or ", ")
    print(f"{args.captioner} from {model_dir} on {captioner.describe_device()}", file=sys.stderr)
    with EventWriter(args.events) as events:
        progress = Progress("caption", len(find_images(args.folder, args.recursive)),
                            events if args.events else None)
        summary = run_captioning(args.folder, captioner, options, progress, store)
        progress.close()
        if store is not None and not options.dry_run:
            try:
                print(f"wrote {len(store.metadata)} entries to {store.save()}")
            except (ValueError, OSError) as error:  # a file appeared at the output name, a full or read-only disk
                hint = ("choose a new metadata file name" if isinstance(error, ValueError) else
                        "free some space or choose a folder you can write to, then caption again")
                print(f"error: {error}; {hint}", file=sys.stderr)
                if args.events:
                    events.emit("error", message=str(error), hint=hint)
                return EXIT_BAD_INPUT
        _report(summary, options, events if args.events else None)
    nothing_done = summary.failed and not (summary.planned or summary.skipped)
    return EXIT_BAD_INPUT if nothing_done else EXIT_OK


def _report(summary, options, events) -> None:
    if options.dry_run:
        for image, text in summary.planned.items():
            print(f"{image.name}: {text}")
    for image, message in summary.failed:
        print(f"failed: {image}: {message}", file=sys.stderr)
        if events is not None:
            events.emit("warning", message=message, where=str(image), hint="re-save or remove the file")
    print(summary.line(options.dry_run))
    if summary.tag_counts:
        top = ", ".join(f"{tag} ({count})" for tag, count in summary.tag_counts.most_common(15))
        print(f"most frequent tags: {top}")
    if events is not None:
        events.emit("done", task="caption", ok=not summary.failed, written=len(summary.written),
                    skipped=len(summary.skipped), failed=len(summary.failed),
                    top_tags=summary.tag_counts.most_common(20))


def run_edit(args: argparse.Namespace) -> int:
    from engine.caption.edit import EditOptions, edit_folder

    if not args.folder.is_dir():
        print(f"error: {args.folder}: no such folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = EditOptions(add_tags=tuple(args.add_tag), remove_tags=tuple(args.remove_tag),
                          replace=tuple(tuple(pair) for pair in args.replace), prefix=args.prefix,
                          suffix=args.suffix, dedupe=args.dedupe)
    summary = edit_folder(args.folder, options, caption_extension=args.caption_extension, recursive=args.recursive,
                          dry_run=args.dry_run)
    for path, (before, after) in summary.changed.items():
        print(f"{path.name}: {before!r} -> {after!r}")
    for path, message in summary.failed:
        print(f"failed: {path}: {message}", file=sys.stderr)
    verb = "would change" if args.dry_run else "changed"
    print(f"{verb}: {len(summary.changed)}, unchanged: {len(summary.unchanged)}, failed: {len(summary.failed)}")
    return EXIT_FAILED if summary.failed else EXIT_OK
