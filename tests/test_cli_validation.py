"""Bad command-line values, data and checkpoints get one clear line and exit code 2, never a
traceback; checkpoints holding pickled objects are refused without running their code."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, run_main, train_smoke

from dplatent import config
from dplatent.errors import ConfigError, DplatentError
from dplatent.train.loop import checkpoint_path, load_checkpoint

FAST = ["--preset", "smoke", "--set", "privacy.accountant=rdp"]


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    line = one_line_error(code, err)
    assert fragment in line, f"{fragment!r} not in {line!r}"


def write_npz(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 10).astype(np.int64)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return path


BAD_PLAN = [
    (["--epsilon", "0", "--n", "1000"], "privacy.epsilon must be > 0 and finite, got 0.0"),
    (["--epsilon", "-1", "--n", "1000"], "privacy.epsilon must be > 0 and finite, got -1.0"),
    (["--epsilon", "nan", "--n", "1000"], "privacy.epsilon must be > 0 and finite, got nan"),
    (["--epsilon", "inf", "--n", "1000"], "privacy.epsilon must be > 0 and finite, got inf"),
    (["--delta", "0", "--n", "1000"], "privacy.delta must be in (0, 1), got 0.0"),
    (["--delta", "-1e-5", "--n", "1000"], "privacy.delta must be in (0, 1), got -1e-05"),
    (["--delta", "1", "--n", "1000"], "privacy.delta must be in (0, 1), got 1.0"),
    (["--delta", "1e-3", "--n", "1000"],
     "delta=0.001 must be below 1/n = 0.001 (n = 1000 training records)"),
    (["--delta", "0.01", "--n", "1000"], "must be below 1/n"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--n", "-5"], "--n must be >= 1, got -5"),
    (["--n", "1000", "--classes", "1"], "--classes must be >= 2, got 1"),
    (["--n", "50", "--delta", "1e-3"], "autoencoder: batch size 64 exceeds n = 50"),
    (["--dataset", "data.npz"], "plan needs the number of training records for a user data "
                                "set: pass --n"),
    (["--n", "1000", "--set", "autoencoder.nope=1"],
     "--set autoencoder.nope: unknown key 'nope'; known: ['batch_size', 'channels'"),
    (["--n", "1000", "--set", "nope.key=1"], "--set nope.key: unknown section 'nope'"),
    (["--n", "1000", "--set", "bogus=1"], "--set bogus: unknown key 'bogus'"),
    (["--n", "1000", "--set", "noequals"], "--set expects section.key=value, got 'noequals'"),
    (["--n", "1000", "--set", "=3"], "--set expects section.key=value, got '=3'"),
    (["--n", "1000", "--set", "diffusion.epochs=abc"],
     "--set diffusion.epochs: bad value 'abc' for epochs"),
    (["--n", "1000", "--set", "diffusion.blocks=1.5"],
     "--set diffusion.blocks: bad value '1.5' for blocks (expected an integer)"),
    (["--n", "1000", "--set", "autoencoder.channels=8,x"],
     "--set autoencoder.channels: bad value '8,x'"),
    (["--n", "1000", "--set", "privacy.accountant=foo"],
     "privacy.accountant must be 'prv' or 'rdp', got 'foo'"),
    (["--n", "1000", "--set", "diffusion.epochs=0"], "diffusion.epochs must be > 0"),
    (["--n", "1000", "--set", "autoencoder.batch_size=-4"],
     "autoencoder batch sizes must be > 0"),
    (["--n", "1000", "--set", "threads=-1"], "threads must be >= 0"),
]


@pytest.mark.parametrize("argv,fragment", BAD_PLAN, ids=[" ".join(a) for a, _ in BAD_PLAN])
def test_plan_refuses_bad_values(argv, fragment, monkeypatch, capsys):
    code, _, err = run_main(["plan", *FAST, *argv], monkeypatch, capsys)
    assert_one_line_error(code, err, fragment)


def test_unknown_preset(monkeypatch, capsys):
    code, _, err = run_main(["plan", "--preset", "nope", "--n", "1000"], monkeypatch, capsys)
    assert_one_line_error(code, err, "unknown preset 'nope'; known: [")


def test_malformed_number_is_a_usage_error(monkeypatch, capsys):
    code, _, err = run_main(["plan", "--epsilon", "abc"], monkeypatch, capsys)
    assert code == 2 and "Invalid value for '--epsilon'" in err and "Traceback" not in err


def test_valid_plan_still_works(monkeypatch, capsys):
    code, out, err = run_main(["plan", *FAST, "--n", "1000", "--delta", "1e-4"],
                              monkeypatch, capsys)
    assert code == 0, err
    assert "composed epsilon" in out


def test_installed_entry_point_exit_code_and_message():
    res = subprocess.run([sys.executable, "-m", "dplatent", "plan", "--epsilon", "0",
                          "--n", "1000"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr == "error: privacy.epsilon must be > 0 and finite, got 0.0\n"
    assert res.stdout == ""


# --- train: data and run-directory problems, refused before any training -----------------

def test_train_refuses_too_few_examples_for_the_batch(tmp_path, monkeypatch, capsys):
    npz = write_npz(tmp_path / "small.npz", 50)
    out = tmp_path / "run"
    code, _, err = run_main(["train", *FAST, "--dataset", str(npz), "--delta", "1e-3",
                             "--out", str(out)], monkeypatch, capsys)
    assert_one_line_error(code, err, "autoencoder: batch size 64 exceeds n = 50")
    assert not out.exists()


def test_train_refuses_delta_at_least_one_over_n(tmp_path, monkeypatch, capsys):
    npz = write_npz(tmp_path / "d.npz", 200)
    out = tmp_path / "run"
    code, _, err = run_main(["train", *FAST, "--dataset", str(npz), "--delta", "0.005",
                             "--out", str(out)], monkeypatch, capsys)
    assert_one_line_error(code, err, "delta=0.005 must be below 1/n = 0.005 (n = 200")
    assert not out.exists()


@pytest.mark.parametrize("dataset,fragment", [
    ("cifar10", "unknown data set 'cifar10'; choose from ('mnist', 'fashion-mnist')"),
    ("missing.npz", "missing.npz: file not found"),
    ("data.txt", "unknown data set"),
])
def test_train_refuses_unknown_or_missing_data(dataset, fragment, tmp_path, monkeypatch,
                                               capsys):
    if dataset.endswith(".npz"):
        dataset = str(tmp_path / dataset)
    code, _, err = run_main(["train", *FAST, "--dataset", dataset, "--out",
                             str(tmp_path / "run")], monkeypatch, capsys)
    assert_one_line_error(code, err, fragment)


def test_train_refuses_non_empty_out_and_bad_resume(tmp_path, monkeypatch, capsys):
    npz = write_npz(tmp_path / "d.npz", 200)
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    code, _, err = run_main(["train", *FAST, "--dataset", str(npz), "--delta", "1e-3",
                             "--out", str(out)], monkeypatch, capsys)
    assert_one_line_error(code, err, "exists and is not empty; use --resume")
    code, _, err = run_main(["train", "--resume", "--out", str(tmp_path / "none")],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, "nothing to resume (no config.json)")
    for text in ('{"seed": 0}', '{"derived": {}}', "[1, 2]", "{not json"):
        (out / "config.json").write_text(text)
        code, _, err = run_main(["train", "--resume", "--out", str(out)], monkeypatch, capsys)
        assert_one_line_error(code, err, "not a configuration that `dplatent train` wrote")
    (out / "config.json").write_text('{"derived": {"dataset": "x"}}')
    code, _, err = run_main(["train", "--resume", "--out", str(out), "--set", "seed=3"],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, "--resume continues a run with its saved configuration")


# --- sample and checkpoints ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished smoke run (one DP step per stage) trained in this process."""
    folder = tmp_path_factory.mktemp("cli")
    return train_smoke(write_npz(folder / "d.npz", 200), folder / "run")


