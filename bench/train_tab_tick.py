#!/usr/bin/env python
"""The Train tab's 1-second tick on a long run, with many viewers: tick time and the app's memory.

    .venv/bin/python bench/train_tab_tick.py [--events 100000] [--viewers 10] [--ticks 20] [--baseline-ticks 3]
                                             [--baseline REV] [--skip-baseline]

Builds a synthetic run directory (an events.jsonl of `--events` realistic engine events: progress every step,
a model and a state folder every 1000 steps, 4 sample images every 2000, a train.log line every 10 steps; run.json
records this script's own process as the run's, so the run shows as running). Then, for each side:
- the app as users run it (`app.py --runs-dir ...`, the tree's own main(), in a server process of this script
  that also answers "what is your RSS" and "gc.collect(), then your RSS" on its stdin);
- `--viewers` browser tabs, each posting the tab's timer event (`/gradio_api/run/tick`, the function the page's
  gr.Timer calls, as the page posts it, with its own session and so its own gr.State) once a second, `--ticks`
  times;
- while a writer appends progress events (10 a second) and log lines, as a training run does.
Sides: baseline = the tree at `--baseline` (git archive; default the commit before the incremental reader, whose
tick re-read the whole events.jsonl and kept every progress row in each viewer's state), new = this working tree.
Prints median and p95 tick time per side (all ticks, and apart: each viewer's first tick and the later ones), the
server's RSS before the viewers, after them, and after gc, and the ratios baseline / new.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "adf16a3"  # the last commit whose Train tab read the whole events.jsonl on every tick
RUN_NAME = "20261203-000000-long-run"
CHECKPOINT_EVERY, SAMPLE_EVERY, LOG_EVERY = 1000, 2000, 10
PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763"
                        "f8cfc0000003010100c9fe92ef0000000049454e44ae426082")


# --- the synthetic run ---------------------------------------------------------------------------------------


def _proc_start(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2:].split()[19])


class RunWriter:
    """Writes a run's files the way the engine does, step by step."""

    def __init__(self, run_dir: Path, total_steps: int):
        self.run_dir, self.total_steps, self.step = run_dir, total_steps, 0
        self.events = (run_dir / "events.jsonl").open("a", encoding="utf-8")
        self.log = (run_dir / "train.log").open("a", encoding="utf-8")
        self.random = random.Random(0)
        self.count = 0

    def emit(self, type_: str, **fields) -> None:
        self.events.write(json.dumps({"type": type_, "time": time.time(), **fields}) + "\n")
        self.count += 1

    def advance(self) -> None:
        self.step += 1
        step = self.step
        loss = 0.12 + 0.1 * self.random.random() + 0.3 / (1 + step / 2000)
        self.emit("progress", task="train", step=step, total_steps=self.total_steps, epoch=1 + step // 5000,
                  num_epochs=self.total_steps // 5000, lr=[1e-4, 5e-5], lr_names=["unet", "text_encoder"],
                  loss=loss, loss_avg=0.17 + 0.3 / (1 + step / 2000), it_per_s=3.1,
                  eta_s=(self.total_steps - step) / 3.1, rss_peak_mib=5120.0)
        if step % LOG_EVERY == 0:
            self.log.write(f"00:00:00 step {step}/{self.total_steps} epoch 1 loss {loss:.4f}\n")
        if step % CHECKPOINT_EVERY == 0:
            out = self.run_dir / "output"
            model, state = out / f"lora-step{step:08d}.safetensors", out / f"lora-step{step:08d}-state"
            model.write_bytes(b"\0" * 64)
            state.mkdir()
            self.emit("checkpoint", kind="step", path=str(model), step=step, epoch=1)
            self.emit("checkpoint", kind="state", path=str(state), step=step, epoch=1)
        if step % SAMPLE_EVERY == 0:
            folder = self.run_dir / "samples"
            images = []
            for index in range(4):
                path = folder / f"step{step:08d}-{index}.png"
                path.write_bytes(PNG_1PX)
                images.append({"path": str(path), "prompt": f"prompt {index}", "seed": index})
            self.emit("sample", step=step, epoch=1, count=4, folder=str(folder), images=images)

    def flush(self) -> None:
        self.events.flush()
        self.log.flush()


