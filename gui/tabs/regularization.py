"""The Regularization tab: the class folder and prompt, repeats, prior loss weight, the balancing numbers, and
class images generated from the base model (`python -m engine class-images` in a subprocess, with progress)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from gui import reg_view as view
from gui.context import TabContext, config_patch_value
from gui.file_browser import path_field
from gui.jobs import EngineJob, JobUpdate

GALLERY_LIMIT = 24  # the newest images shown; every update sends the gallery again


def _finished_text(update: JobUpdate, folder: str) -> str:
    done = update.last("done") or {}
    if update.ok:
        return f"Done: wrote {done.get('written', 0)} image(s) to `{folder}` (seed {done.get('seed')})."
    if done.get("stopped"):
        return f"Stopped after {done.get('written', 0)} image(s); they are kept."
    return f"**Generation failed:** {update.error_text()}"


def _layout(ctx: TabContext) -> dict[str, Any]:
    """The tab's components by name."""
    c: dict[str, Any] = {}
    gr.Markdown("Regularization (class) images keep the model's idea of your subject's class (e.g. *dog*) while it "
                "learns your subject. They live in subfolders named `<repeats>_<class>` of a regularization "
                "folder, e.g. `reg/1_dog`.", elem_id="reg-intro")
    c["parent"] = path_field(view.PARENT_LABEL, ctx.roots, kind="folder", elem_id="reg-parent",
                             info=view.field_help(view.REG_DIR))
    with gr.Row():
        c["class_prompt"] = gr.Textbox(label="Class prompt", placeholder="dog", scale=3, elem_id="reg-class",
                                       info="The class your subject belongs to; the caption of class images that "
                                            "have no caption file.")
        c["repeats"] = gr.Number(label="Repeats", value=1, minimum=1, precision=0, scale=1, elem_id="reg-repeats")
        c["create"] = gr.Button("Create folder", scale=1, min_width=160, elem_id="reg-create")
    c["folder"] = path_field(view.FOLDER_LABEL, ctx.roots, kind="folder", elem_id="reg-folder",
                             info="The '<repeats>_<class>' folder inside the regularization folder; made by Create "
                                  "folder, or type one.")
    c["folder_note"] = gr.Markdown(elem_id="reg-folder-note")
    with gr.Row():
        c["prior"] = gr.Number(label="Prior loss weight", value=1.0, minimum=0, maximum=100, step=0.1, scale=3,
                               elem_id="reg-prior-loss", info=view.field_help(view.PRIOR_LOSS_WEIGHT))
        c["apply"] = gr.Button("Use in Parameters", scale=1, min_width=160, elem_id="reg-apply")
    c["message"] = gr.Markdown(elem_id="reg-message")
    gr.Markdown("### Balance")
    with gr.Row():
        c["train_dir"] = path_field(view.TRAIN_LABEL, ctx.roots, kind="folder", elem_id="reg-train-dir",
                                    info=view.field_help(view.TRAIN_DIR))
        c["recount"] = gr.Button("Recount", size="sm", scale=0, elem_id="reg-recount")
    c["balance"] = gr.Markdown("Choose the folders above to see the balance.", elem_id="reg-balance")
    with gr.Accordion("Generate class images", open=True, elem_id="reg-generate-section"):
        c["model"] = path_field(view.MODEL_LABEL, ctx.roots, kind="file", elem_id="reg-model",
                                info=view.field_help(view.MODEL_PATH))
        c["prompt"] = gr.Textbox(label="Prompt", placeholder="a photo of a dog (empty: the class prompt)",
                                 elem_id="reg-gen-prompt")
        c["negative"] = gr.Textbox(label="Negative prompt", elem_id="reg-gen-negative")
        with gr.Row():
            c["count"] = gr.Number(label="Images", value=10, minimum=1, precision=0, elem_id="reg-gen-count")
            c["steps"] = gr.Number(label="Steps", value=30, minimum=1, precision=0, elem_id="reg-gen-steps")
            c["width"] = gr.Number(label="Width (0 = the model's)", value=0, minimum=0, precision=0,
                                   elem_id="reg-gen-width")
            c["height"] = gr.Number(label="Height (0 = the model's)", value=0, minimum=0, precision=0,
                                    elem_id="reg-gen-height")
            c["seed"] = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id="reg-gen-seed")
        with gr.Row():
            c["generate"] = gr.Button("Generate class images", variant="primary", elem_id="reg-generate")
            c["stop"] = gr.Button("Stop", elem_id="reg-stop")
        c["progress"] = gr.Markdown(elem_id="reg-gen-progress")
        c["gallery"] = gr.Gallery(label="New class images", columns=6, height=260, object_fit="contain",
                                  elem_id="reg-gallery")
    return c


