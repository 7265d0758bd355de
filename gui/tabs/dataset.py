"""The Dataset tab: make a kohya-style project folder from a folder of pictures, add concepts, balance their
repeats, preview the images, run the dataset doctor and hand the folders to the Parameters tab; and prepare the
metadata file fine-tuning reads (captions and tags merged, cleaned).

The folder work is engine.data.project and the page's wording is gui.views.dataset (gui.metadata_view for the
metadata panel); this module lays out and wires.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.config.choices import CAPTION_EXTENSIONS
from engine.config.errors import ConfigError
from engine.data import project as projects
from gui import metadata_view
from gui.context import TabContext, config_patch_value
from gui.deferred import built_on_first_open
from gui.doctor_view import DoctorPanel, report_for
from gui.file_browser import FileRoots, path_field
from gui.views import dataset as view

_INTRO = ("Pick a folder of pictures (with `.txt` captions if you have them) and a project folder. **Create "
          "project** copies the pictures (never moves them) into `img/<repeats>_<identifier> <class>` and makes "
          "`reg/`, `model/` and `log/` beside it, the layout kohya_ss uses.")


def _concept_inputs(prefix: str, *, with_reg: bool) -> dict[str, Any]:
    with gr.Row():
        fields = {
            "identifier": gr.Textbox(label="Identifier", placeholder="sks", elem_id=f"{prefix}-identifier",
                                     info="A rare word you will put in prompts to call up the subject."),
            "class_name": gr.Textbox(label="Class", placeholder="dog", elem_id=f"{prefix}-class",
                                     info="What the subject is; optional."),
            "repeats": gr.Number(label="Repeats", value=10, precision=0, minimum=1, elem_id=f"{prefix}-repeats",
                                 info="How often each image is seen per epoch."),
        }
        with gr.Column():
            fields["convert"] = gr.Checkbox(label="Convert odd formats to PNG", value=True,
                                            elem_id=f"{prefix}-convert",
                                            info="GIF, TIFF, BMP, AVIF, CMYK and 16-bit images.")
            if with_reg:
                fields["is_reg"] = gr.Checkbox(label="Regularization images (go to reg/)", value=False,
                                               elem_id=f"{prefix}-is-reg")
    return fields


def _concept_args(values: dict, fields: dict[str, Any], source: Any, roots: FileRoots) -> dict[str, Any]:
    """Keyword arguments of create_project/add_concept from the form; the source folder checked like every path.

    Raises:
        ProjectError: the source folder may not be used.
    """
    repeats = values[fields["repeats"]]
    return {"source": view.source_path(values[source], roots), "identifier": values[fields["identifier"]] or "",
            "class_name": values[fields["class_name"]] or "", "convert": bool(values[fields["convert"]]),
            "repeats": int(repeats) if repeats is not None else 0}


_METADATA_INTRO = (
    "`method = \"finetune\"` reads captions and tags from one metadata JSON (sd-scripts' `in_json`). This merges "
    "each image's caption file (`.caption`, e.g. BLIP's) and tag file (`.txt`, e.g. WD14's) into a **new** file; an "
    "existing file is never overwritten. The Captioning tab can also write straight into such a file.")


def _metadata_panel(ctx: TabContext) -> None:
    """The "Prepare fine-tune metadata" accordion, closed; its content is built when a page first expands it (a
    third of the first page's components)."""
    with gr.Accordion("Prepare fine-tune metadata", open=False, elem_id="dataset-metadata") as accordion:
        built_on_first_open(accordion, "dataset-metadata", lambda: _metadata_content(ctx))


def _metadata_content(ctx: TabContext) -> None:
    """The metadata form, wired (gui.metadata_view holds its logic)."""
    gr.Markdown(_METADATA_INTRO)
    with gr.Row():
        folder = path_field(metadata_view.FOLDER_LABEL, ctx.roots, elem_id="dataset-metadata-folder",
                            info="The training images with their caption and tag files beside them.")
        recursive = gr.Checkbox(False, label="Include subfolders", elem_id="dataset-metadata-recursive", scale=0,
                                min_width=180)
    with gr.Row():
        captions = gr.Checkbox(True, label="Merge captions", elem_id="dataset-metadata-captions", scale=0,
                               min_width=170)
        caption_extension = gr.Dropdown(list(CAPTION_EXTENSIONS), value=metadata_view.CAPTION_DEFAULT,
                                        allow_custom_value=True, label="Caption extension", scale=0,
                                        min_width=150, elem_id="dataset-metadata-caption-extension")
        tags = gr.Checkbox(True, label="Merge tags", elem_id="dataset-metadata-tags", scale=0, min_width=150)
        tags_extension = gr.Dropdown(list(CAPTION_EXTENSIONS), value=metadata_view.TAGS_DEFAULT,
                                     allow_custom_value=True, label="Tags extension", scale=0, min_width=150,
                                     elem_id="dataset-metadata-tags-extension")
        clean = gr.Checkbox(False, label="Clean captions and tags", elem_id="dataset-metadata-clean",
                            info="underscores to spaces, BLIP's 'woman' → 'girl', ... (sd-scripts' clean)")
        full_path = gr.Checkbox(False, label="Full paths as keys", elem_id="dataset-metadata-full-path",
                                info="for several folders in one file; else image names")
    with gr.Row():
        in_json = path_field(metadata_view.IN_LABEL, ctx.roots, kind="file", extensions=(".json",),
                             elem_id="dataset-metadata-in", info="Optional: an existing metadata file to build "
                             "on (read, never changed).")
        output = path_field(metadata_view.OUT_LABEL, ctx.roots, kind="file", extensions=(".json",),
                            elem_id="dataset-metadata-out", placeholder="/home/me/project/meta_clean.json",
                            info="A new .json file.")
    with gr.Row():
        write = gr.Button("Write metadata", variant="primary", elem_id="dataset-metadata-write")
        use = gr.Button("Use in Parameters", interactive=False, elem_id="dataset-metadata-use")
    result = gr.Markdown(elem_id="dataset-metadata-result")
    written = gr.State(None)  # the Parameters fields of the file last written

    form_fields = {"folder": folder, "output": output, "in_json": in_json, "captions": captions,
                   "caption_extension": caption_extension, "tags": tags, "tags_extension": tags_extension,
                   "clean": clean, "full_path": full_path, "recursive": recursive}

    def on_write(values: dict) -> dict:
        form = metadata_view.MetadataForm(**{name: values[widget] for name, widget in form_fields.items()})
        patch, text = metadata_view.write_metadata(form, ctx.roots)
        return {result: text, written: patch, use: gr.Button(interactive=patch is not None)}

    def on_use(patch: dict | None) -> dict:
        if not patch:
            return {result: gr.skip()}
        return {ctx.config_patch: config_patch_value(patch),
                result: "Sent to the Parameters tab: " + ", ".join(f"`{key}`" for key in patch) + "."}

    write.click(on_write, inputs=set(form_fields.values()), outputs=[result, written, use])
    use.click(on_use, inputs=written, outputs=[ctx.config_patch, result])


@dataclass
class ProjectSection:
    """The pictures and project folders, Create project, and the Add a concept accordion."""

    source: gr.Textbox
    project: gr.Textbox
    create_fields: dict[str, Any]
    create_button: gr.Button
    message: gr.Markdown
    add_source: gr.Textbox
    add_fields: dict[str, Any]
    add_button: gr.Button


@dataclass
class ConceptsSection:
    """The project's concepts, the balance proposal and the preview gallery."""

    overview: gr.Markdown
    concepts_table: gr.Dataframe
    target: gr.Number
    balance_button: gr.Button
    reload_button: gr.Button
    proposal_text: gr.Markdown
    proposal_table: gr.Dataframe
    apply_button: gr.Button
    proposal: gr.State
    gallery: gr.Gallery


@dataclass
class DoctorSection:
    """The dataset doctor and the button that hands the folders to the Parameters tab."""

    doctor_button: gr.Button
    use_button: gr.Button
    doctor: DoctorPanel


def _project_section(ctx: TabContext) -> ProjectSection:
    with gr.Row():
        source = path_field("Images folder", ctx.roots, elem_id="dataset-source",
                            info="A flat folder of your pictures; subfolders are not searched.")
        project = path_field("Project folder", ctx.roots, elem_id="dataset-project",
                             info="New or existing; nothing in it is overwritten.")
    create_fields = _concept_inputs("dataset", with_reg=False)
    create_button = gr.Button("Create project", variant="primary", elem_id="dataset-create")
    message = gr.Markdown(elem_id="dataset-message")
    with gr.Accordion("Add a concept", open=False, elem_id="dataset-add"):
        add_source = path_field("Images folder of the new concept", ctx.roots, elem_id="dataset-add-source")
        add_fields = _concept_inputs("dataset-add", with_reg=True)
        add_button = gr.Button("Add concept", elem_id="dataset-add-button")
    return ProjectSection(source, project, create_fields, create_button, message, add_source, add_fields, add_button)


def _concepts_section() -> ConceptsSection:
    gr.Markdown("### Concepts")
    overview = gr.Markdown(elem_id="dataset-overview")
    concepts_table = gr.Dataframe(headers=view.CONCEPT_COLUMNS, value=None, interactive=False,
                                  elem_id="dataset-concepts")
    with gr.Row(equal_height=True):
        target = gr.Number(label="Target samples per epoch", value=100, precision=0, minimum=1,
                           elem_id="dataset-target",
                           info="Balance sets each concept's repeats to about this ÷ its image count.")
        balance_button = gr.Button("Balance", elem_id="dataset-balance", scale=0)
        reload_button = gr.Button("Reload", elem_id="dataset-reload", scale=0)
    proposal_text = gr.Markdown(elem_id="dataset-proposal-text")
    proposal_table = gr.Dataframe(headers=view.PROPOSAL_COLUMNS, value=None, interactive=False, visible=False,
                                  elem_id="dataset-proposal")
    apply_button = gr.Button("Rename the folders to these repeats", visible=False, elem_id="dataset-apply")
    proposal = gr.State(None)
    gallery = gr.Gallery(label=f"Preview (first {view.GALLERY_LIMIT} images)", columns=8, height="auto",
                         object_fit="contain", elem_id="dataset-gallery")
    return ConceptsSection(overview, concepts_table, target, balance_button, reload_button, proposal_text,
                           proposal_table, apply_button, proposal, gallery)


def _doctor_section() -> DoctorSection:
    gr.Markdown("### Dataset doctor")
    with gr.Row():
        doctor_button = gr.Button("Run the doctor", elem_id="dataset-doctor-run")
        use_button = gr.Button("Use in Parameters", elem_id="dataset-use")
    doctor = DoctorPanel("dataset-doctor")
    return DoctorSection(doctor_button, use_button, doctor)


def build(ctx: TabContext) -> None:
    """Add the Dataset tab to the current gr.Blocks."""
    with gr.Tab("Dataset", id="dataset"):
        gr.Markdown(_INTRO)
        project = _project_section(ctx)
        concepts = _concepts_section()
        doctor = _doctor_section()
        _metadata_panel(ctx)
    DatasetTab(ctx, project, concepts, doctor).wire()


class DatasetTab:
    """The tab's event handlers, over its sections."""

    def __init__(self, ctx: TabContext, project: ProjectSection, concepts: ConceptsSection, doctor: DoctorSection):
        self.ctx, self.project, self.concepts, self.doctor = ctx, project, concepts, doctor

    @property
    def refreshed(self) -> list[Any]:
        c = self.concepts
        return [c.overview, c.concepts_table, c.gallery, c.proposal, c.proposal_text, c.proposal_table,
                c.apply_button]

    def shown(self, project_text: str | None) -> dict:
        """The project's concepts, overview and gallery; the proposal is hidden (it may be out of date)."""
        c = self.concepts
        hidden = {c.proposal: None, c.proposal_text: "", c.proposal_table: gr.Dataframe(visible=False),
                  c.apply_button: gr.Button(visible=False)}
        if not (project_text or "").strip():
            return hidden | {c.overview: "", c.concepts_table: None, c.gallery: []}
        try:
            folder = view.project_path(project_text, self.ctx.roots)
        except projects.ProjectError as error:
            return hidden | {c.overview: f"**{error}**", c.concepts_table: None, c.gallery: []}
        concepts = projects.list_concepts(folder)
        return hidden | {c.overview: view.overview_markdown(folder, concepts),
                         c.concepts_table: view.concepts_frame(concepts), c.gallery: view.gallery_items(folder)}

    def import_with(self, action: Callable[..., projects.ProjectReport], fields: dict[str, Any],
                    source_box: Any) -> Callable[[dict], dict]:
        project, message, roots, shown = self.project.project, self.project.message, self.ctx.roots, self.shown

        def handler(values: dict) -> dict:
            try:
                folder = view.project_path(values[project], roots)
                args = _concept_args(values, fields, source_box, roots)
                if "is_reg" in fields:
                    args["is_reg"] = bool(values[fields["is_reg"]])
                report = action(folder, **args)
            except (projects.ProjectError, OSError) as error:
                return {message: f"**Nothing was copied:** {error}"}
            return {message: report.summary()} | shown(values[project])
        return handler

    def on_balance(self, project_text: str | None, target_value: float | None) -> dict:
        c = self.concepts
        try:
            folder = view.project_path(project_text, self.ctx.roots)
            concepts = projects.list_concepts(folder)
            wanted = int(target_value or 0)
            plan = projects.balance_repeats(concepts, wanted)
        except projects.ProjectError as error:
            return {c.proposal_text: f"**Cannot balance:** {error}"}
        changes = any(plan[concept.folder] != concept.repeats for concept in concepts if concept.folder in plan)
        return {c.proposal: {str(path): repeats for path, repeats in plan.items()},
                c.proposal_text: view.proposal_markdown(concepts, plan, wanted),
                c.proposal_table: gr.Dataframe(view.proposal_frame(concepts, plan) if plan else None,
                                               visible=bool(plan)),
                c.apply_button: gr.Button(visible=changes)}

    def on_apply(self, project_text: str | None, plan: dict | None) -> dict:
        try:
            renames = projects.apply_repeats(view.project_path(project_text, self.ctx.roots), plan or {})
        except (projects.ProjectError, OSError) as error:
            return {self.project.message: f"**Nothing was renamed:** {error}"}
        return {self.project.message: view.renames_markdown(renames)} | self.shown(project_text)

    def on_doctor(self, project_text: str | None, config: dict | None) -> dict:
        doctor = self.doctor.doctor
        try:
            folder = view.project_path(project_text, self.ctx.roots)
            overrides = view.doctor_overrides(folder, projects.list_concepts(folder))
            return doctor.show(report_for(config, folder, overrides=overrides), base=folder)
        except (ConfigError, projects.ProjectError, OSError) as error:
            return doctor.show_error(error)

    def on_use(self, project_text: str | None) -> dict:
        try:
            folder = view.project_path(project_text, self.ctx.roots)
        except projects.ProjectError as error:
            return {self.project.message: f"**Not sent:** {error}"}
        patch = view.parameters_patch(folder, projects.list_concepts(folder))
        return {self.ctx.config_patch: config_patch_value(patch),
                self.project.message: "Sent to the Parameters tab: " + ", ".join(f"`{key}`" for key in patch) + "."}

    def wire(self) -> None:
        """The tab's events, in the order the page registers them."""
        p, c, d, ctx = self.project, self.concepts, self.doctor, self.ctx
        refreshed = self.refreshed
        create_inputs = {p.source, p.project, *p.create_fields.values()}
        p.create_button.click(self.import_with(projects.create_project, p.create_fields, p.source),
                              inputs=create_inputs, outputs=[p.message, *refreshed])
        p.add_button.click(self.import_with(projects.add_concept, p.add_fields, p.add_source),
                           inputs={p.add_source, p.project, *p.add_fields.values()}, outputs=[p.message, *refreshed])
        # .change, not blur: a folder picked in the file browser sets the box without focusing it.
        gr.on([p.project.change, c.reload_button.click], self.shown, inputs=p.project, outputs=refreshed,
              trigger_mode="always_last", show_progress="hidden")
        c.balance_button.click(self.on_balance, inputs=[p.project, c.target],
                               outputs=[c.proposal, c.proposal_text, c.proposal_table, c.apply_button])
        c.apply_button.click(self.on_apply, inputs=[p.project, c.proposal], outputs=[p.message, *refreshed])
        d.doctor_button.click(self.on_doctor, inputs=[p.project, ctx.config], outputs=d.doctor.outputs)
        d.use_button.click(self.on_use, inputs=p.project, outputs=[ctx.config_patch, p.message])