def make_run(runs_dir: Path, events: int) -> RunWriter:
    run_dir = runs_dir / RUN_NAME
    (run_dir / "output").mkdir(parents=True)
    (run_dir / "samples").mkdir()
    (run_dir / "config.toml").write_text("", encoding="utf-8")
    (run_dir / "run.json").write_text(json.dumps({
        "created_at": time.time(), "status": "started", "pid": os.getpid(), "pgid": os.getpgrp(),
        "proc_start": _proc_start(os.getpid()), "events_offset": 0, "returncode": None, "notes": [],
        "output_dir": str(run_dir / "output"), "output_name": "lora"}), encoding="utf-8")
    writer = RunWriter(run_dir, total_steps=events * 2)
    writer.emit("start", total_steps=writer.total_steps, num_epochs=writer.total_steps // 5000)
    while writer.count < events:
        writer.advance()
    writer.flush()
    return writer


def append_while(writer: RunWriter, stop: threading.Event, per_second: float = 10) -> None:
    while not stop.wait(1 / per_second):
        writer.advance()
        writer.flush()


# --- the app, in a server process ------------------------------------------------------------------------------


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def serve(source: Path, port: int, runs_dir: Path) -> None:
    """Run the tree's app.py main() in a thread; answer RSS questions on stdin ('rss', 'gc')."""
    answers = os.fdopen(os.dup(1), "w")  # the app prints to stdout too: it gets stderr's file instead
    os.dup2(2, 1)
    sys.path.insert(0, str(source))
    os.chdir(source)
    import app

    threading.Thread(target=app.main, args=(["--port", str(port), "--runs-dir", str(runs_dir)],),
                     daemon=True).start()
    for command in sys.stdin:
        if command.strip() == "gc":
            gc.collect()
        print(f"{rss_mib():.1f}", file=answers, flush=True)


class Server:
    def __init__(self, source: Path, runs_dir: Path, log: Path):
        self.port = _free_port()
        self.log = log.open("w")
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", str(source), "--port", str(self.port),
                                         "--runs-dir", str(runs_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, env=env, text=True)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=5).read()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the app from {source} did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)

    def rss(self, command: str = "rss") -> float:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- viewers ------------------------------------------------------------------------------------------------


def viewer(url: str, ticks: int, times: list[tuple[int, float]], errors: list[str]) -> None:
    """One browser tab: the Train tab's timer endpoint once a second (or right away when a tick took longer).

    Posted as the page does for a `queue=False` event: straight to the run route, with the tab's session hash (the
    server keeps the tab's gr.State under it) and null for the state input. When the tick changes the samples key
    (the new Train tab draws its gallery through that component's change event), the page runs that event next:
    so does this, and its time counts in the tick's."""
    session = uuid.uuid4().hex[:11]
    key_index, key = _output_index(url, "tick", "run-samples-key"), None
    time.sleep(random.random())  # tabs are not opened in the same millisecond
    for number in range(ticks):
        start = time.perf_counter()
        try:
            text = _post(url, "tick", [RUN_NAME, None], session)
            if key_index is not None and json.loads(text)["data"][key_index] != key:
                key = json.loads(text)["data"][key_index]
                _post(url, "draw_samples", [RUN_NAME], session)
        except OSError as error:
            errors.append(f"{type(error).__name__}: {error}")
            continue
        elapsed = time.perf_counter() - start
        times.append((number, elapsed))
        if "running" not in text:
            errors.append(f"a tick did not show the run as running: {text[:300]}")
        time.sleep(max(0.0, 1.0 - elapsed))


def _output_index(url: str, api_name: str, elem_id: str) -> int | None:
    """Where the component `elem_id` is among the outputs of the event `api_name`, from the page's config."""
    with urllib.request.urlopen(f"{url}config", timeout=60) as response:
        config = json.loads(response.read())
    [event] = [entry for entry in config["dependencies"] if entry.get("api_name") == api_name]
    ids = {component["id"] for component in config["components"]
           if component.get("props", {}).get("elem_id") == elem_id}
    return next((index for index, block in enumerate(event["outputs"]) if block in ids), None)


