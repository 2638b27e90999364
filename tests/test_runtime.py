"""Process settings: the warning about a CPU another job already keeps busy."""

from __future__ import annotations

import pytest

from dplatent import runtime


@pytest.fixture(autouse=True)
def spinning(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)


def test_busy_machine_and_every_core_warns_with_the_remedies():
    msg = runtime.busy_warning(0, load=1.9, cores=2)
    assert msg.startswith("warning: the CPU is already busy (load average 1.9 on 2 cores)")
    assert "OMP_WAIT_POLICY=PASSIVE" in msg and "--threads 1" in msg
    assert "--threads 4" in runtime.busy_warning(8, load=3.0, cores=8)  # 8 of 8 = every core


@pytest.mark.parametrize("threads, load", [(0, 0.3), (1, 1.9)])
def test_idle_machine_or_fewer_threads_than_cores_stays_quiet(threads, load):
    assert runtime.busy_warning(threads, load=load, cores=2) is None


def test_sleeping_openmp_threads_stay_quiet(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert runtime.busy_warning(0, load=1.9, cores=2) is None


def test_cli_prints_the_warning_when_busy(monkeypatch, capsys):
    from dplatent import cli
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    cli._warn_if_busy(None)
    assert "load average 5.0 on 2 cores" in capsys.readouterr().err
