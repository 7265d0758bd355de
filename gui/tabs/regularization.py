"""The Regularization tab: the class folder and prompt, repeats, prior loss weight, the balancing numbers, and
class images generated from the base model (`python -m engine class-images` in a subprocess, with progress)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from gui.context import TabContext, config_patch_value
from gui.file_browser import path_field
from gui.jobs import FolderJobs, JobUpdate
from gui.views import regularization as view

GALLERY_LIMIT = 24  # the newest images shown; every update sends the gallery again


def _finished_text(update: JobUpdate, folder: str) -> str:
    done = update.last("done") or {}
    if update.ok:
        return f"Done: wrote {done.get('written', 0)} image(s) to `{folder}` (seed {done.get('seed')})."
    if done.get("stopped"):
        return f"Stopped after {done.get('written', 0)} image(s); they are kept."
    return f"**Generation failed:** {update.error_text()}"


@dataclass
class ClassFolderSection:
    """The regularization folder, the class folder in it (made by Create folder, or typed) and the prior loss
    weight, sent to the Parameters tab by Use in Parameters."""

    parent: gr.Textbox
    class_prompt: gr.Textbox
    repeats: gr.Number
    create: gr.Button
    folder: gr.Textbox
    folder_note: gr.Markdown
    prior: gr.Number
    apply: gr.Button
    message: gr.Markdown


@dataclass
class BalanceSection:
    """The training folder, and how many class images each training image is balanced against."""

    train_dir: gr.Textbox
    recount: gr.Button
    balance: gr.Markdown


@dataclass
class GenerateSection:
    """Class images generated from a base model, their progress and the newest of them."""

    model: gr.Textbox
    prompt: gr.Textbox
    negative: gr.Textbox
    count: gr.Number
    steps: gr.Number
    width: gr.Number
    height: gr.Number
    seed: gr.Number
    generate: gr.Button
    stop: gr.Button
    progress: gr.Markdown
    gallery: gr.Gallery


def _class_folder_section(ctx: TabContext) -> ClassFolderSection:
    parent = path_field(view.PARENT_LABEL, ctx.roots, kind="folder", elem_id="reg-parent",
                        info=view.field_help(view.REG_DIR))
    with gr.Row():
        class_prompt = gr.Textbox(label="Class prompt", placeholder="dog", scale=3, elem_id="reg-class",
                                  info="The class your subject belongs to; the caption of class images that "
                                       "have no caption file.")
        repeats = gr.Number(label="Repeats", value=1, minimum=1, precision=0, scale=1, elem_id="reg-repeats")
        create = gr.Button("Create folder", scale=1, min_width=160, elem_id="reg-create")
    folder = path_field(view.FOLDER_LABEL, ctx.roots, kind="folder", elem_id="reg-folder",
                        info="The '<repeats>_<class>' folder inside the regularization folder; made by Create "
                             "folder, or type one.")
    folder_note = gr.Markdown(elem_id="reg-folder-note")
    with gr.Row():
        prior = gr.Number(label="Prior loss weight", value=1.0, minimum=0, maximum=100, step=0.1, scale=3,
                          elem_id="reg-prior-loss", info=view.field_help(view.PRIOR_LOSS_WEIGHT))
        apply = gr.Button("Use in Parameters", scale=1, min_width=160, elem_id="reg-apply")
    message = gr.Markdown(elem_id="reg-message")
    return ClassFolderSection(parent, class_prompt, repeats, create, folder, folder_note, prior, apply, message)


def _balance_section(ctx: TabContext) -> BalanceSection:
    gr.Markdown("### Balance")
    with gr.Row():
        train_dir = path_field(view.TRAIN_LABEL, ctx.roots, kind="folder", elem_id="reg-train-dir",
                               info=view.field_help(view.TRAIN_DIR))
        recount = gr.Button("Recount", size="sm", scale=0, elem_id="reg-recount")
    balance = gr.Markdown("Choose the folders above to see the balance.", elem_id="reg-balance")
    return BalanceSection(train_dir, recount, balance)


def _generate_section(ctx: TabContext) -> GenerateSection:
    with gr.Accordion("Generate class images", open=True, elem_id="reg-generate-section"):
        model = path_field(view.MODEL_LABEL, ctx.roots, kind="file", elem_id="reg-model",
                           info=view.field_help(view.MODEL_PATH))
        prompt = gr.Textbox(label="Prompt", placeholder="a photo of a dog (empty: the class prompt)",
                            elem_id="reg-gen-prompt")
        negative = gr.Textbox(label="Negative prompt", elem_id="reg-gen-negative")
        with gr.Row():
            count = gr.Number(label="Images", value=10, minimum=1, precision=0, elem_id="reg-gen-count")
            steps = gr.Number(label="Steps", value=30, minimum=1, precision=0, elem_id="reg-gen-steps")
            width = gr.Number(label="Width (0 = the model's)", value=0, minimum=0, precision=0,
                              elem_id="reg-gen-width")
            height = gr.Number(label="Height (0 = the model's)", value=0, minimum=0, precision=0,
                               elem_id="reg-gen-height")
            seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id="reg-gen-seed")
        with gr.Row():
            generate = gr.Button("Generate class images", variant="primary", elem_id="reg-generate")
            stop = gr.Button("Stop", elem_id="reg-stop")
        progress = gr.Markdown(elem_id="reg-gen-progress")
        gallery = gr.Gallery(label="New class images", columns=6, height=260, object_fit="contain",
                             elem_id="reg-gallery")
    return GenerateSection(model, prompt, negative, count, steps, width, height, seed, generate, stop, progress,
                           gallery)


def content(ctx: TabContext, running: FolderJobs) -> None:
    """The tab's sections and their events, for one page, built when it first opens the tab (gui/tabs/first_open.py).
    `running`: class folder -> its generation job (the Stop button's target), one for all pages."""
    gr.Markdown("Regularization (class) images keep the model's idea of your subject's class (e.g. *dog*) while "
                "it learns your subject. They live in subfolders named `<repeats>_<class>` of a regularization "
                "folder, e.g. `reg/1_dog`.", elem_id="reg-intro")
    folders = _class_folder_section(ctx)
    balance = _balance_section(ctx)
    generation = _generate_section(ctx)
    RegularizationTab(ctx, folders, balance, generation, running).wire()


class RegularizationTab:
    """The tab's event handlers, over its sections."""

    def __init__(self, ctx: TabContext, folders: ClassFolderSection, balance: BalanceSection,
                 generation: GenerateSection, running: FolderJobs):
        self.ctx, self.folders, self.balance, self.generation = ctx, folders, balance, generation
        self.running = running  # class folder -> its generation job (the Stop button's target)

    def create(self, parent: str, repeats: float, class_prompt: str) -> dict:
        f = self.folders
        try:
            folder, message = view.create_class_folder(parent, repeats, class_prompt, self.ctx.roots)
        except ValueError as error:
            return {f.message: f"**{error}**"}
        return {f.folder: str(folder), f.message: message}

    def from_folder(self, path: str, parent: str) -> dict:
        """A typed or created class folder fills in the parent, class and repeats its name states."""
        f = self.folders
        found = view.read_class_folder(path)
        if found is None:
            return {f.folder_note: f"`{path}` is not named `<repeats>_<class>` (e.g. `1_dog`): training would "
                                   "skip it." if path.strip() else ""}
        updates = {f.class_prompt: found.class_prompt, f.repeats: found.repeats, f.folder_note: ""}
        return updates | ({} if parent.strip() == str(found.parent) else {f.parent: str(found.parent)})

    def apply(self, parent: str, folder: str, weight: float) -> dict:
        message = self.folders.message
        parent = parent.strip() or (str(Path(folder.strip()).parent) if folder.strip() else "")
        if not parent:
            return {message: "**Choose the regularization folder first.**"}
        return {self.ctx.config_patch: config_patch_value(view.reg_patch(parent, weight)),
                message: f"The Parameters tab now trains with `{parent}` as the regularization folder and a "
                         f"prior loss weight of {weight:g}."}

    def recount(self, train_dir: str, parent: str, config: Any = None) -> str:
        if not (train_dir.strip() or parent.strip()):
            return "Choose the folders above to see the balance."
        outside = view.outside_roots({view.TRAIN_LABEL: train_dir, view.PARENT_LABEL: parent}, self.ctx.roots)
        return outside or view.balance_markdown(view.balance_numbers(train_dir, parent, config))

    def defaults_from_config(self, config: Any, model: str, train_dir: str, parent: str) -> dict:
        """Empty fields take the Parameters tab's values; what the user typed here is kept."""
        pairs = ((self.generation.model, model, view.MODEL_PATH), (self.balance.train_dir, train_dir, view.TRAIN_DIR),
                 (self.folders.parent, parent, view.REG_DIR))
        # Every output named (gr.skip() for kept ones): Gradio reads an empty dict as a missing value.
        return {component: view.config_value(config, path) if not current.strip() and view.config_value(config, path)
                else gr.skip() for component, current, path in pairs}

    def request(self, values: dict) -> view.GenerateRequest:
        g = self.generation
        return view.GenerateRequest(
            model=values[g.model], out=values[self.folders.folder].strip(),
            prompt=values[g.prompt] or values[self.folders.class_prompt],
            negative=values[g.negative], count=int(values[g.count] or 0), steps=int(values[g.steps] or 0),
            width=int(values[g.width] or 0), height=int(values[g.height] or 0),
            seed=int(values[g.seed] if values[g.seed] is not None else -1))

    def generate(self, values: dict) -> Iterator[dict]:
        progress, gallery = self.generation.progress, self.generation.gallery
        folder = values[self.folders.folder].strip()
        request = self.request(values)
        try:
            args = view.class_images_args(request, values.get(self.ctx.config))
        except ValueError as error:
            yield {progress: f"**{error}**"}
            return
        outside = view.outside_roots(view.generate_paths(request, values.get(self.ctx.config)), self.ctx.roots)
        if outside:
            yield {progress: outside}
            return
        with self.running.claim(folder, args) as job:
            if job is None:
                yield {progress: f"**Images are already being generated into `{folder}`.**"}
                return
            before, shown = view.image_names(folder), None
            for update in job.follow():
                images = view.new_images(folder, before, GALLERY_LIMIT)
                text = _finished_text(update, folder) if update.finished else \
                    update.progress_text() or "Loading the model…"
                yield {progress: text} | ({gallery: images} if images != shown else {})
                shown = images

    def stop(self, folder: str) -> str:
        if not self.running.stop(folder.strip()):
            return "Nothing is being generated into this folder."
        return "Stopping…"

    def wire(self) -> None:
        """The tab's events, in the order the page registers them."""
        ctx, f, b, g = self.ctx, self.folders, self.balance, self.generation
        config_input = [ctx.config] if ctx.config is not None else []
        counted = [b.train_dir, f.parent]
        f.create.click(self.create, inputs=[f.parent, f.repeats, f.class_prompt], outputs=[f.folder, f.message])
        f.folder.change(self.from_folder, inputs=[f.folder, f.parent],
                        outputs=[f.class_prompt, f.repeats, f.parent, f.folder_note])
        f.apply.click(self.apply, inputs=[f.parent, f.folder, f.prior], outputs=[ctx.config_patch, f.message])
        for trigger in (b.recount.click, b.train_dir.change, f.parent.change):
            trigger(self.recount, inputs=counted + config_input, outputs=b.balance, show_progress="hidden")
        if ctx.config is not None:
            # When the tab is built (the Parameters form may have changed long before) and at each change.
            for trigger in (None, ctx.config.change):
                gr.on(trigger, self.defaults_from_config, inputs=[ctx.config, g.model, b.train_dir, f.parent],
                      outputs=[g.model, b.train_dir, f.parent])
        form = {f.folder, g.model, g.prompt, f.class_prompt, g.negative, g.count, g.steps, g.width, g.height,
                g.seed} | set(config_input)
        generated = g.generate.click(self.generate, inputs=form, outputs=[g.progress, g.gallery])
        generated.then(self.recount, inputs=counted + config_input, outputs=b.balance, show_progress="hidden")
        g.stop.click(self.stop, inputs=f.folder, outputs=g.progress)
