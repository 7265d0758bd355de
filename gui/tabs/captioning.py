"""The Captioning tab: caption a folder with BLIP, GIT or WD14, check and edit the captions one by one, batch-edit
them, and see which tags the folder uses.

Captioning runs `python -m engine caption` as a subprocess (EngineJob) and streams its progress into the page; the
editor, the batch edits and the tag table work on the caption files in-process (gui.views.captioning,
engine.caption.edit). Unsaved edits in the editor are never dropped: moving to another image, reloading the folder,
captioning or a batch edit is refused with a message until the caption is saved or reverted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from engine.caption.edit import edit_folder
from engine.config.choices import CAPTION_EXTENSIONS
from gui.context import TabContext
from gui.file_browser import browse_button, path_field
from gui.jobs import FolderJobs
from gui.views import captioning as view
from gui.views.captioning import CaptionViewError, EditorState, OptionSpec

DEFAULT_CAPTIONER = view.CAPTIONER_NAMES[0]


def _option_number(spec: OptionSpec, elem_id: str) -> gr.Component:
    return gr.Number(value=spec.default, precision=0 if spec.kind == "int" else None, label=spec.label,
                     elem_id=elem_id, min_width=160)


def _option_checkbox(spec: OptionSpec, elem_id: str) -> gr.Component:
    return gr.Checkbox(value=spec.default, label=spec.label, elem_id=elem_id, min_width=160)


def _option_text(spec: OptionSpec, elem_id: str) -> gr.Component:
    return gr.Textbox(value=spec.widget_default, label=spec.label, info=spec.info, elem_id=elem_id, min_width=160)


# One widget builder per option kind (see gui.views.captioning.OptionSpec.kind).
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


@dataclass
class FolderFields:
    """The folder the tab works on, its caption extension and whether subfolders count."""

    folder: gr.Textbox
    extension: gr.Dropdown
    recursive: gr.Checkbox

    @property
    def inputs(self) -> set:
        return {self.folder, self.extension, self.recursive}


@dataclass
class MetadataFields:
    """Where a fine-tune metadata file is written (shown only when the captions go into one)."""

    row: gr.Row
    out: gr.Textbox
    merge_into: gr.Textbox
    full_path: gr.Checkbox


@dataclass
class CaptionSection:
    """1. Caption the folder: the captioner, its options, where the captions go, Run and Stop."""

    captioner: gr.Radio
    model: gr.Dropdown
    mode: gr.Radio
    prefix: gr.Textbox
    suffix: gr.Textbox
    workers: gr.Number
    output_kind: gr.Radio
    metadata: MetadataFields
    groups: dict[str, gr.Accordion]
    option_widgets: dict[str, dict[str, gr.Component]]
    run: gr.Button
    stop: gr.Button
    progress: gr.Markdown
    summary: gr.Markdown


@dataclass
class EditorSection:
    """2. Check and edit the captions: the gallery, the image shown and its caption box."""

    load: gr.Button
    listing: gr.Markdown
    gallery: gr.Gallery
    position: gr.Markdown
    image: gr.Image
    caption: gr.Textbox
    previous_button: gr.Button
    save: gr.Button
    revert: gr.Button
    next_button: gr.Button
    status: gr.Markdown
    state: gr.State


@dataclass
class BatchSection:
    """3. Batch edits: the edit's fields (by edit_options' argument names), Preview and Apply."""

    fields: dict[str, gr.Component]
    preview: gr.Button
    apply: gr.Button
    result: gr.Markdown
    previewed: gr.State  # (folder, extension, recursive, EditOptions) of the last preview


def _folder_fields(ctx: TabContext) -> FolderFields:
    with gr.Row():
        folder = path_field("Image folder", ctx.roots, kind="folder", elem_id="captioning-folder",
                            placeholder="/home/me/project/img/20_sks dog")
        # The allowed text extensions; a typed value (sd-scripts' 'txt') is accepted here and checked by
        # view.caption_extension, which refuses anything else with a message rather than a Gradio error.
        extension = gr.Dropdown(list(CAPTION_EXTENSIONS), value=".txt", label="Caption extension",
                                allow_custom_value=True, elem_id="captioning-extension", scale=0, min_width=140)
        recursive = gr.Checkbox(False, label="Include subfolders", elem_id="captioning-recursive", scale=0,
                                min_width=180)
    return FolderFields(folder, extension, recursive)


def _metadata_fields(ctx: TabContext) -> MetadataFields:
    with gr.Row(visible=False) as row:
        out = path_field("Metadata file", ctx.roots, kind="file", extensions=(".json",),
                         elem_id="captioning-metadata",
                         info='A new .json file: BLIP and GIT fill "caption", WD14 "tags".')
        merge_into = path_field("Merge into", ctx.roots, kind="file", extensions=(".json",),
                                elem_id="captioning-metadata-in",
                                info="Optional: an existing metadata file to build on (read, never changed).")
        full_path = gr.Checkbox(False, label="Full paths as keys", elem_id="captioning-full-path", scale=0,
                                min_width=180, info="else image names")
    return MetadataFields(row, out, merge_into, full_path)


def _caption_section(ctx: TabContext) -> CaptionSection:
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
    metadata = _metadata_fields(ctx)
    groups, option_widgets = _option_groups()
    with gr.Row():
        run = gr.Button("Caption the folder", variant="primary", elem_id="captioning-run")
        stop = gr.Button("Stop", elem_id="captioning-stop", scale=0, min_width=120)
    progress = gr.Markdown(elem_id="captioning-progress")
    summary = gr.Markdown(elem_id="captioning-summary")
    return CaptionSection(captioner, model, mode, prefix, suffix, workers, output_kind, metadata, groups,
                          option_widgets, run, stop, progress, summary)


def _editor_section() -> EditorSection:
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
            status = gr.Markdown(elem_id="captioning-editor-status")
    state = gr.State(EditorState())
    return EditorSection(load, listing, gallery, position, image, caption, previous_button, save, revert,
                         next_button, status, state)


def _batch_section() -> BatchSection:
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
        preview = gr.Button("Preview", elem_id="captioning-batch-preview")
        apply = gr.Button("Apply", variant="primary", interactive=False, elem_id="captioning-batch-apply")
    result = gr.Markdown(elem_id="captioning-batch-result")
    previewed = gr.State(None)
    fields = {"add": add_tags, "remove": remove_tags, "find": find, "replace": replace,
              "prefix": batch_prefix, "suffix": batch_suffix, "dedupe": dedupe}
    return BatchSection(fields, preview, apply, result, previewed)


def content(ctx: TabContext, jobs: FolderJobs) -> None:
    """The tab's sections and their events, for one page, built when it first opens the tab (gui/tabs/first_open.py;
    a client without a browser builds it the same way: tests/test_exploit_chain.py drives its caption editor over
    HTTP). `jobs` is one for all pages: a reloaded page's Stop finds the job an earlier page started."""
    gr.Markdown("Caption every image of a folder, then check and edit the captions. Caption files sit next to "
                "their images (`photo.jpg` → `photo.txt`).", elem_id="captioning-intro")
    place = _folder_fields(ctx)
    form = _caption_section(ctx)
    editor = _editor_section()
    batch = _batch_section()
    gr.Markdown("### Tag frequency")
    tags_table = gr.Dataframe(headers=view.TAG_COLUMNS, value=None, interactive=False, max_height=360,
                              label="Caption files per tag", elem_id="captioning-tags")
    CaptioningTab(ctx, place, form, editor, batch, tags_table, jobs).wire()