@pytest.mark.parametrize("num", ["0", "-3"])
def test_sample_refuses_non_positive_counts(num, tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", num, "--out", str(out),
                             "--no-progress"], monkeypatch, capsys)
    assert_one_line_error(code, err, f"number of samples must be >= 1, got {num}")
    assert not out.exists()


def test_sample_warns_when_other_jobs_keep_the_cpu_busy(tiny_run, tmp_path, monkeypatch, capsys):
    # Sampling beside a training that used every core ran 3-8 times slower, the training 33.
    from dplatent import runtime
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(runtime, "busy_cores", lambda: 1.5)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    out = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "4", "--out", str(out),
                             "--no-progress"], monkeypatch, capsys)
    assert code == 0 and out.exists()
    assert "warning: other jobs keep the CPU busy (1.5 of 2 cores)" in err
    before = torch.get_num_threads()
    try:  # the remedy the warning names: fewer threads than cores, and no warning
        code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "4", "--out",
                                 str(out), "--no-progress", "--threads", "1"], monkeypatch, capsys)
        assert code == 0 and torch.get_num_threads() == 1 and "warning" not in err
    finally:
        torch.set_num_threads(before)


def test_sample_refuses_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(["sample", "--run", str(tmp_path), "--num", "10"],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, "not a run directory (no config.json)")


def _write_marker(path: str) -> None:
    Path(path).write_text("code from a checkpoint ran")


