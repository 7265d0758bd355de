"""Top-level tabs whose content is built when a page first opens them, not when the app starts.

Every component of the page costs Gradio work at start (its config is built four times before the first answer) and
weight in the first page. A tab's content can wait for the tab's first select: it is a gr.render that runs once per
page. The components keep their elem_ids and handlers; they are per page, so what must outlive a page (running jobs)
is made once, outside `content`, and passed in. What other tabs read or write before the tab is opened lives in
states made outside `content` (gr.State, per page, on the server), which the render reads when it builds the tab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr


def tab_built_on_first_open(label: str, tab_id: str, content: Callable[..., None],
                            inputs: Sequence[Any] = (), **render_options: Any) -> gr.Tab:
    """Add a tab to the current gr.Tabs whose `content(*values of inputs)` (components and their events) is built the
    first time the page selects it; selecting it again keeps what the page shows (the box changes only once).
    `render_options` go to gr.render (e.g. a concurrency_id, to build only after the page's earlier events of that
    group)."""
    with gr.Tab(label, id=tab_id) as tab:
        built_on_first_open(tab, tab_id, content, inputs, **render_options)
    return tab


def built_on_first_open(tab: gr.Tab | gr.Accordion, key: str, content: Callable[..., None],
                        inputs: Sequence[Any] = (), **render_options: Any) -> None:
    """The same, inside a `with gr.Tab(...)` the caller opened (where it first made the states `inputs` may hold), or
    inside a closed gr.Accordion, whose content is then built when the page first expands it."""
    # Inside the tab: a component beside the tabs in gr.Tabs shifts the tab bar's labels ('Train' showed as
    # 'Parameters'). A hidden box the page sets itself (js), not a gr.State, which lives on the server: the first
    # open then costs one round trip, not two, and does not wait behind the server's other work before the render is
    # even asked for.
    opened = gr.Checkbox(False, visible="hidden", elem_id=f"opened-{key}")

    @gr.render(inputs=[opened, *inputs], triggers=[opened.change], show_progress="hidden", **render_options)
    def _content(is_open: bool, *values: Any) -> None:
        if is_open:
            content(*values)
            _settle_interactivity()

    opening = tab.expand if isinstance(tab, gr.Accordion) else tab.select
    opening(None, js="() => true", outputs=opened)


def _settle_interactivity() -> None:
    """Gradio's rule for a component left at interactive=None, applied to the ones this render made: editable when
    an event reads it, read-only when events only write it. The page applies that rule from the events it got when
    it loaded, which do not include a render's: a rendered Number with a value that only a button read came out
    disabled (the Tools tab's Resize value), and a rendered empty output box came out editable."""
    from gradio.context import LocalContext  # the render's own blocks and events (gradio/renderable.py uses it)

    config, renderable = LocalContext.blocks_config.get(None), LocalContext.renderable.get(None)
    if config is None or renderable is None:
        return
    functions = [function for function in config.fns.values() if function.rendered_in is renderable]
    read = {block._id for function in functions for block in function.inputs}
    written = {block._id for function in functions for block in function.outputs}
    for block_id, block in config.blocks.items():
        if getattr(block, "rendered_in", None) is renderable and getattr(block, "interactive", False) is None:
            if block_id in read:
                block.interactive = True
            elif block_id in written:
                block.interactive = False
