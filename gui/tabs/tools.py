"""The Tools tab: inspect, merge, resize, extract and convert LoRA files, build the latent cache, and run the dataset
doctor on any config. The LoRA tools and the cache run as engine processes (they load torch); the doctor runs here.
Command lines are built in gui/tools_commands.py, run and read in gui/views/tools.py, and what results look like is
gui/tools_render.py's; this module lays out components and wires events."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from engine.config.errors import ConfigError
from gui import tools_commands as commands
from gui import tools_render as render
from gui.context import TabContext
from gui.doctor_view import DoctorPanel
from gui.file_browser import FileRoots, path_field
from gui.jobs import EngineJob
from gui.views import tools as view

_MODEL_INFO = "a single-file checkpoint (.safetensors/.ckpt) or a diffusers folder"
_OUTPUT_INFO = "a new file; blank: next to the input with a name that says what was done (never overwrites)"
_SOURCE_CHOICES = [(label, value) for value, label in view.CONFIG_SOURCES.items()]

Values = dict[gr.components.Component, Any]


def _lora_field(label: str, roots: FileRoots, elem_id: str, info: str = "a kohya LoRA/LoCon .safetensors file"
                ) -> gr.Textbox:
    return path_field(label, roots, kind="file", elem_id=elem_id, info=info, extensions=view.LORA_EXTENSIONS)


def _model_field(label: str, roots: FileRoots, elem_id: str, info: str = _MODEL_INFO) -> gr.Textbox:
    return path_field(label, roots, kind="file", elem_id=elem_id, info=info, extensions=view.MODEL_EXTENSIONS)


def _output_field(roots: FileRoots, elem_id: str) -> gr.Textbox:
    return path_field("Output file", roots, kind="file", elem_id=elem_id, info=_OUTPUT_INFO,
                      extensions=(commands.LORA_SUFFIX,))


def _precision(elem_id: str) -> gr.Dropdown:
    return gr.Dropdown(list(commands.PRECISIONS), value="float", label="Save precision", elem_id=elem_id,
                       info="dtype of the saved weights (float: float32)")


def _merge_precision() -> gr.Dropdown:
    return gr.Dropdown(list(commands.MERGE_PRECISIONS), value=commands.KEEP_PRECISION, label="Save precision",
                       elem_id="tools-merge-precision",
                       info="keep: a FLUX.1/Chroma file keeps its own dtype (bf16 stays bf16); LoRAs and SD "
                            "checkpoints are written in float32. float: float32")


def _results(prefix: str) -> tuple[gr.Markdown, gr.Markdown]:
    """What the tool did, and the inspect summary of the file it wrote."""
    return gr.Markdown(elem_id=f"{prefix}-result"), gr.Markdown(elem_id=f"{prefix}-written")


def _wire_writer(tool: str, button: gr.Button, fields: set, make_args: Callable[[Values], list[str]],
                 result: gr.Markdown, written: gr.Markdown) -> None:
    """Run merge/resize/extract on click, then inspect the new file."""

    def run(values: Values) -> Iterator[Values]:
        try:
            args = make_args(values)
        except commands.ToolInputError as error:
            yield {result: f"✖ {error}", written: ""}
            return
        yield {result: f"Running `{commands.command_text(args)}`…", written: ""}
        outcome, inspected = view.run_and_inspect(args)
        yield {result: render.result_markdown(tool, outcome), written: render.written_markdown(outcome, inspected)}

    button.click(run, inputs=fields, outputs=[result, written])


def _inspect_tab(roots: FileRoots) -> None:
    with gr.Tab("Inspect LoRA", id="tools-inspect"):
        file = _lora_field("LoRA file", roots, "tools-inspect-file",
                           "a .safetensors, .ckpt or .pt LoRA, LyCORIS or Textual Inversion file")
        button = gr.Button("Inspect", variant="primary", elem_id="tools-inspect-run")
        summary = gr.Markdown(elem_id="tools-inspect-summary")
        metadata = gr.Dataframe(headers=render.METADATA_COLUMNS, value=None, interactive=False, wrap=True,
                                label="Training metadata", elem_id="tools-inspect-metadata")

    def run(path: str) -> Iterator[Values]:
        try:
            args = commands.inspect_args(path, roots)
        except commands.ToolInputError as error:
            yield {summary: f"✖ {error}", metadata: None}
            return
        yield {summary: f"Running `{commands.command_text(args)}`…", metadata: None}
        outcome = view.run_lora_tool(args)
        yield {summary: render.inspect_outcome_markdown(outcome),
               metadata: render.metadata_frame(outcome.report) if outcome.report else None}

    button.click(run, inputs=file, outputs=[summary, metadata])


def _merge_tab(roots: FileRoots) -> None:
    with gr.Tab("Merge", id="tools-merge"):
        gr.Markdown("Combine LoRAs into one LoRA (their ranks concatenated, exact; or re-factored to one rank with "
                    "an SVD rank), or merge them into a base model's weights to make a new checkpoint.")
        with gr.Row():
            pick = _lora_field("Add a LoRA", roots, "tools-merge-pick")
            ratio = gr.Number(1.0, label="Ratio", elem_id="tools-merge-ratio", scale=0, min_width=120)
            add = gr.Button("Add", elem_id="tools-merge-add", scale=0, min_width=80)
        sources = gr.Textbox(label="LoRAs to merge", lines=3, elem_id="tools-merge-sources",
                             info="one per line: PATH or PATH:RATIO")
        output = _output_field(roots, "tools-merge-output")
        into_model = _model_field("Merge into model (optional)", roots, "tools-merge-model",
                                  _MODEL_INFO + "; FLUX.1/Chroma: the transformer file; blank: merge into one LoRA")
        encoders, note, accordion = _text_encoder_fields(roots)
        with gr.Row():
            svd = gr.Number(0, label="SVD rank", precision=0, minimum=0, elem_id="tools-merge-svd",
                            info="LoRA merge only; 0: concatenate the ranks (exact)")
            conv = gr.Number(0, label="Conv rank", precision=0, minimum=0, elem_id="tools-merge-conv",
                             info="with an SVD rank: the rank of 3x3 convs (0: the SVD rank)")
            precision = _merge_precision()
        button = gr.Button("Merge", variant="primary", elem_id="tools-merge-run")
        result, written = _results("tools-merge")

    add.click(lambda text, path, value: (commands.add_merge_source(text, path, value), ""),
              inputs=[sources, pick, ratio], outputs=[sources, pick])

    def describe(model: str) -> tuple[str, Any]:
        text, is_flux = view.text_encoder_note(model, roots)
        return text, gr.update(open=True) if is_flux else gr.update()  # never closes what the user opened

    into_model.change(describe, inputs=into_model, outputs=[note, accordion], show_progress="hidden")
    fields = {sources, output, into_model, svd, conv, precision, *(box for pair in encoders.values() for box in pair)}
    _wire_writer("merge", button, fields,
                 lambda v: commands.merge_args(v[sources], v[output], roots, into_model=v[into_model], svd_rank=v[svd],
                                           conv_rank=v[conv], precision=v[precision],
                                           text_encoders={option: (v[source], v[target])
                                                          for option, (source, target) in encoders.items()}),
                 result, written)


def _text_encoder_fields(roots: FileRoots) -> tuple[dict[str, tuple[gr.Textbox, gr.Textbox]], gr.Markdown,
                                                     gr.Accordion]:
    """The text-encoder file and new file of each `lora merge` option (--clip-l/--clip-l-save-to, ...), in an
    accordion that opens when the base model is a FLUX.1/Chroma file. The fields stay visible for any model, so a
    value is never sent unseen; the engine refuses them for a model that holds its own text encoders."""
    fields: dict[str, tuple[gr.Textbox, gr.Textbox]] = {}
    with gr.Accordion("Text encoder files (FLUX.1 / Chroma / SD3)", open=False, elem_id="tools-merge-encoders") as box:
        note = gr.Markdown(view.TEXT_ENCODER_HELP, elem_id="tools-merge-encoders-note")
        for option, label in view.TEXT_ENCODER_OPTIONS.items():
            with gr.Row():
                source = path_field(f"{label} file", roots, kind="file", elem_id=f"tools-merge-{option}",
                                    info=f"the {label} text encoder to merge the LoRA's {label} modules into",
                                    extensions=view.TEXT_ENCODER_EXTENSIONS)
                target = path_field(f"New {label} file", roots, kind="file", elem_id=f"tools-merge-{option}-save-to",
                                    info=_OUTPUT_INFO, extensions=(commands.LORA_SUFFIX,))
            fields[option] = (source, target)
    return fields, note, box


def _resize_tab(roots: FileRoots) -> None:
    with gr.Tab("Resize", id="tools-resize"):
        gr.Markdown("Write a copy of a LoRA at a new rank (SVD). The report says how much of each module's change "
                    "is kept.")
        file = _lora_field("LoRA file", roots, "tools-resize-file")
        output = _output_field(roots, "tools-resize-output")
        with gr.Row():
            rule = gr.Radio([(f"{name}: {meaning}", name) for name, (_, meaning) in commands.RESIZE_RULES.items()],
                            value="rank", label="New size by", elem_id="tools-resize-rule")
            value = gr.Number(8, label="Value", minimum=0, elem_id="tools-resize-value",
                              info="the rank, X or the fraction, as the rule says")
        with gr.Row():
            conv = gr.Number(0, label="Conv rank", precision=0, minimum=0, elem_id="tools-resize-conv",
                             info="with a fixed rank: the rank of 3x3 convs (0: the same rank)")
            precision = _precision("tools-resize-precision")
        button = gr.Button("Resize", variant="primary", elem_id="tools-resize-run")
        result, written = _results("tools-resize")

    _wire_writer("resize", button, {file, output, rule, value, conv, precision},
                 lambda v: commands.resize_args(v[file], v[output], roots, rule=v[rule], value=v[value],
                                            conv_rank=v[conv], precision=v[precision]), result, written)


def _extract_tab(roots: FileRoots) -> None:
    with gr.Tab("Extract", id="tools-extract"):
        gr.Markdown("Make a LoRA from the difference between a fine-tuned model and its base (the layers a LoRA "
                    "trains; with a conv rank also the ResNet convolutions, LoCon). FLUX.1/Chroma: two transformer "
                    "files; only the transformer is extracted, as sd-scripts does.")
        with gr.Row():
            base = _model_field("Base model", roots, "tools-extract-base")
            tuned = _model_field("Fine-tuned model", roots, "tools-extract-tuned", "of the same family as the base")
        output = _output_field(roots, "tools-extract-output")
        with gr.Row():
            rank = gr.Number(8, label="Rank", precision=0, minimum=1, elem_id="tools-extract-rank",
                             info="of Linear and 1x1 conv modules")
            conv = gr.Number(0, label="Conv rank", precision=0, minimum=0, elem_id="tools-extract-conv",
                             info="of 3x3 convs; 0: none")
            min_diff = gr.Number(0.01, label="Min difference", minimum=0, elem_id="tools-extract-min-diff",
                                 info="leave out a text encoder changed by at most this (kohya: 0.01)")
            device = gr.Dropdown(["cpu", "cuda"], value="cpu", allow_custom_value=True, label="Device",
                                 elem_id="tools-extract-device", info="where the SVDs run")
        with gr.Row():
            clamp = gr.Number(0, label="Clamp quantile", minimum=0, elem_id="tools-extract-clamp",
                              info="clip each module's factors at this quantile of their values (sd-scripts: 0.99); "
                                   "0: no clipping, the best approximation at the rank")
            precision = _precision("tools-extract-precision")
        button = gr.Button("Extract", variant="primary", elem_id="tools-extract-run")
        result, written = _results("tools-extract")

    _wire_writer("extract", button, {base, tuned, output, rank, conv, min_diff, device, clamp, precision},
                 lambda v: commands.extract_args(v[base], v[tuned], v[output], roots, rank=v[rank], conv_rank=v[conv],
                                             min_diff=v[min_diff], device=v[device], precision=v[precision],
                                             clamp_quantile=v[clamp]),
                 result, written)


def _convert_tab(roots: FileRoots) -> None:
    with gr.Tab("Convert", id="tools-convert"):
        gr.Markdown("Write a FLUX.1, Chroma or SD3 LoRA under the other naming, as a new file: kohya's names "
                    "(`lora_unet_...`, what Atelier, sd-scripts and ComfyUI write) to diffusers' (`transformer.*`, "
                    "what diffusers' pipelines load; diffusers cannot read kohya SD3 LoRAs), or back. Exact both "
                    "ways. T5 modules are left out of a diffusers file (diffusers loads no LoRA into T5); "
                    "LoHa/LoKr files do not convert.")
        file = _lora_field("LoRA file", roots, "tools-convert-file",
                           "a kohya LoRA, or a diffusers/PEFT LoRA (lora_A/lora_B names), .safetensors")
        output = _output_field(roots, "tools-convert-output")
        with gr.Row():
            to = gr.Radio([(meaning, name) for name, meaning in commands.CONVERT_CHOICES.items()], value="diffusers",
                          label="Convert to", elem_id="tools-convert-to")
            family = gr.Dropdown(list(commands.CONVERT_FAMILY_CHOICES), value=commands.CONVERT_AUTO, label="Model",
                                 elem_id="tools-convert-family",
                                 info="auto: from the file; choose one for a diffusers file whose names FLUX.1 and "
                                      "SD3 share")
        button = gr.Button("Convert", variant="primary", elem_id="tools-convert-run")
        result, written = _results("tools-convert")

    _wire_writer("convert", button, {file, output, to, family},
                 lambda v: commands.convert_args(v[file], v[output], roots, to=v[to], family=v[family]), result,
                 written)


def _config_source(prefix: str, roots: FileRoots) -> tuple[gr.Radio, gr.Textbox]:
    with gr.Row():
        source = gr.Radio(_SOURCE_CHOICES, value="file", label="Config", elem_id=f"{prefix}-source")
        path = path_field("Config file", roots, kind="file", elem_id=f"{prefix}-config",
                          info="a run config .toml or a .json preset; relative paths start from its folder",
                          extensions=view.CONFIG_EXTENSIONS)
    return source, path


def _cache_tab(ctx: TabContext) -> None:
    with gr.Tab("Cache latents", id="tools-cache"):
        gr.Markdown("Encode every training image with the VAE once, ahead of training; training then reuses each "
                    "entry whose settings still match.")
        source, path = _config_source("tools-cache", ctx.roots)
        with gr.Row():
            skip = gr.Checkbox(True, label="Keep entries that are up to date", elem_id="tools-cache-skip",
                               info="off: re-encode everything (stale entries are rebuilt either way)")
            device = gr.Dropdown(list(commands.CACHE_DEVICES), value=commands.DEVICE_AUTO, label="Device",
                                 elem_id="tools-cache-device")
            workers = gr.Number(0, label="Workers", precision=0, minimum=0, elem_id="tools-cache-workers",
                                info="threads reading images (0: the config's data loader workers)")
        button = gr.Button("Build the cache", variant="primary", elem_id="tools-cache-run")
        progress = gr.Markdown(elem_id="tools-cache-progress")
        result = gr.Markdown(elem_id="tools-cache-result")

    def run(values: Values) -> Iterator[Values]:
        try:
            config = view.cache_config_path(values[source], values[path], values[ctx.config], ctx.roots)
        except (commands.ToolInputError, ConfigError) as error:
            yield {progress: "", result: render.config_error_markdown(error)}
            return
        args = commands.cache_args(config, skip_existing=values[skip], device=values[device], workers=values[workers])
        yield {progress: "Starting (loading the VAE)…", result: ""}
        for update in EngineJob(args).follow():
            yield {progress: update.progress_text() or "Starting (loading the VAE)…"}
        yield {progress: update.progress_text(), result: render.cache_markdown(update)}

    button.click(run, inputs={source, path, skip, device, workers, ctx.config}, outputs=[progress, result])


def _doctor_tab(ctx: TabContext) -> None:
    with gr.Tab("Doctor", id="tools-doctor"):
        gr.Markdown("Check the dataset of any config: folders, images, captions, buckets and the steps per epoch.")
        source, path = _config_source("tools-doctor", ctx.roots)
        quick = gr.Checkbox(False, label="Quick", elem_id="tools-doctor-quick",
                            info="skip the checks that read every file in full (corrupt images, duplicates)")
        button = gr.Button("Run the doctor", variant="primary", elem_id="tools-doctor-run")
        panel = DoctorPanel("tools-doctor")

    def run(values: Values) -> Values:
        try:
            report = view.doctor_report(values[source], values[path], values[ctx.config], ctx.roots,
                                        quick=values[quick])
        except (commands.ToolInputError, ConfigError) as error:
            return panel.show_error(error)
        return panel.show(report)

    button.click(run, inputs={source, path, quick, ctx.config}, outputs=panel.outputs)


def content(ctx: TabContext) -> None:
    """The tools and their events, for one page, built when it first opens the tab (gui/tabs/first_open.py)."""
    with gr.Tabs(elem_id="tools-tabs"):
        _inspect_tab(ctx.roots)
        _merge_tab(ctx.roots)
        _resize_tab(ctx.roots)
        _extract_tab(ctx.roots)
        _convert_tab(ctx.roots)
        _cache_tab(ctx)
        _doctor_tab(ctx)