def _post(url: str, api_name: str, data: list, session: str) -> str:
    body = json.dumps({"data": data, "session_hash": session}).encode()
    request = urllib.request.Request(f"{url}gradio_api/run/{api_name}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.read().decode()


def measure(name: str, source: Path, runs_dir: Path, writer: RunWriter, viewers: int, ticks: int) -> dict:
    server = Server(source, runs_dir, runs_dir.parent / f"{name}-server.log")
    try:
        before = server.rss()
        times: list[tuple[int, float]] = []
        errors: list[str] = []
        stop = threading.Event()
        appender = threading.Thread(target=append_while, args=(writer, stop))
        appender.start()
        threads = [threading.Thread(target=viewer, args=(server.url, ticks, times, errors)) for _ in range(viewers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        stop.set()
        appender.join()
        after = server.rss()
        time.sleep(2)
        after_gc = server.rss("gc")
    finally:
        server.close()
    every = sorted(elapsed for _, elapsed in times)
    later = sorted(elapsed for number, elapsed in times if number > 0) or [float("nan")]
    first = [elapsed for number, elapsed in times if number == 0] or [float("nan")]
    result = {"side": name, "ticks": len(every), "errors": len(errors), "median_s": statistics.median(every),
              "p95_s": _p95(every), "max_s": every[-1], "first_max_s": max(first), "later_median_s":
              statistics.median(later), "later_p95_s": _p95(later), "wall_s": wall, "rss_before": before,
              "rss_after": after, "rss_after_gc": after_gc, "events": writer.count,
              "load_avg_1min": os.getloadavg()[0]}
    print(json.dumps(result), flush=True)
    for error in sorted(set(errors))[:5]:
        print(f"  {name} error: {error}", flush=True)
    return result


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(0.95 * len(values)))]


def baseline_tree(rev: str, folder: Path) -> Path:
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(folder, filter="data")
    return folder


def report(results: list[dict]) -> None:
    print(f"\n{'side':9} {'ticks':>5} {'err':>4} {'median':>9} {'p95':>9} {'max':>9} {'1st max':>9} "
          f"{'later p50':>9} {'later p95':>9} {'RSS before':>11} {'after':>9} {'after gc':>9}")
    for row in results:
        times = " ".join(f"{row[key] * 1000:7.1f}ms" for key in ("median_s", "p95_s", "max_s", "first_max_s",
                                                                  "later_median_s", "later_p95_s"))
        print(f"{row['side']:9} {row['ticks']:5d} {row['errors']:4d} {times} {row['rss_before']:8.1f}MiB "
              f"{row['rss_after']:6.1f}MiB {row['rss_after_gc']:6.1f}MiB")
    print("(1st: each viewer's first tick, which draws everything and, on the new side, waits for the one full "
          "read of the file; later: the other ticks)")
    if len(results) == 2:
        old, new = results
        print(f"baseline / new: median {old['median_s'] / new['median_s']:.1f}x, "
              f"p95 {old['p95_s'] / new['p95_s']:.1f}x; "
              f"memory growth after gc: {old['rss_after_gc'] - old['rss_before']:+.1f} MiB vs "
              f"{new['rss_after_gc'] - new['rss_before']:+.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--viewers", type=int, default=10)
    parser.add_argument("--ticks", type=int, default=20, help="ticks per viewer on the new side")
    parser.add_argument("--baseline-ticks", type=int, default=3, help="ticks per viewer on the baseline side "
                        "(each takes seconds there)")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline tree")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.runs_dir)
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-train-tick-"))
    try:
        runs_dir = folder / "runs"
        started = time.perf_counter()
        writer = make_run(runs_dir, args.events)
        size = (runs_dir / RUN_NAME / "events.jsonl").stat().st_size
        print(f"synthetic run: {writer.count} events, {size / 2**20:.1f} MiB events.jsonl, "
              f"{len(list((runs_dir / RUN_NAME / 'output').iterdir()))} checkpoint files and folders "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
        results = []
        if not args.skip_baseline:
            old = baseline_tree(args.baseline, folder / "baseline")
            results.append(measure("baseline", old, runs_dir, writer, args.viewers, args.baseline_ticks))
        results.append(measure("new", REPO, runs_dir, writer, args.viewers, args.ticks))
        report(results)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
