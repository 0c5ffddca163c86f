"""Progress of a run as it happens: a client's local steps (with an ETA) and ``round k/N``.

A client writes one line per optimizer step (:func:`step_line`; in a Flower simulation the line travels
through Flower's log stream, in a deployment it stays in the SuperNode's log). :class:`ProgressView`, in the
process the user watches, turns those lines into one progress bar per client on a terminal (tqdm) or
prints them as they are into a log; ``quiet`` shows neither.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable

STEP = re.compile(r"\[flora\] round (\d+)/(\d+) client (\d+): step (\d+)/(\d+), loss (\S+), (\S+) s")


def step_line(round_: int, rounds: int, client: int, step: int, steps: int, loss: float, elapsed: float) -> str:
    """A client's progress after ``step`` of ``steps`` optimizer steps, ``elapsed`` seconds into its round."""
    eta = elapsed / step * (steps - step)
    return (f"[flora] round {round_}/{rounds} client {client}: step {step}/{steps}, loss {loss:.4f}, "
            f"{elapsed:.1f} s (ETA {eta:.0f} s)")


def step_printer(round_: int, rounds: int, client: int, out: Callable[[str], None] | None = None):
    """An ``on_step(step, steps, loss)`` callback writing :func:`step_line` to ``out`` (default: stdout, flushed,
    so that Flower's log stream carries it at once); its clock starts now."""
    started = time.perf_counter()

    def on_step(step: int, steps: int, loss: float) -> None:
        line = step_line(round_, rounds, client, step, steps, loss, time.perf_counter() - started)
        if out is None:
            print(line, flush=True)
        else:
            out(line)

    return on_step


class ProgressView:
    """Shows the lines of a run: step lines as per-client bars on a terminal, every other line printed.

    ``out``: where lines go (``print``); ``quiet``: step lines are dropped (the caller filters the rest).
    ``bars``: draw tqdm bars (default: when stdout is a terminal)."""

    def __init__(self, out: Callable[[str], None] = print, quiet: bool = False, bars: bool | None = None):
        self.out = out
        self.quiet = quiet
        self.bars = sys.stdout.isatty() if bars is None else bars
        self._bars: dict[int, object] = {}
        self._round = 0

    def line(self, text: str) -> None:
        match = STEP.search(text)
        if match is None:
            self._write(text)
            return
        if self.quiet:
            return
        if not self.bars:
            self._write(text[match.start():])
            return
        round_, rounds, client, step, steps = (int(match.group(i)) for i in range(1, 6))
        self._bar(round_, rounds, client, step, steps, float(match.group(6)))

    def _bar(self, round_: int, rounds: int, client: int, step: int, steps: int, loss: float) -> None:
        from tqdm import tqdm
        if round_ != self._round:
            self.close()
            self._round = round_
        bar = self._bars.get(client)
        if bar is None:
            bar = self._bars[client] = tqdm(total=steps, desc=f"round {round_}/{rounds} client {client}",
                                            unit="step", position=len(self._bars), leave=True, dynamic_ncols=True)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(step - bar.n)

    def _write(self, text: str) -> None:
        if self._bars:
            from tqdm import tqdm
            tqdm.write(text)
        else:
            self.out(text)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars = {}
