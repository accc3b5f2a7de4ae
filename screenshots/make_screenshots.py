"""Screenshots of the real app during and after a real SPQE run on the embedded default
model (SmolLM2-135M-Instruct, builtin text), saved as SVG and, where a converter is
installed (rsvg-convert from Debian's librsvg2-bin, or the cairosvg package), PNG.

    python screenshots/make_screenshots.py [--samples 3] [--device cpu] [--size 120x40]

On a 2-core CPU the run takes several minutes (the model is converted once into
~/.cache/impq-tui). The app is driven headless, as a person would at the keyboard: the
setup form, Start, the dashboard while SPQE runs (in a process of its own, which the app
follows), then each view of the finished run, a changed budget, the help, the export
screen and the comparison.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from impq_tui.app import ImpqApp  # noqa: E402
from impq_tui.screens.dashboard import Dashboard  # noqa: E402
from impq_tui.screens.setup import SetupDefaults  # noqa: E402
from impq_tui.widgets.compare import CompareView  # noqa: E402

OUT = ROOT / "screenshots"


class Shooter:
    def __init__(self, app: ImpqApp, pilot, prefix: str) -> None:
        self.app, self.pilot, self.prefix = app, pilot, prefix
        self.saved: list[Path] = []

    async def until(self, condition, what: str, patience: float = 3600) -> None:
        deadline = time.monotonic() + patience
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"gave up waiting for {what}")
            await self.pilot.pause(0.2)

    async def settled(self) -> None:
        dash = self.app.dashboard
        await self.until(lambda: (dash is None or dash.is_current) and not any(
            w.is_running for w in self.app.workers if w.group != "follow"), "the solver")
        await self.pilot.pause(0.3)

    async def shot(self, name: str) -> None:
        await self.pilot.pause(0.3)
        svg = self.app.export_screenshot(title=f"impq-tui — {name.replace('-', ' ')}")
        path = OUT / f"{self.prefix}{name}.svg"
        path.write_text(svg)
        self.saved.append(path)
        print(f"  {path.relative_to(ROOT)}", flush=True)


async def session(samples: int, device: str, size: tuple[int, int], prefix: str, workdir: Path) -> list[Path]:
    os.chdir(workdir)      # the run folder then reads runs/..., as it would for a user
    setup = SetupDefaults(samples=samples, device=device, run_dir="runs/SmolLM2-135M-Instruct")
    app = ImpqApp(setup=setup, cursor_blink=False)
    async with app.run_test(size=size) as pilot:
        s = Shooter(app, pilot, prefix)
        await pilot.pause(0.5)
        await s.shot("01-setup")
        await pilot.press("f5")
        await s.until(lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await pilot.pause(2)
        await s.shot("02-preparing")

        def halfway() -> bool:
            progress = dash.snapshot.progress if dash.state == "running" else None
            return progress is not None and progress.step >= progress.steps // 2

        await s.until(halfway, "half of the first sample")
        await s.shot("03-first-sample")
        await s.until(lambda: len(dash.D) >= 2, "two samples")
        await s.settled()
        await s.shot("04-running-estimates")
        await pilot.press("2")
        await s.settled()
        await s.shot("05-running-bits")
        await pilot.press("1")
        await s.until(lambda: dash.state == "completed", "the run to finish")
        await s.settled()
        await s.until(lambda: dash.frontier is not None, "the frontier")
        await s.shot("06-finished-estimates")
        for key, name in (("2", "07-bits"), ("3", "08-interactions"), ("4", "09-frontier"),
                          ("6", "10-log")):
            await pilot.press(key)
            await s.settled()
            await s.shot(name)
        await pilot.press("2", "left_square_bracket", "left_square_bracket")
        await s.settled()
        await s.shot("11-budget-2.50")
        await pilot.press("f1")
        await s.shot("12-help")
        await pilot.press("escape", "e")
        await s.shot("13-export")
        await pilot.press("escape")
        await pilot.press("c")       # IMPQ against the baselines, real backend perplexity
        view = dash.query_one(CompareView)
        await s.until(lambda: view.result is not None and not view.running, "the comparison")
        await s.settled()
        await s.shot("14-compare")
        await pilot.press("ctrl+q")
    return s.saved


def to_png(svgs: list[Path]) -> str:
    for svg in svgs:
        # Rich writes each run of one style as a <text> of its own; without this, SVG
        # renderers drop a run's leading spaces ("completed SmolLM2" drawn "completedSmolLM2")
        text = svg.read_text()
        if 'xml:space="preserve"' not in text:
            svg.write_text(text.replace("<svg ", '<svg xml:space="preserve" ', 1))
    converter = shutil.which("rsvg-convert")
    if converter:
        for svg in svgs:
            subprocess.run([converter, "--zoom", "1.5", str(svg), "-o", str(svg.with_suffix(".png"))],
                           check=True)
        return "rsvg-convert"
    if importlib.util.find_spec("cairosvg"):
        import cairosvg

        for svg in svgs:
            cairosvg.svg2png(url=str(svg), write_to=str(svg.with_suffix(".png")), scale=1.5)
        return "cairosvg"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="120x40", help="terminal columns x rows")
    parser.add_argument("--prefix", default="", help="prefix of the file names")
    args = parser.parse_args()
    from impq_tui.libraries import quiet_libraries

    quiet_libraries()
    size = tuple(int(x) for x in args.size.split("x"))
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="impq-screens-") as workdir:
        svgs = asyncio.run(session(args.samples, args.device, size, args.prefix, Path(workdir)))
    converter = to_png(svgs)
    print(f"{len(svgs)} screenshots in {OUT.relative_to(ROOT)}/"
          + (f", PNG by {converter}" if converter else " (SVG only: no rsvg-convert or cairosvg)"))


if __name__ == "__main__":
    main()