def build(ctx: TabContext) -> None:
    """Add the Regularization tab to the current gr.Blocks."""
    running: dict[str, EngineJob] = {}  # class folder -> its generation job (the Stop button's target)
    with gr.Tab("Regularization", id="regularization"):
        c = _layout(ctx)
    config_input = [ctx.config] if ctx.config is not None else []

    def create(parent: str, repeats: float, class_prompt: str) -> dict:
        try:
            folder, message = view.create_class_folder(parent, repeats, class_prompt, ctx.roots)
        except ValueError as error:
            return {c["message"]: f"**{error}**"}
        return {c["folder"]: str(folder), c["message"]: message}

    def from_folder(path: str, parent: str) -> dict:
        """A typed or created class folder fills in the parent, class and repeats its name states."""
        found = view.read_class_folder(path)
        if found is None:
            return {c["folder_note"]: f"`{path}` is not named `<repeats>_<class>` (e.g. `1_dog`): training would "
                                      "skip it." if path.strip() else ""}
        updates = {c["class_prompt"]: found.class_prompt, c["repeats"]: found.repeats, c["folder_note"]: ""}
        return updates | ({} if parent.strip() == str(found.parent) else {c["parent"]: str(found.parent)})

    def apply(parent: str, folder: str, weight: float) -> dict:
        parent = parent.strip() or (str(Path(folder.strip()).parent) if folder.strip() else "")
        if not parent:
            return {c["message"]: "**Choose the regularization folder first.**"}
        return {ctx.config_patch: config_patch_value(view.reg_patch(parent, weight)),
                c["message"]: f"The Parameters tab now trains with `{parent}` as the regularization folder and a "
                              f"prior loss weight of {weight:g}."}

    def recount(train_dir: str, parent: str, config: Any = None) -> str:
        if not (train_dir.strip() or parent.strip()):
            return "Choose the folders above to see the balance."
        outside = view.outside_roots({view.TRAIN_LABEL: train_dir, view.PARENT_LABEL: parent}, ctx.roots)
        return outside or view.balance_markdown(view.balance_numbers(train_dir, parent, config))

    def defaults_from_config(config: Any, model: str, train_dir: str, parent: str) -> dict:
        """Empty fields take the Parameters tab's values; what the user typed here is kept."""
        pairs = ((c["model"], model, view.MODEL_PATH), (c["train_dir"], train_dir, view.TRAIN_DIR),
                 (c["parent"], parent, view.REG_DIR))
        # Every output named (gr.skip() for kept ones): Gradio reads an empty dict as a missing value.
        return {component: view.config_value(config, path) if not current.strip() and view.config_value(config, path)
                else gr.skip() for component, current, path in pairs}

    def generate(values: dict) -> Iterator[dict]:
        folder = values[c["folder"]].strip()
        request = view.GenerateRequest(
            model=values[c["model"]], out=folder, prompt=values[c["prompt"]] or values[c["class_prompt"]],
            negative=values[c["negative"]], count=int(values[c["count"]] or 0), steps=int(values[c["steps"]] or 0),
            width=int(values[c["width"]] or 0), height=int(values[c["height"]] or 0),
            seed=int(values[c["seed"]] if values[c["seed"]] is not None else -1))
        try:
            args = view.class_images_args(request, values.get(ctx.config))
        except ValueError as error:
            yield {c["progress"]: f"**{error}**"}
            return
        outside = view.outside_roots(view.generate_paths(request, values.get(ctx.config)), ctx.roots)
        if outside:
            yield {c["progress"]: outside}
            return
        if folder in running:
            yield {c["progress"]: f"**Images are already being generated into `{folder}`.**"}
            return
        before, shown = view.image_names(folder), None
        running[folder] = job = EngineJob(args)
        try:
            for update in job.follow():
                images = view.new_images(folder, before, GALLERY_LIMIT)
                text = _finished_text(update, folder) if update.finished else \
                    update.progress_text() or "Loading the model…"
                yield {c["progress"]: text} | ({c["gallery"]: images} if images != shown else {})
                shown = images
        finally:
            running.pop(folder, None)

    def stop(folder: str) -> str:
        job = running.get(folder.strip())
        if job is None:
            return "Nothing is being generated into this folder."
        job.cancel()
        return "Stopping…"

    counted = [c["train_dir"], c["parent"]]
    c["create"].click(create, inputs=[c["parent"], c["repeats"], c["class_prompt"]],
                      outputs=[c["folder"], c["message"]])
    c["folder"].change(from_folder, inputs=[c["folder"], c["parent"]],
                       outputs=[c["class_prompt"], c["repeats"], c["parent"], c["folder_note"]])
    c["apply"].click(apply, inputs=[c["parent"], c["folder"], c["prior"]], outputs=[ctx.config_patch, c["message"]])
    for trigger in (c["recount"].click, c["train_dir"].change, c["parent"].change):
        trigger(recount, inputs=counted + config_input, outputs=c["balance"], show_progress="hidden")
    if ctx.config is not None:
        ctx.config.change(defaults_from_config, inputs=[ctx.config, c["model"], c["train_dir"], c["parent"]],
                          outputs=[c["model"], c["train_dir"], c["parent"]])
    form = {c[name] for name in ("folder", "model", "prompt", "class_prompt", "negative", "count", "steps", "width",
                                 "height", "seed")} | set(config_input)
    generated = c["generate"].click(generate, inputs=form, outputs=[c["progress"], c["gallery"]])
    generated.then(recount, inputs=counted + config_input, outputs=c["balance"], show_progress="hidden")
    c["stop"].click(stop, inputs=c["folder"], outputs=c["progress"])
