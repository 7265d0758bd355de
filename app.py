"""Start Atelier's browser GUI: `python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--runs-dir DIR]`.

Listens on 127.0.0.1 unless told otherwise; listening on any other address needs --auth.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Set before gradio is imported: it reads these once. No telemetry, no calls to model hubs from the GUI process.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from gui.security import UnsafeListenError, check_listen, parse_auth  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="Atelier: a browser workshop for training "
                                     "Stable Diffusion models.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                        "machine only; anything else needs --auth)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--auth", help="user:password required to open the GUI")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="folder for run directories "
                        "(default ./runs)")
    parser.add_argument("--presets-dir", type=Path, default=None, help="folder for your own presets "
                        "(default presets/user)")
    parser.add_argument("--allow-path", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder the file browser may show besides your home folder (repeat for more)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = parse_auth(args.auth)
        check_listen(args.host, auth)
    except (ValueError, UnsafeListenError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from gui.app import AppOptions, build_app  # gradio loads here, after the checks that need no GUI

    options = AppOptions(runs_dir=args.runs_dir.resolve(), presets_dir=args.presets_dir,
                         allowed_paths=tuple(path.resolve() for path in args.allow_path))
    app = build_app(options)
    app.queue(default_concurrency_limit=4)
    # Images shown in galleries (datasets, captions, samples) are served only from the folders the user allows.
    app.launch(server_name=args.host, server_port=args.port, auth=auth, share=False, ssr_mode=False,
               footer_links=[], inbrowser=False, show_error=True,
               allowed_paths=[str(folder) for folder in options.roots().folders],
               # Skips Gradio's start-up self-check (a 3-second HEAD of our own page): on a busy machine the first
               # page build can take longer, and the check then aborts a server that works. Private in 6.31.
               _frontend=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
