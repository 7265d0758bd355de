"""The Captioning tab: caption a folder with BLIP, GIT or WD14, check and edit the captions one by one, batch-edit
them, and see which tags the folder uses.

Captioning runs `python -m engine caption` as a subprocess (EngineJob) and streams its progress into the page; the
editor, the batch edits and the tag table work on the caption files in-process (gui.caption_view,
engine.caption.edit). Unsaved edits in the editor are never dropped: moving to another image, reloading the folder,
captioning or a batch edit is refused with a message until the caption is saved or reverted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from engine.caption.edit import edit_folder
from engine.config.choices import CAPTION_EXTENSIONS
from gui import caption_view as view
from gui.caption_view import CaptionViewError, EditorState, OptionSpec
from gui.context import TabContext
from gui.file_browser import browse_button, path_field
from gui.jobs import EngineJob

DEFAULT_CAPTIONER = view.CAPTIONER_NAMES[0]


def _option_number(spec: OptionSpec, elem_id: str) -> gr.Component:
    return gr.Number(value=spec.default, precision=0 if spec.kind == "int" else None, label=spec.label,
                     elem_id=elem_id, min_width=160)


def _option_checkbox(spec: OptionSpec, elem_id: str) -> gr.Component:
    return gr.Checkbox(value=spec.default, label=spec.label, elem_id=elem_id, min_width=160)


def _option_text(spec: OptionSpec, elem_id: str) -> gr.Component:
    return gr.Textbox(value=spec.widget_default, label=spec.label, info=spec.info, elem_id=elem_id, min_width=160)


# One widget builder per option kind (see caption_view.OptionSpec.kind).
OPTION_WIDGETS: dict[str, Callable[[OptionSpec, str], gr.Component]] = {
    "bool": _option_checkbox, "int": _option_number, "float": _option_number,
    "str": _option_text, "list": _option_text, "pairs": _option_text,
}


def _option_id(captioner: str, spec: OptionSpec) -> str:
    return f"captioning-{captioner}-{spec.name.replace('_', '-')}"


def _option_groups() -> tuple[dict[str, gr.Accordion], dict[str, dict[str, gr.Component]]]:
    """An accordion of option widgets per captioner (only the chosen one visible), from its options dataclass."""
    groups, widgets = {}, {}
    for name in view.CAPTIONER_NAMES:
        specs = view.option_specs(name)
        with gr.Accordion(f"{name.upper()} options", open=True, visible=name == DEFAULT_CAPTIONER,
                          elem_id=f"captioning-{name}-options") as group:
            widgets[name] = {}
            # Switches on a row of their own: beside text fields they are squeezed to a letter per line.
            for switches in (False, True):
                row = [spec for spec in specs if (spec.kind == "bool") == switches]
                with gr.Row(visible=bool(row)):
                    widgets[name] |= {spec.name: OPTION_WIDGETS[spec.kind](spec, _option_id(name, spec))
                                      for spec in row}
        groups[name] = group
    return groups, widgets


def build(ctx: TabContext) -> None:
    """Add the Captioning tab to the current gr.Blocks."""
    jobs: dict[str, EngineJob] = {}  # running captioning jobs by folder: one at a time per folder, Stop finds it
    with gr.Tab("Captioning", id="captioning"):
        gr.Markdown("Caption every image of a folder, then check and edit the captions. Caption files sit next to "
                    "their images (`photo.jpg` → `photo.txt`).", elem_id="captioning-intro")
        with gr.Row():
            folder = path_field("Image folder", ctx.roots, kind="folder", elem_id="captioning-folder",
                                placeholder="/home/me/project/img/20_sks dog")
            # The allowed text extensions; a typed value (sd-scripts' 'txt') is accepted here and checked by
            # view.caption_extension, which refuses anything else with a message rather than a Gradio error.
            extension = gr.Dropdown(list(CAPTION_EXTENSIONS), value=".txt", label="Caption extension",
                                    allow_custom_value=True, elem_id="captioning-extension", scale=0, min_width=140)
            recursive = gr.Checkbox(False, label="Include subfolders", elem_id="captioning-recursive", scale=0,
                                    min_width=180)

        gr.Markdown("### 1. Caption the folder")
        with gr.Row():
            captioner = gr.Radio(view.captioner_choices(), value=DEFAULT_CAPTIONER, label="Captioner",
                                 elem_id="captioning-captioner")
            model = gr.Dropdown(view.model_choices(DEFAULT_CAPTIONER), value=view.model_choices(DEFAULT_CAPTIONER)[0],
                                allow_custom_value=True, label="Model", elem_id="captioning-model",
                                info="A model from the list (downloaded on first use), or type a local model folder.")
        browse_button(model, ctx.roots, kind="folder", elem_id="captioning-model")  # a local model folder
        with gr.Row():
            mode = gr.Radio([("Skip them", "skip"), ("Overwrite", "overwrite"), ("Add the new tags", "append")],
                            value="skip", label="Images that already have a caption", elem_id="captioning-mode")
            prefix = gr.Textbox(label="Prefix", info="Put first in every caption, e.g. the trigger word.",
                                elem_id="captioning-prefix")
            suffix = gr.Textbox(label="Suffix", elem_id="captioning-suffix")
            workers = gr.Number(2, precision=0, minimum=1, label="Image loading threads", elem_id="captioning-workers",
                                min_width=160)
        output_kind = gr.Radio([("Caption files beside the images", "files"),
                                ("A fine-tune metadata file", "metadata")],
                               value="files", label="Write the captions to", elem_id="captioning-output")
        with gr.Row(visible=False) as metadata_row:
            metadata_out = path_field("Metadata file", ctx.roots, kind="file", extensions=(".json",),
                                      elem_id="captioning-metadata",
                                      info='A new .json file: BLIP and GIT fill "caption", WD14 "tags".')
            metadata_in = path_field("Merge into", ctx.roots, kind="file", extensions=(".json",),
                                     elem_id="captioning-metadata-in",
                                     info="Optional: an existing metadata file to build on (read, never changed).")
            full_path = gr.Checkbox(False, label="Full paths as keys", elem_id="captioning-full-path", scale=0,
                                    min_width=180, info="else image names")
        groups, option_widgets = _option_groups()
        with gr.Row():
            run = gr.Button("Caption the folder", variant="primary", elem_id="captioning-run")
            stop = gr.Button("Stop", elem_id="captioning-stop", scale=0, min_width=120)
        progress = gr.Markdown(elem_id="captioning-progress")
        summary = gr.Markdown(elem_id="captioning-summary")

        gr.Markdown("### 2. Check and edit the captions")
        with gr.Row():
            load = gr.Button("Show the folder's images", elem_id="captioning-load", scale=0, min_width=240)
            listing = gr.Markdown(elem_id="captioning-listing")
        with gr.Row(equal_height=False):
            gallery = gr.Gallery(label="Images and their captions", columns=4, height=520, allow_preview=False,
                                 elem_id="captioning-gallery")
            with gr.Column():
                position = gr.Markdown("Open a folder to edit its captions.", elem_id="captioning-position")
                image = gr.Image(None, type="pil", interactive=False, label="Image", height=360,
                                 elem_id="captioning-image")
                caption = gr.Textbox(label="Caption", lines=3, elem_id="captioning-caption")
                with gr.Row():
                    previous_button = gr.Button("◀ Previous", elem_id="captioning-previous", min_width=90)
                    save = gr.Button("Save", variant="primary", elem_id="captioning-save", min_width=90)
                    revert = gr.Button("Revert", elem_id="captioning-revert", min_width=90)
                    next_button = gr.Button("Next ▶", elem_id="captioning-next", min_width=90)
                editor_status = gr.Markdown(elem_id="captioning-editor-status")
        editor = gr.State(EditorState())

        gr.Markdown("### 3. Batch edits (every caption file of the folder)")
        with gr.Row():
            add_tags = gr.Textbox(label="Add tags", info="comma-separated; added where missing",
                                  elem_id="captioning-add-tags")
            remove_tags = gr.Textbox(label="Remove tags", info="comma-separated; any case",
                                     elem_id="captioning-remove-tags")
            find = gr.Textbox(label="Find", info="plain text", elem_id="captioning-find")
            replace = gr.Textbox(label="Replace with", elem_id="captioning-replace")
        with gr.Row():
            batch_prefix = gr.Textbox(label="Prefix", info="put first where missing", elem_id="captioning-batch-prefix")
            batch_suffix = gr.Textbox(label="Suffix", info="put last where missing", elem_id="captioning-batch-suffix")
            dedupe = gr.Checkbox(False, label="Remove repeated tags", elem_id="captioning-dedupe")
        with gr.Row():
            preview_edit = gr.Button("Preview", elem_id="captioning-batch-preview")
            apply_edit = gr.Button("Apply", variant="primary", interactive=False, elem_id="captioning-batch-apply")
        batch_result = gr.Markdown(elem_id="captioning-batch-result")
        previewed = gr.State(None)  # (folder, extension, recursive, EditOptions) of the last preview

        gr.Markdown("### Tag frequency")
        tags_table = gr.Dataframe(headers=view.TAG_COLUMNS, value=None, interactive=False, max_height=360,
                                  label="Caption files per tag", elem_id="captioning-tags")

    where_inputs = {folder, extension, recursive}
    batch_fields = {"add": add_tags, "remove": remove_tags, "find": find, "replace": replace,
                    "prefix": batch_prefix, "suffix": batch_suffix, "dedupe": dedupe}
    editor_outputs = [editor, image, caption, position, editor_status, gallery, listing, tags_table]

    def where(values: dict) -> tuple[Path, str, bool]:
        return (view.resolve_folder(values[folder], ctx.roots), view.caption_extension(values[extension]),
                bool(values[recursive]))

    def show(state: EditorState, message: str = "") -> dict:
        current = state.current
        try:
            picture = view.preview_image(current) if current is not None else None
        except OSError:
            picture = None
        return {editor: state, image: picture, caption: state.saved_text, position: state.position_markdown(),
                editor_status: message}

    def reload(target: Path, ext: str, deep: bool, keep: Path | None = None, message: str = "") -> dict:
        """The editor, gallery and tag table read again from the folder's files."""
        found = view.list_editor(target, ext, deep, keep)
        return show(found.state, message) | {
            gallery: gr.Gallery(value=found.items, selected_index=found.state.index if found.items else None),
            listing: view.listing_markdown(found), tags_table: view.tag_frame(target, ext, deep)}

    def on_load(values: dict) -> dict:
        warning = values[editor].unsaved_warning(values[caption])
        if warning:
            return {editor_status: warning}
        try:
            return reload(*where(values))
        except CaptionViewError as error:
            return {listing: f"**{error}**"}

    def request(values: dict, target: Path, ext: str, deep: bool) -> view.CaptionRequest:
        name = values[captioner]
        metadata, in_json = (view.metadata_paths(values[metadata_out], values[metadata_in], ctx.roots)
                             if values[output_kind] == "metadata" else (None, None))
        return view.CaptionRequest(
            metadata=metadata, in_json=in_json, full_path=bool(values[full_path]),
            folder=target, captioner=name, model=view.model_location(values[model], ctx.roots), mode=values[mode],
            prefix=values[prefix] or "",
            suffix=values[suffix] or "", extension=ext, recursive=deep, workers=values[workers] or 1,
            options={field: values[widget] for field, widget in option_widgets[name].items()})

    def on_run(values: dict) -> Iterator[dict]:
        warning = values[editor].unsaved_warning(values[caption])
        if warning:
            yield {summary: warning}
            return
        try:
            target, ext, deep = where(values)
            caption_request = request(values, target, ext, deep)
            args = caption_request.args()
        except CaptionViewError as error:
            yield {progress: "", summary: f"**Cannot start:** {error}"}
            return
        key = str(target)
        if key in jobs:
            yield {summary: f"**`{target}` is being captioned already.** Wait for it, or press Stop."}
            return
        job = jobs[key] = EngineJob(args)
        try:
            yield {progress: "Loading the model…", summary: ""}
            for update in job.follow():
                text = update.progress_text()
                if text:
                    yield {progress: text}
        finally:
            jobs.pop(key, None)
        yield {progress: update.progress_text(),
               summary: view.summary_markdown(update, target, caption_request.metadata)} | \
            reload(target, ext, deep, values[editor].current)

    def on_stop(path: str) -> str:
        job = jobs.get(str(Path(path.strip()).expanduser().resolve())) if path and path.strip() else None
        if job is None:
            return "Nothing is being captioned in this folder."
        job.cancel()
        return "Stopping… caption files written so far are kept."

    def go(state: EditorState, text: str, index: int) -> dict:
        if not state.images or index == state.index:
            return {editor_status: gr.skip()}  # not {}: Gradio reads an empty dict as a missing value
        warning = state.unsaved_warning(text)
        if warning:
            return {editor_status: warning, gallery: gr.Gallery(selected_index=state.index)}
        try:
            moved = state.moved(index)
        except CaptionViewError as error:
            return {editor_status: f"**{error}**"}
        return show(moved) | {gallery: gr.Gallery(selected_index=moved.index)}

    def on_select(state: EditorState, text: str, event: gr.SelectData) -> dict:
        return go(state, text, event.index)

    def on_save(state: EditorState, text: str) -> dict:
        current = state.current
        if current is None:
            return {editor_status: "Open a folder first."}
        try:
            path = view.save_caption(current, state.extension, text or "")
        except CaptionViewError as error:
            return {editor_status: f"**Could not save:** {error}"}
        except OSError as error:
            return {editor_status: f"**Could not save:** {error}. Check that the folder is writable."}
        return reload(Path(state.folder), state.extension, state.recursive, current, f"Saved `{path.name}`.")

    def on_revert(state: EditorState) -> dict:
        if state.current is None:
            return {editor_status: gr.skip()}
        try:
            return show(state.moved(state.index), "Back to the saved caption.")
        except CaptionViewError as error:
            return {editor_status: f"**{error}**"}

    def batch(values: dict) -> tuple[tuple, Any]:
        options = view.edit_options(**{name: values[widget] for name, widget in batch_fields.items()})
        if view.is_empty_edit(options):
            raise CaptionViewError("Fill in at least one batch edit (a tag to add or remove, a text to find, a "
                                   "prefix or a suffix, or repeated tags).")
        target, ext, deep = where(values)
        return (str(target), ext, deep, options), options

    def on_preview(values: dict) -> dict:
        try:
            key, options = batch(values)
        except CaptionViewError as error:
            return {batch_result: f"**{error}**", previewed: None, apply_edit: gr.Button(interactive=False)}
        found = edit_folder(key[0], options, caption_extension=key[1], recursive=key[2], dry_run=True)
        return {batch_result: view.edit_markdown(found, dry_run=True), previewed: key,
                apply_edit: gr.Button(interactive=bool(found.changed))}

    def on_apply(values: dict) -> dict:
        warning = values[editor].unsaved_warning(values[caption])
        if warning:
            return {batch_result: warning}
        try:
            key, options = batch(values)
        except CaptionViewError as error:
            return {batch_result: f"**{error}**"}
        if key != values[previewed]:
            return {batch_result: "**The edit or the folder changed since the preview:** press Preview again.",
                    apply_edit: gr.Button(interactive=False)}
        done = edit_folder(key[0], options, caption_extension=key[1], recursive=key[2])
        return {batch_result: view.edit_markdown(done, dry_run=False), previewed: None,
                apply_edit: gr.Button(interactive=False)} | reload(Path(key[0]), key[1], key[2], values[editor].current)

    def on_captioner(name: str) -> dict:
        choices = view.model_choices(name)
        return {model: gr.Dropdown(choices=choices, value=choices[0])} | \
            {group: gr.Accordion(visible=key == name) for key, group in groups.items()}

    all_options = {widget for widgets in option_widgets.values() for widget in widgets.values()}
    captioner.change(on_captioner, inputs=captioner, outputs=[model, *groups.values()])
    load.click(on_load, inputs={*where_inputs, editor, caption}, outputs=editor_outputs)
    output_kind.change(lambda kind: gr.Row(visible=kind == "metadata"), inputs=output_kind, outputs=metadata_row,
                       show_progress="hidden")
    run.click(on_run, inputs={*where_inputs, editor, caption, captioner, model, mode, prefix, suffix, workers,
                              output_kind, metadata_out, metadata_in, full_path, *all_options},
              outputs=[progress, summary, *editor_outputs], show_progress="hidden")
    stop.click(on_stop, inputs=folder, outputs=progress)
    gallery.select(on_select, inputs=[editor, caption], outputs=[*editor_outputs], show_progress="hidden")
    previous_button.click(lambda state, text: go(state, text, state.index - 1), inputs=[editor, caption],
                          outputs=editor_outputs, show_progress="hidden")
    next_button.click(lambda state, text: go(state, text, state.index + 1), inputs=[editor, caption],
                      outputs=editor_outputs, show_progress="hidden")
    save.click(on_save, inputs=[editor, caption], outputs=editor_outputs)
    revert.click(on_revert, inputs=editor, outputs=editor_outputs)
    preview_edit.click(on_preview, inputs={*where_inputs, *batch_fields.values()},
                       outputs=[batch_result, previewed, apply_edit])
    apply_edit.click(on_apply, inputs={*where_inputs, *batch_fields.values(), editor, caption, previewed},
                     outputs=[batch_result, previewed, apply_edit, *editor_outputs])
    gr.on([widget.input for widget in batch_fields.values()], lambda: gr.Button(interactive=False),
          outputs=apply_edit, show_progress="hidden", queue=False)
