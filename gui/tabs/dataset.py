"""The Dataset tab: make a kohya-style project folder from a folder of pictures, add concepts, balance their
repeats, preview the images, run the dataset doctor and hand the folders to the Parameters tab.

The folder work is engine.data.project and the page's wording is gui.dataset_view; this module lays out and wires.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from engine.config.errors import ConfigError
from engine.data import project as projects
from gui import dataset_view as view
from gui.context import TabContext, config_patch_value
from gui.doctor_view import DoctorPanel, report_for
from gui.file_browser import FileRoots, path_field

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


def build(ctx: TabContext) -> None:
    """Add the Dataset tab to the current gr.Blocks."""
    with gr.Tab("Dataset", id="dataset"):
        gr.Markdown(_INTRO)
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
        gr.Markdown("### Dataset doctor")
        with gr.Row():
            doctor_button = gr.Button("Run the doctor", elem_id="dataset-doctor-run")
            use_button = gr.Button("Use in Parameters", elem_id="dataset-use")
        doctor = DoctorPanel("dataset-doctor")

    def shown(project_text: str | None) -> dict:
        """The project's concepts, overview and gallery; the proposal is hidden (it may be out of date)."""
        hidden = {proposal: None, proposal_text: "", proposal_table: gr.Dataframe(visible=False),
                  apply_button: gr.Button(visible=False)}
        if not (project_text or "").strip():
            return hidden | {overview: "", concepts_table: None, gallery: []}
        try:
            folder = view.project_path(project_text, ctx.roots)
        except projects.ProjectError as error:
            return hidden | {overview: f"**{error}**", concepts_table: None, gallery: []}
        concepts = projects.list_concepts(folder)
        return hidden | {overview: view.overview_markdown(folder, concepts),
                         concepts_table: view.concepts_frame(concepts), gallery: view.gallery_items(folder)}

    def import_with(action: Callable[..., projects.ProjectReport], fields: dict[str, Any],
                    source_box: Any) -> Callable[[dict], dict]:
        def handler(values: dict) -> dict:
            try:
                folder = view.project_path(values[project], ctx.roots)
                args = _concept_args(values, fields, source_box, ctx.roots)
                if "is_reg" in fields:
                    args["is_reg"] = bool(values[fields["is_reg"]])
                report = action(folder, **args)
            except (projects.ProjectError, OSError) as error:
                return {message: f"**Nothing was copied:** {error}"}
            return {message: report.summary()} | shown(values[project])
        return handler

    def on_balance(project_text: str | None, target_value: float | None) -> dict:
        try:
            folder = view.project_path(project_text, ctx.roots)
            concepts = projects.list_concepts(folder)
            wanted = int(target_value or 0)
            plan = projects.balance_repeats(concepts, wanted)
        except projects.ProjectError as error:
            return {proposal_text: f"**Cannot balance:** {error}"}
        changes = any(plan[c.folder] != c.repeats for c in concepts if c.folder in plan)
        return {proposal: {str(path): repeats for path, repeats in plan.items()},
                proposal_text: view.proposal_markdown(concepts, plan, wanted),
                proposal_table: gr.Dataframe(view.proposal_frame(concepts, plan) if plan else None,
                                             visible=bool(plan)),
                apply_button: gr.Button(visible=changes)}

    def on_apply(project_text: str | None, plan: dict | None) -> dict:
        try:
            renames = projects.apply_repeats(view.project_path(project_text, ctx.roots), plan or {})
        except (projects.ProjectError, OSError) as error:
            return {message: f"**Nothing was renamed:** {error}"}
        return {message: view.renames_markdown(renames)} | shown(project_text)

    def on_doctor(project_text: str | None, config: dict | None) -> dict:
        try:
            folder = view.project_path(project_text, ctx.roots)
            overrides = view.doctor_overrides(folder, projects.list_concepts(folder))
            return doctor.show(report_for(config, folder, overrides=overrides), base=folder)
        except (ConfigError, projects.ProjectError, OSError) as error:
            return doctor.show_error(error)

    def on_use(project_text: str | None) -> dict:
        try:
            folder = view.project_path(project_text, ctx.roots)
        except projects.ProjectError as error:
            return {message: f"**Not sent:** {error}"}
        patch = view.parameters_patch(folder, projects.list_concepts(folder))
        return {ctx.config_patch: config_patch_value(patch),
                message: "Sent to the Parameters tab: " + ", ".join(f"`{key}`" for key in patch) + "."}

    refreshed = [overview, concepts_table, gallery, proposal, proposal_text, proposal_table, apply_button]
    create_inputs = {source, project, *create_fields.values()}
    create_button.click(import_with(projects.create_project, create_fields, source), inputs=create_inputs,
                        outputs=[message, *refreshed])
    add_button.click(import_with(projects.add_concept, add_fields, add_source),
                     inputs={add_source, project, *add_fields.values()}, outputs=[message, *refreshed])
    # .change, not blur: a folder picked in the file browser sets the box without focusing it.
    gr.on([project.change, reload_button.click], shown, inputs=project, outputs=refreshed, trigger_mode="always_last",
          show_progress="hidden")
    balance_button.click(on_balance, inputs=[project, target],
                         outputs=[proposal, proposal_text, proposal_table, apply_button])
    apply_button.click(on_apply, inputs=[project, proposal], outputs=[message, *refreshed])
    doctor_button.click(on_doctor, inputs=[project, ctx.config], outputs=doctor.outputs)
    use_button.click(on_use, inputs=project, outputs=[ctx.config_patch, message])
