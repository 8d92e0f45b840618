"""Progress: plain lines when stderr is not a terminal (throttled, with this run's rate and
ETA from the first step), the same ETA on a terminal's bar, silence when disabled."""

from __future__ import annotations

import io

import pytest

from edgevlm.progress import Progress, clock_text, estimate, note, rate_text


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """rich decides whether a stream is a terminal from these too (CI may set them)."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")


class Clock:
    """A clock the test sets; rich's refresh thread may read it any number of times."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_estimate_and_formats():
    est = estimate(done=3, remaining=27, elapsed=123.6)
    assert est.rate == pytest.approx(3 / 123.6) and est.eta == pytest.approx(27 * 41.2)
    assert estimate(0, 30, 5.0).eta is None and estimate(2, 30, 0.0).rate is None
    assert rate_text(est.rate) == "41.2 s/it" and rate_text(4.0) == "4.0 it/s"
    assert (clock_text(1112.4), clock_text(123.6), clock_text(3725)) == ("18:32", "2:04",
                                                                         "1:02:05")
    assert clock_text(None) == "-:--"


def test_plain_lines_are_throttled_and_carry_rate_and_eta():
    out, clock = io.StringIO(), Clock(100.0)
    with Progress("quantize gptq", 30, unit="layers", stream=out, clock=clock,
                  every=15) as bar:
        for k in range(1, 31):  # a step every 10 s
            clock.t = 100.0 + 10 * k
            bar.update(1, err=0.012)
    lines = out.getvalue().splitlines()
    # the first step, then one at least 15 s after the last printed (steps 3, 5, ... 29),
    # then the last step: 16 lines for 30 steps
    assert len(lines) == 16
    assert lines[0] == ("quantize gptq: 1/30 layers (3%) 10.0 s/it, ETA 4:50 (elapsed 0:10) "
                        "err=0.012")
    assert lines[1] == ("quantize gptq: 3/30 layers (10%) 10.0 s/it, ETA 4:30 (elapsed 0:30) "
                        "err=0.012")
    assert lines[-2].startswith("quantize gptq: 29/30 layers (97%)")
    assert lines[-1] == ("quantize gptq: 30/30 layers (100%) 10.0 s/it, ETA 0:00 "
                         "(elapsed 5:00) err=0.012")


def test_resumed_run_rates_only_its_own_steps():
    """Resumed at 10 of 50: three steps in 150 s are 50 s/it, so 37 left take 30:50."""
    out, clock = io.StringIO(), Clock(0.0)
    with Progress("sft", 50, completed=10, unit="steps", stream=out, clock=clock,
                  every=1000) as bar:
        for t in (30.0, 90.0, 150.0):
            clock.t = t
            bar.update(1, loss=1.5)
        assert bar.estimate().rate == pytest.approx(3 / 150)
        assert bar.eta(150.0 + 50) == pytest.approx(37 * 50 - 50)  # counts down between steps
    lines = out.getvalue().splitlines()
    # the first step, then (throttled) the state it stopped in, printed on exit
    assert lines == ["sft: 11/50 steps (22%) 30.0 s/it, ETA 19:30 (elapsed 0:30) loss=1.5",
                     "sft: 13/50 steps (26%) 50.0 s/it, ETA 30:50 (elapsed 2:30) loss=1.5"]


def test_disabled_is_silent_and_reads_no_clock():
    def clock():
        raise AssertionError("a disabled Progress read the clock")

    out = io.StringIO()
    with Progress("train", 5, enabled=False, stream=out, clock=clock) as bar:
        bar.update(1, loss=1.0)
    note("loading model x ...", enabled=False, stream=out)
    assert out.getvalue() == ""


def test_note_is_one_line():
    out = io.StringIO()
    note("loading model runs/x ...", stream=out)
    assert out.getvalue() == "loading model runs/x ...\n"


def test_terminal_bar_shows_eta_after_the_first_step():
    out, clock = Tty(), Clock(0.0)
    with Progress("quantize qvlm", 30, unit="blocks", stream=out, clock=clock) as bar:
        clock.t = 40.0
        bar.update(1, err=0.02)
    text = out.getvalue()
    assert "ETA 19:20" in text  # 29 blocks at 40 s, from one step (rich's own needs several)
    assert "1/30" in text and "err=0.02" in text
    assert "s/it" not in text  # a bar, not the log lines
