"""`python -m engine metadata merge-captions | merge-tags | clean`: sd-scripts' fine-tuning metadata JSON.

The equivalents of sd-scripts' finetune/merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py and
clean_captions_and_tags.py (engine.data.finetune_metadata says where they differ: the output is always a new file).
sd-scripts' underscore spellings (--in_json, --full_path, --caption_extension) are accepted beside ours.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK

_NEVER_OVERWRITES = ("OUT_JSON must be a new file: an existing file, the --in-json file included, is never "
                     "overwritten. Exit 0 when the file was written, 2 for bad input.")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("metadata", help="make fine-tuning metadata JSON (merge captions/tags, clean)",
                                   description="Make the metadata JSON that method = \"finetune\" reads "
                                               "(dataset.in_json or a subset's metadata_file).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for field_name, action in (("caption", "merge-captions"), ("tags", "merge-tags")):
        _add_merge(actions, action, field_name)
    clean = actions.add_parser(
        "clean", help="clean the captions and tags of a metadata file (clean_captions_and_tags.py)",
        description="Tags: underscores become spaces (^_^ kept), a DeepDanbooru rating tail is cut, hair/eye/sleeve "
                    "tags that occur more than once are dropped when the picture has several people, and 'shirt' "
                    "is dropped when 'white shirt' is there. Captions: BLIP's 'woman', 'anime character', ... "
                    "become 'girl'. " + _NEVER_OVERWRITES)
    clean.add_argument("in_json", type=Path, help="the metadata file to clean")
    clean.add_argument("out_json", type=Path, help="the cleaned file to write (a new file)")
    clean.add_argument("--debug", action="store_true", help="print every change")
    clean.set_defaults(handler=run_clean)
    return parser


def _add_merge(actions: argparse._SubParsersAction, action: str, field_name: str) -> None:
    from engine.data.finetune_metadata import DEFAULT_EXTENSIONS

    script = "merge_captions_to_metadata.py" if field_name == "caption" else "merge_dd_tags_to_metadata.py"
    merge = actions.add_parser(
        action, help=f"put each image's {DEFAULT_EXTENSIONS[field_name]} file into \"{field_name}\" ({script})",
        description=f"Read <stem>{DEFAULT_EXTENSIONS[field_name]} beside every image of FOLDER into the "
                    f"\"{field_name}\" of its metadata entry. Keys are image stems (what sd-scripts writes), "
                    "absolute paths with --full-path, or paths relative to FOLDER with --recursive. Images without "
                    "a text file are listed and left as they were. " + _NEVER_OVERWRITES)
    merge.add_argument("folder", type=Path, help="the folder of training images (dataset.train_data_dir)")
    merge.add_argument("out_json", type=Path, help="the metadata file to write (a new .json file)")
    merge.add_argument("--in-json", "--in_json", dest="in_json", type=Path,
                       help="an existing metadata file to merge into (it is read, never changed)")
    extension_flags = ["--caption-extension", "--caption_extension"]
    if field_name == "caption":
        extension_flags.append("--caption_extention")  # sd-scripts' old spelling, still accepted there
    merge.add_argument(*extension_flags, dest="extension", default=DEFAULT_EXTENSIONS[field_name],
                       help=f"the text files' extension (default {DEFAULT_EXTENSIONS[field_name]}, as sd-scripts)")
    merge.add_argument("--full-path", "--full_path", dest="full_path", action="store_true",
                       help="key entries by absolute image path (several folders in one file)")
    merge.add_argument("--recursive", action="store_true", help="include the images of subfolders")
    merge.add_argument("--debug", action="store_true", help="print every key and its text")
    merge.set_defaults(handler=run_merge, field_name=field_name)


def run_merge(args: argparse.Namespace) -> int:
    from engine.data.finetune_metadata import (
        MetadataWriteError,
        check_new_output,
        load_metadata,
        merge_text_files,
        write_new_metadata,
    )

    try:
        check_new_output(args.out_json)
        metadata = load_metadata(args.in_json) if args.in_json else {}
        report = merge_text_files(metadata, args.folder, args.field_name, args.extension, full_path=args.full_path,
                                  recursive=args.recursive)
        if not report.merged:
            raise MetadataWriteError(f"{args.folder}: none of its {report.images} image(s) has a {report.extension} "
                                     "file beside it; check --caption-extension, or caption the folder first")
        if args.debug:
            for key in report.merged:
                print(f"{key}: {metadata[key][args.field_name]}")
        write_new_metadata(args.out_json, metadata)
    except (MetadataWriteError, OSError) as error:  # OSError: a full or read-only disk while writing
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _print_lines(report.lines())
    print(f"wrote {len(metadata)} entries to {args.out_json}")
    return EXIT_OK


def run_clean(args: argparse.Namespace) -> int:
    import copy

    from engine.data.finetune_metadata import (
        MetadataWriteError,
        check_new_output,
        clean_metadata,
        load_metadata,
        write_new_metadata,
    )

    try:
        check_new_output(args.out_json)
        metadata = load_metadata(args.in_json)
        before = copy.deepcopy(metadata)
        report = clean_metadata(metadata)
        write_new_metadata(args.out_json, metadata)
    except (MetadataWriteError, OSError) as error:  # OSError: a full or read-only disk while writing
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.debug:
        for key in dict.fromkeys(report.tags_changed + report.captions_changed):
            for field_name in ("tags", "caption"):
                old, new = before[key].get(field_name), metadata[key].get(field_name)
                if old != new:
                    print(f"{key} {field_name}:\n  FROM: {old}\n  TO:   {new}")
    _print_lines(report.lines())
    print(f"wrote {len(metadata)} entries to {args.out_json}")
    return EXIT_OK


def _print_lines(lines: list[str]) -> None:
    """The first line is the summary (stdout); the others say what was left out (stderr, as warnings)."""
    print(lines[0])
    for line in lines[1:]:
        print(f"warning: {line}", file=sys.stderr)
