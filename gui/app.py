"""Assembles the browser app from its tabs and serves it. `app.py` at the repository root parses arguments.

The app is served by our own FastAPI server with Gradio mounted in it, not by `Blocks.launch`: only so does our
guard (gui/http_guard.py: Host, origin and file checks) run in front of every route, Gradio's CORS middleware
included, and no side server (launch's static file workers) serves files around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from engine.config.io import default_config_dict
from gui.context import TabContext
from gui.file_browser import FileRoots
from gui.http_guard import GuardPolicy, HttpGuard, hidden_entries, host_names
from gui.tabs import dataset, first_open, parameters_page

TITLE = "Atelier"
# In the order a newcomer works: prepare images, caption them, add regularization, set parameters, train. The first
# is built at start; a page builds the others when it first opens them (gui/tabs/first_open.py).
TABS = (dataset.build, first_open.captioning, first_open.regularization, parameters_page.build, first_open.train,
        first_open.compare, first_open.tools)


@dataclass(frozen=True)
class AppOptions:
    runs_dir: Path
    presets_dir: Path | None = None
    allowed_paths: tuple[Path, ...] = field(default_factory=tuple)  # besides the home folder

    def roots(self) -> FileRoots:
        """What the file browser may show and the page may load images from: home, --allow-path, the runs."""
        return FileRoots.from_paths(self.allowed_paths, runs_dir=self.runs_dir)


def build_app(options: AppOptions) -> gr.Blocks:
    # analytics_enabled=False: no calls home, ever (the app must work on an offline machine).
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nTrain Stable Diffusion LoRA, DreamBooth and Textual Inversion models. Runs are "
                    f"kept in `{options.runs_dir}`.", elem_id="app-header")
        # --presets-dir as typed may be relative or start with ~: the list and the saves use the one same folder.
        presets_dir = options.presets_dir.expanduser().resolve() if options.presets_dir else None
        ctx = TabContext(runs_dir=options.runs_dir, presets_dir=presets_dir,
                         roots=options.roots(),
                         config=gr.State(default_config_dict()), config_patch=gr.State(None), app=app)
        with gr.Tabs():
            for build_tab in TABS:
                build_tab(ctx)
        keep_out_of_api_docs(app)
    return app


def keep_out_of_api_docs(app: gr.Blocks) -> None:
    """Leaves the page's event handlers out of Gradio's API docs (the page links to none; footer_links=[]). Gradio
    builds the docs of every public endpoint into the first page each server start: for our ~370 handlers that was
    0.5 s and 2.9 of the page's 3.9 MB. "undocumented" keeps them callable as before, by the page and by clients."""
    for function in app.fns.values():
        if function.api_visibility == "public":
            function.api_visibility = "undocumented"


@dataclass(frozen=True)
class ServeOptions:
    """Where and for whom the app listens: app.py's --host, --port, --auth (resolved) and --allowed-host."""

    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    allowed_hosts: tuple[str, ...] = ()


def gradio_folders() -> tuple[Path, ...]:
    """Gradio's upload folder (where it also copies every file a component shows) and its examples cache: the one
    place besides the roots the page loads images from."""
    from gradio.utils import get_cache_folder, get_upload_folder

    return tuple(dict.fromkeys(Path(folder).absolute() for folder in (get_upload_folder(), get_cache_folder())))


def server_app(blocks: gr.Blocks, options: AppOptions, listen: ServeOptions):
    """The ASGI app to run: a FastAPI server with the guard outermost and the Gradio app mounted at /."""
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware

    roots = options.roots()
    caches = gradio_folders()
    policy = GuardPolicy(roots, caches, host_names(listen.host, listen.port, listen.allowed_hosts))
    server = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    # Allows no origin; its presence alone stops Gradio adding its own CORS middleware, which answers any origin
    # under a name other than localhost with Access-Control-Allow-Credentials (the page itself needs no CORS).
    server.add_middleware(CORSMiddleware, allow_origins=[])
    server.add_middleware(HttpGuard, policy=policy)  # added last, so it runs first
    gr.mount_gradio_app(
        server, blocks, path="/", auth=listen.auth, server_name=listen.host, server_port=listen.port,
        # Galleries show images from the roots (Gradio copies them into its cache first, and refuses to copy from
        # anywhere else); the guard decides what is served. blocked_paths is a second layer for hidden folders.
        allowed_paths=[str(folder) for folder in roots.folders],
        blocked_paths=[str(path) for path in hidden_entries(roots, keep=caches)],
        footer_links=[], ssr_mode=False, show_error=True, run_history=False, mcp_server=False)
    # launch() sets this; mount does not, and Gradio then skips its own check of where a shown file comes from.
    blocks.has_launched = True
    return server


def serve(blocks: gr.Blocks, options: AppOptions, listen: ServeOptions) -> None:
    """Runs the app until Ctrl+C."""
    import uvicorn

    app = server_app(blocks, options, listen)
    shown = f"[{listen.host}]" if ":" in listen.host else listen.host
    print(f"Atelier is running on http://{shown}:{listen.port}", flush=True)
    # A page left open keeps an event stream; without a limit, Ctrl+C would wait for every such tab to close.
    uvicorn.Server(uvicorn.Config(app, host=listen.host, port=listen.port, log_level="warning",
                                  timeout_graceful_shutdown=3)).run()