class CaptioningTab:
    """The tab's event handlers, over its sections. Running captioning jobs are kept by folder: one at a time per
    folder, and Stop finds it."""

    def __init__(self, ctx: TabContext, place: FolderFields, form: CaptionSection, editor: EditorSection,
                 batch: BatchSection, tags_table: gr.Dataframe, jobs: FolderJobs):
        self.ctx, self.place, self.form, self.editor, self.batch, self.tags_table = \
            ctx, place, form, editor, batch, tags_table
        self.jobs = jobs

    @property
    def editor_outputs(self) -> list[gr.Component]:
        e = self.editor
        return [e.state, e.image, e.caption, e.position, e.status, e.gallery, e.listing, self.tags_table]

    def where(self, values: dict) -> tuple[Path, str, bool]:
        return (view.resolve_folder(values[self.place.folder], self.ctx.roots),
                view.caption_extension(values[self.place.extension]), bool(values[self.place.recursive]))

    def show(self, state: EditorState, message: str = "") -> dict:
        e = self.editor
        current = state.current
        try:
            picture = view.preview_image(current) if current is not None else None
        except OSError:
            picture = None
        return {e.state: state, e.image: picture, e.caption: state.saved_text, e.position: state.position_markdown(),
                e.status: message}

    def reload(self, target: Path, ext: str, deep: bool, keep: Path | None = None, message: str = "") -> dict:
        """The editor, gallery and tag table read again from the folder's files."""
        found = view.list_editor(target, ext, deep, keep)
        return self.show(found.state, message) | {
            self.editor.gallery: gr.Gallery(value=found.items,
                                            selected_index=found.state.index if found.items else None),
            self.editor.listing: view.listing_markdown(found), self.tags_table: view.tag_frame(target, ext, deep)}

    def unsaved_warning(self, values: dict) -> str:
        return values[self.editor.state].unsaved_warning(values[self.editor.caption])

    def on_load(self, values: dict) -> dict:
        warning = self.unsaved_warning(values)
        if warning:
            return {self.editor.status: warning}
        try:
            return self.reload(*self.where(values))
        except CaptionViewError as error:
            return {self.editor.listing: f"**{error}**"}

    def request(self, values: dict, target: Path, ext: str, deep: bool) -> view.CaptionRequest:
        f, roots = self.form, self.ctx.roots
        name = values[f.captioner]
        metadata, in_json = (view.metadata_paths(values[f.metadata.out], values[f.metadata.merge_into], roots)
                             if values[f.output_kind] == "metadata" else (None, None))
        return view.CaptionRequest(
            metadata=metadata, in_json=in_json, full_path=bool(values[f.metadata.full_path]),
            folder=target, captioner=name, model=view.model_location(values[f.model], roots), mode=values[f.mode],
            prefix=values[f.prefix] or "",
            suffix=values[f.suffix] or "", extension=ext, recursive=deep, workers=values[f.workers] or 1,
            options={field: values[widget] for field, widget in f.option_widgets[name].items()})

    def on_run(self, values: dict) -> Iterator[dict]:
        progress, summary = self.form.progress, self.form.summary
        warning = self.unsaved_warning(values)
        if warning:
            yield {summary: warning}
            return
        try:
            target, ext, deep = self.where(values)
            caption_request = self.request(values, target, ext, deep)
            args = caption_request.args()
        except CaptionViewError as error:
            yield {progress: "", summary: f"**Cannot start:** {error}"}
            return
        with self.jobs.claim(str(target), args) as job:
            if job is None:
                yield {summary: f"**`{target}` is being captioned already.** Wait for it, or press Stop."}
                return
            yield {progress: "Loading the model…", summary: ""}
            for update in job.follow():
                text = update.progress_text()
                if text:
                    yield {progress: text}
        yield {progress: update.progress_text(),
               summary: view.summary_markdown(update, target, caption_request.metadata)} | \
            self.reload(target, ext, deep, values[self.editor.state].current)

    def on_stop(self, path: str) -> str:
        if not (path and path.strip() and self.jobs.stop(str(Path(path.strip()).expanduser().resolve()))):
            return "Nothing is being captioned in this folder."
        return "Stopping… caption files written so far are kept."

    def go(self, state: EditorState, text: str, index: int) -> dict:
        e = self.editor
        if not state.images or index == state.index:
            return {e.status: gr.skip()}  # not {}: Gradio reads an empty dict as a missing value
        warning = state.unsaved_warning(text)
        if warning:
            return {e.status: warning, e.gallery: gr.Gallery(selected_index=state.index)}
        try:
            moved = state.moved(index)
        except CaptionViewError as error:
            return {e.status: f"**{error}**"}
        return self.show(moved) | {e.gallery: gr.Gallery(selected_index=moved.index)}

    def on_select(self, state: EditorState, text: str, event: gr.SelectData) -> dict:
        return self.go(state, text, event.index)

    def on_save(self, state: EditorState, text: str) -> dict:
        status = self.editor.status
        current = state.current
        if current is None:
            return {status: "Open a folder first."}
        try:
            path = view.save_caption(current, state.extension, text or "")
        except CaptionViewError as error:
            return {status: f"**Could not save:** {error}"}
        except OSError as error:
            return {status: f"**Could not save:** {error}. Check that the folder is writable."}
        return self.reload(Path(state.folder), state.extension, state.recursive, current, f"Saved `{path.name}`.")

    def on_revert(self, state: EditorState) -> dict:
        if state.current is None:
            return {self.editor.status: gr.skip()}
        try:
            return self.show(state.moved(state.index), "Back to the saved caption.")
        except CaptionViewError as error:
            return {self.editor.status: f"**{error}**"}

    def batch_edit(self, values: dict) -> tuple[tuple, Any]:
        options = view.edit_options(**{name: values[widget] for name, widget in self.batch.fields.items()})
        if view.is_empty_edit(options):
            raise CaptionViewError("Fill in at least one batch edit (a tag to add or remove, a text to find, a "
                                   "prefix or a suffix, or repeated tags).")
        target, ext, deep = self.where(values)
        return (str(target), ext, deep, options), options

    def on_preview(self, values: dict) -> dict:
        b = self.batch
        try:
            key, options = self.batch_edit(values)
        except CaptionViewError as error:
            return {b.result: f"**{error}**", b.previewed: None, b.apply: gr.Button(interactive=False)}
        found = edit_folder(key[0], options, caption_extension=key[1], recursive=key[2], dry_run=True)
        return {b.result: view.edit_markdown(found, dry_run=True), b.previewed: key,
                b.apply: gr.Button(interactive=bool(found.changed))}

    def on_apply(self, values: dict) -> dict:
        b = self.batch
        warning = self.unsaved_warning(values)
        if warning:
            return {b.result: warning}
        try:
            key, options = self.batch_edit(values)
        except CaptionViewError as error:
            return {b.result: f"**{error}**"}
        if key != values[b.previewed]:
            return {b.result: "**The edit or the folder changed since the preview:** press Preview again.",
                    b.apply: gr.Button(interactive=False)}
        done = edit_folder(key[0], options, caption_extension=key[1], recursive=key[2])
        return {b.result: view.edit_markdown(done, dry_run=False), b.previewed: None,
                b.apply: gr.Button(interactive=False)} | \
            self.reload(Path(key[0]), key[1], key[2], values[self.editor.state].current)

    def on_captioner(self, name: str) -> dict:
        choices = view.model_choices(name)
        return {self.form.model: gr.Dropdown(choices=choices, value=choices[0])} | \
            {group: gr.Accordion(visible=key == name) for key, group in self.form.groups.items()}

    def wire(self) -> None:
        """The tab's events, in the order the page registers them."""
        f, e, b = self.form, self.editor, self.batch
        where_inputs, editor_outputs = self.place.inputs, self.editor_outputs
        all_options = {widget for widgets in f.option_widgets.values() for widget in widgets.values()}
        f.captioner.change(self.on_captioner, inputs=f.captioner, outputs=[f.model, *f.groups.values()])
        e.load.click(self.on_load, inputs={*where_inputs, e.state, e.caption}, outputs=editor_outputs)
        f.output_kind.change(lambda kind: gr.Row(visible=kind == "metadata"), inputs=f.output_kind,
                             outputs=f.metadata.row, show_progress="hidden")
        f.run.click(self.on_run, inputs={*where_inputs, e.state, e.caption, f.captioner, f.model, f.mode, f.prefix,
                                         f.suffix, f.workers, f.output_kind, f.metadata.out, f.metadata.merge_into,
                                         f.metadata.full_path, *all_options},
                    outputs=[f.progress, f.summary, *editor_outputs], show_progress="hidden")
        f.stop.click(self.on_stop, inputs=self.place.folder, outputs=f.progress)
        e.gallery.select(self.on_select, inputs=[e.state, e.caption], outputs=[*editor_outputs],
                         show_progress="hidden")
        e.previous_button.click(lambda state, text: self.go(state, text, state.index - 1), inputs=[e.state, e.caption],
                                outputs=editor_outputs, show_progress="hidden")
        e.next_button.click(lambda state, text: self.go(state, text, state.index + 1), inputs=[e.state, e.caption],
                            outputs=editor_outputs, show_progress="hidden")
        e.save.click(self.on_save, inputs=[e.state, e.caption], outputs=editor_outputs)
        e.revert.click(self.on_revert, inputs=e.state, outputs=editor_outputs)
        b.preview.click(self.on_preview, inputs={*where_inputs, *b.fields.values()},
                        outputs=[b.result, b.previewed, b.apply])
        b.apply.click(self.on_apply, inputs={*where_inputs, *b.fields.values(), e.state, e.caption, b.previewed},
                      outputs=[b.result, b.previewed, b.apply, *editor_outputs])
        gr.on([widget.input for widget in b.fields.values()], lambda: gr.Button(interactive=False),
              outputs=b.apply, show_progress="hidden", queue=False)
