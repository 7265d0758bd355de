"""Start Atelier's browser GUI: `python app.py [--host 127.0.0.1] [--port 7860] [--auth-file FILE] [--runs-dir DIR]`.

Listens on 127.0.0.1 unless told otherwise; listening on any other address needs a login (--auth-file, ATELIER_AUTH
or --auth). What the server exposes and how it is guarded: SECURITY.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Set before gradio is imported: it reads these once. No telemetry, no calls to model hubs from the GUI process.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Up to four runs of one event handler at a time (Gradio's default is one). Read when the gr.Blocks is made, which
# sets up its queue then: a later `queue(default_concurrency_limit=4)` rebuilt Gradio's internal app for it, 0.05-0.1 s
# of every start (the mount builds the app that serves anyway).
os.environ.setdefault("GRADIO_DEFAULT_CONCURRENCY_LIMIT", "4")

from gui.security import AUTH_ENV, AUTH_ON_COMMAND_LINE, UnsafeListenError, check_listen, resolve_auth  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="Atelier: a browser workshop for training "
                                     "Stable Diffusion models.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                        "machine only; anything else needs a login)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--auth-file", type=Path, metavar="FILE", help="a file (mode 600) whose first line is the "
                        f"user:password required to open the GUI; or set {AUTH_ENV}=user:password")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="the login on the command line, where every user of "
                        "this machine can read it (ps): prefer --auth-file")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a host name the browser may use to reach the app besides localhost and IP addresses, "
                        "e.g. behind a reverse proxy (repeat for more); other names are refused (DNS rebinding)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="folder for run directories "
                        "(default ./runs)")
    parser.add_argument("--presets-dir", type=Path, default=None, help="folder for your own presets "
                        "(default presets/user)")
    parser.add_argument("--allow-path", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder the app may use besides your home folder and the runs folder (repeat for more); "
                        "also the way to allow a hidden folder such as ~/.cache/models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = resolve_auth(args.auth, args.auth_file, os.environ)
        check_listen(args.host, auth)
    except (ValueError, UnsafeListenError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.auth:
        print(AUTH_ON_COMMAND_LINE, file=sys.stderr)
    # The garbage collector is off until the page is built (engine.startup: it rescanned the growing heap for
    # 0.3 s of gradio's import and 0.08 s of building the page).
    from engine.startup import pause_collector, start_up_done

    pause_collector()
    from gui.app import AppOptions, ServeOptions, build_app, serve  # gradio loads here, after the checks

    options = AppOptions(runs_dir=args.runs_dir.resolve(), presets_dir=args.presets_dir,
                         allowed_paths=tuple(path.resolve() for path in args.allow_path))
    app = build_app(options)
    start_up_done()
    serve(app, options, ServeOptions(host=args.host, port=args.port, auth=auth,
                                     allowed_hosts=tuple(args.allowed_host)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
