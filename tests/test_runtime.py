"""Process settings: the warning about a CPU another job already keeps busy."""

from __future__ import annotations

import os

import pytest

from dplatent import runtime


@pytest.fixture(autouse=True)
def spinning(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)


def test_busy_machine_and_every_core_warns_with_the_remedies():
    msg = runtime.busy_warning(0, busy=1.9, cores=2)
    assert msg.startswith("warning: other jobs keep the CPU busy (1.9 of 2 cores)")
    assert "OMP_WAIT_POLICY=PASSIVE" in msg and "--threads 1" in msg
    assert "--threads 4" in runtime.busy_warning(8, busy=3.0, cores=8)  # 8 of 8 = every core


@pytest.mark.parametrize("threads, busy", [(0, 0.3), (1, 1.9)])
def test_idle_machine_or_fewer_threads_than_cores_stays_quiet(threads, busy):
    assert runtime.busy_warning(threads, busy=busy, cores=2) is None


def test_sleeping_openmp_threads_stay_quiet(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert runtime.busy_warning(0, busy=1.9, cores=2) is None


def test_cli_prints_the_warning_when_busy(monkeypatch, capsys):
    from dplatent import cli
    monkeypatch.setattr(runtime, "busy_cores", lambda: 1.5)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    cli._warn_if_busy(None)
    assert "(1.5 of 2 cores)" in capsys.readouterr().err


def test_busy_cores_sees_one_spinning_thread():
    import threading
    import time
    stop = time.perf_counter() + 1.0
    spinner = threading.Thread(target=lambda: [0 for _ in iter(
        lambda: time.perf_counter() < stop, False)])
    quiet = runtime.busy_cores(0.3)
    spinner.start()
    time.sleep(0.05)
    loaded = runtime.busy_cores(0.3)
    spinner.join()
    if quiet is None:
        pytest.skip("no /proc/stat here")
    if quiet > (os.cpu_count() or 1) - 1.2:
        pytest.skip(f"other jobs already use {quiet:.1f} cores: no room to see one more")
    # one spinning thread is about one core more than before (other jobs may add noise)
    assert loaded - quiet > 0.5


def _fake_proc_stat(monkeypatch, *snapshots):
    """Serve successive /proc/stat texts (two CPUs) to busy_cores, with no real sleep."""
    import io
    texts = iter(f"cpu  {' '.join(map(str, t))}\ncpu0 0\ncpu1 0\nintr 0\n" for t in snapshots)
    monkeypatch.setattr(runtime, "open", lambda path: io.StringIO(next(texts)), raising=False)
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)


def test_busy_cores_counts_only_the_window_and_forgets_a_finished_job(monkeypatch):
    # ticks: user nice system idle iowait irq softirq steal
    history = [900_000, 0, 100_000, 1_000, 0, 0, 0, 0]  # a job kept both cores busy for hours
    idle_window = [900_000, 0, 100_000, 1_050, 10, 0, 0, 0]  # then 60 ticks idle or waiting
    _fake_proc_stat(monkeypatch, history, idle_window)
    assert runtime.busy_cores() == 0.0
    half_window = [900_020, 0, 100_010, 1_030, 0, 0, 0, 0]  # 30 of 60 ticks busy, 2 CPUs
    _fake_proc_stat(monkeypatch, history, half_window)
    assert runtime.busy_cores() == pytest.approx(1.0)


def test_busy_cores_without_a_readable_proc_stat_is_none(monkeypatch):
    def missing(path):
        raise FileNotFoundError(path)
    monkeypatch.setattr(runtime, "open", missing, raising=False)
    assert runtime.busy_cores() is None
    _fake_proc_stat(monkeypatch, [5, 0, 0, 5, 0, 0, 0, 0], [5, 0, 0, 5, 0, 0, 0, 0])
    assert runtime.busy_cores() is None  # no ticks passed: nothing to measure