class Payload:
    """Unpickling this would call _write_marker: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "model": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(DplatentError, match="cannot load checkpoint safely"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_that_is_not_a_torch_file_is_refused(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(DplatentError, match="cannot load checkpoint safely"):
        load_checkpoint(path)


def test_tampered_run_checkpoint_is_refused_by_sample(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "marker"
    ck = checkpoint_path(run, "diffusion")
    state = load_checkpoint(ck)
    state["ema"] = {"payload": Payload(marker)}
    torch.save(state, ck)
    code, _, err = run_main(["sample", "--run", str(run), "--num", "10", "--out",
                             str(tmp_path / "s.npz"), "--no-progress"], monkeypatch, capsys)
    assert_one_line_error(code, err, "cannot load checkpoint safely")
    assert not marker.exists()
    assert not (tmp_path / "s.npz").exists()


def test_truncated_run_checkpoint_is_refused_by_sample(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ck = checkpoint_path(run, "autoencoder")
    ck.write_bytes(ck.read_bytes()[:200])
    code, _, err = run_main(["sample", "--run", str(run), "--num", "10", "--out",
                             str(tmp_path / "s.npz"), "--no-progress"], monkeypatch, capsys)
    assert_one_line_error(code, err, "cannot load checkpoint safely")


@pytest.mark.parametrize("damage", ["no_model", "wrong_shapes", "not_a_dict", "bad_config"])
def test_mismatched_run_files_are_refused_by_sample(damage, tiny_run, tmp_path, monkeypatch,
                                                    capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ck = checkpoint_path(run, "autoencoder")
    state = load_checkpoint(ck)
    if damage == "no_model":
        torch.save({"step": state["step"]}, ck)
    elif damage == "wrong_shapes":
        torch.save({**state, "model": {k: v[:1] for k, v in state["model"].items()}}, ck)
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], ck)
    else:
        (run / "config.json").write_text('{"derived": {}, "seed": 0}')
    code, _, err = run_main(["sample", "--run", str(run), "--num", "10", "--out",
                             str(tmp_path / "s.npz"), "--no-progress"], monkeypatch, capsys)
    assert_one_line_error(code, err, "config.json and checkpoints do not form a valid run")


def test_sampled_npz_carries_the_runs_epsilon(tiny_run, tmp_path, monkeypatch, capsys):
    import json

    from dplatent.export import npz_info
    code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "10", "--out",
                             str(tmp_path / "s.npz"), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    ledger = json.loads((tiny_run / "privacy.json").read_text())
    info = npz_info(tmp_path / "s.npz")
    assert (info["private"], info["epsilon"], info["delta"]) == \
        (True, ledger["epsilon"], ledger["delta"])
    assert "label" not in info


@pytest.mark.parametrize("option,value,bounds",
                         [("sharpness", v, "(0, 10]") for v in ("0", "-1", "11", "nan")]
                         + [("temperature", v, "(0, 3]") for v in ("0", "-0.5", "3.5", "nan")])
def test_sample_refuses_a_setting_outside_its_range(option, value, bounds, tiny_run, tmp_path,
                                                    monkeypatch, capsys):
    out = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "10", "--out", str(out),
                             f"--{option}", value, "--no-progress"], monkeypatch, capsys)
    assert_one_line_error(code, err, f"{option} must be in {bounds}, got {float(value)}")
    assert not out.exists()


def sample_recorded(tiny_run, tmp_path, option: str, value: str, monkeypatch,
                    capsys) -> np.ndarray:
    """The images of `sample --OPTION VALUE` (10 samples); asserts the npz records the value."""
    from dplatent.export import npz_info
    out = tmp_path / f"{option}-{value}.npz"
    code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "10", "--out",
                             str(out), f"--{option}", value, "--no-progress"], monkeypatch,
                            capsys)
    assert code == 0, err
    assert npz_info(out)[option.replace("-", "_")] == float(value)
    with np.load(out) as f:
        return f["x"]


def test_temperature_is_recorded_and_zero_spread_is_refused_in_the_config(tiny_run, tmp_path,
                                                                          monkeypatch, capsys):
    sample_recorded(tiny_run, tmp_path, "temperature", "1.2", monkeypatch, capsys)
    with pytest.raises(ConfigError, match=r"sampling.temperature must be in \(0, 3\]"):
        config.SamplingConfig(temperature=0.0)


def test_sharpness_sharpens_the_same_latents_and_is_recorded(tiny_run, tmp_path, monkeypatch,
                                                             capsys):
    one, three = (sample_recorded(tiny_run, tmp_path, "sharpness", k, monkeypatch, capsys)
                  .astype(np.int64) - 128 for k in ("1", "3"))  # distance from grey, signed
    assert np.all(np.sign(three) * np.sign(one) >= 0)   # no pixel crosses grey
    assert np.all(np.abs(three) >= np.abs(one) - 1)     # none comes nearer to it (rounding)
    assert np.abs(three).mean() > np.abs(one).mean() + 5


def test_decode_noise_moves_each_latent_by_its_own_draw_before_decoding(tiny_run):
    from dplatent.diffusion.sampler import initial_noise
    from dplatent.sample import DECODE_NOISE_STREAM, TrainedRun, generate, settings_for
    run = TrainedRun(tiny_run)
    decoded = []
    original = run.autoencoder.decode
    run.autoencoder.decode = lambda z, k=1.0: (decoded.append(z.flatten(1)), original(z, k))[1]
    generate(run, 7, seed=3, settings=settings_for(run, decode_noise=0.0), progress=False)
    generate(run, 7, seed=3, settings=settings_for(run, decode_noise=0.5), progress=False)
    small = dataclasses.replace(settings_for(run, decode_noise=0.5), batch_size=2)
    generate(run, 7, seed=3, settings=small, progress=False)
    plain, noisy, batched = decoded[0], decoded[1], torch.cat(decoded[2:])
    draws = initial_noise(3, np.arange(7), plain.shape[1], stream=DECODE_NOISE_STREAM)
    torch.testing.assert_close(noisy - plain, 0.5 * draws)
    torch.testing.assert_close(batched, noisy)       # sample i's draw whatever its batch


@pytest.mark.parametrize("option,value,message",
                         [("decode-noise", v, f"decode_noise must be in [0, 3], got {float(v)}")
                          for v in ("-0.1", "3.5", "nan")]
                         + [("reencode", v, f"reencode must be in [0, 10], got {v}")
                            for v in ("-1", "11")])
def test_sample_refuses_decode_noise_or_reencode_outside_its_range(option, value, message,
                                                                   tiny_run, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "10", "--out", str(out),
                             f"--{option}", value, "--no-progress"], monkeypatch, capsys)
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_decode_noise_is_recorded_and_changes_the_images(tiny_run, tmp_path, monkeypatch,
                                                         capsys):
    without, with_ = (sample_recorded(tiny_run, tmp_path, "decode-noise", v, monkeypatch, capsys)
                      for v in ("0", "1"))
    assert not np.array_equal(without, with_)


def test_reencode_passes_each_decoded_image_through_the_autoencoder_again(tiny_run):
    from dplatent.sample import TrainedRun, draw_latents, generate, settings_for
    run = TrainedRun(tiny_run)
    ae, settings = run.autoencoder, settings_for(run, reencode=2, sharpness=1.5)
    x, _ = generate(run, 7, seed=3, settings=settings, progress=False)
    z, _ = draw_latents(run, 7, seed=3, settings=settings, progress=False)
    with torch.no_grad():
        once = ae.decode(z.view(-1, *ae.latent_shape), 1.5)
        twice = ae.decode(ae.encode(ae.decode(ae.encode(once), 1.5)), 1.5)

    def uint8(images: torch.Tensor) -> np.ndarray:
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    np.testing.assert_array_equal(x, uint8(twice))
    plain, _ = generate(run, 7, seed=3, settings=settings_for(run, sharpness=1.5),
                        progress=False)
    np.testing.assert_array_equal(plain, uint8(once))
    assert not np.array_equal(plain, x)


def test_reencode_is_recorded(tiny_run, tmp_path, monkeypatch, capsys):
    sample_recorded(tiny_run, tmp_path, "reencode", "1", monkeypatch, capsys)


def test_eta_is_recorded_and_changes_the_images(tiny_run, tmp_path, monkeypatch, capsys):
    without, with_ = (sample_recorded(tiny_run, tmp_path, "eta", v, monkeypatch, capsys)
                      for v in ("0", "1"))
    assert not np.array_equal(without, with_)
    code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "10", "--out",
                             str(tmp_path / "bad.npz"), "--eta", "2", "--no-progress"],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, "sampling.eta must be in [0, 1], got 2.0")


def test_settings_for_puts_only_the_given_settings_in_the_runs_place(tiny_run):
    from dplatent.sample import TrainedRun, settings_for
    run = TrainedRun(tiny_run)
    assert settings_for(run) == run.cfg.sampling
    s = settings_for(run, temperature=1.7, steps=3)
    assert (s.temperature, s.steps) == (1.7, 3)
    assert dataclasses.replace(s, temperature=run.cfg.sampling.temperature,
                               steps=run.cfg.sampling.steps) == run.cfg.sampling
    with pytest.raises(ConfigError, match="sampling.steps must be >= 1, got 0"):
        settings_for(run, steps=0)
