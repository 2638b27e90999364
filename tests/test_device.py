"""--device: auto is a GPU only when torch sees one; cuda without one is one clear error."""

from __future__ import annotations

import pytest
import torch

from dplatent import config, device
from dplatent.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing",
                                        "ignore::DeprecationWarning:diffusers")


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve("auto") == torch.device("cpu")
    assert device.resolve("cpu") == torch.device("cpu")


def test_auto_picks_the_gpu_when_torch_sees_one(monkeypatch):
    # Nothing is allocated: resolving only names the device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert device.resolve("auto") == torch.device("cuda", 0)
    assert device.resolve("cuda") == torch.device("cuda", 0)
    assert device.resolve("cuda:1") == torch.device("cuda", 1)
    # a process given GPU 1 (torch.cuda.set_device, one GPU per training process) stays on it
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert device.resolve("auto") == device.resolve("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"only 2 CUDA GPU\(s\) visible"):
        device.resolve("cuda:2")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_one_clear_error(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        device.resolve(spec)
    message = str(info.value)
    assert "no CUDA GPU is available" in message and "--device cpu" in message
    assert "\n" not in message


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", "", " cpu"])
def test_unknown_device_names_are_refused(spec):
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        device.resolve(spec)


def test_an_explicit_gpu_is_refused_for_several_processes(monkeypatch, tmp_path):
    # each process takes the GPU of its local rank; cuda:N would put them all on one GPU
    for spec in ("auto", "cpu", "cuda", "cuda:1"):
        assert device.check_processes(spec, 1) == spec
    for spec in ("auto", "cpu", "cuda"):
        assert device.check_processes(spec, 2) == spec
    with pytest.raises(ConfigError) as info:
        device.check_processes("cuda:1", 2)
    message = str(info.value)
    assert "--device cuda or --device auto with several processes" in message
    assert "\n" not in message

    # before any process is started or any data is read, for --nproc and for torchrun
    from dplatent.train import distributed
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    cfg = config.resolve("smoke", {"device": "cuda:0"})
    kwargs = dict(dataset="no-such-data", data_dir=None, cfg=cfg, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="use --device cuda or --device auto"):
        distributed.train(2, **kwargs)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="use --device cuda or --device auto"):
        distributed.train(None, **kwargs)
    # in a process group already formed (stages.train called directly)
    from dplatent.train import stages
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="use --device cuda or --device auto"):
        stages.train(**kwargs)


def test_the_device_is_part_of_the_run_configuration():
    assert config.resolve("smoke", {}).device == "auto"
    cfg = config.resolve("smoke", {"device": "cpu"})
    assert cfg.device == "cpu"
    assert config.from_dict(cfg.to_dict()).device == "cpu"
    with pytest.raises(ConfigError, match="device must be"):
        config.resolve("smoke", {"device": "tpu"})
    # configurations saved before the option existed load with the default
    old = cfg.to_dict()
    del old["device"]
    assert config.from_dict(old).device == "auto"


# ----------------------------------------------------------------- through the command line

@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    import numpy as np
    from conftest import synthetic_images
    x, y = synthetic_images(300, num_classes=3, seed=4)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=x, y=y)
    np.savez(path.with_name("small-test.npz"), x=x[:60], y=y[:60])
    return path


def _train(run, dataset, *extra):
    from test_pipeline import cli
    return cli("train", "--out", run, "--dataset", dataset, "--preset", "smoke",
               "--epsilon", "2", "--delta", "1e-3", "--set", "privacy.accountant=rdp",
               "--seed", "1", "--threads", "1", "--no-progress", "--no-grid", *extra)


def test_train_with_cuda_but_no_gpu_fails_in_one_line_and_writes_nothing(tmp_path, small_npz,
                                                                          monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = _train(tmp_path / "run", small_npz, "--device", "cuda")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device 'cuda': no CUDA GPU")
    assert not (tmp_path / "run").exists()


def test_auto_trains_and_samples_on_the_cpu_and_records_it(tmp_path, small_npz, monkeypatch):
    import json

    import numpy as np
    from test_pipeline import cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        code, _, err = _train(run, small_npz)  # the preset's device: auto
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["device"] == "auto" and saved["derived"]["device"] == "cpu"
    code, _, err = cli("sample", "--run", run, "--num", 6, "--out", tmp_path / "a.npz",
                       "--no-progress", "--device", "cpu")
    assert code == 0, err
    code, _, err = cli("sample", "--run", run, "--num", 6, "--out", tmp_path / "b.npz",
                       "--no-progress")
    assert code == 0, err
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["x"], b["x"])  # auto is the cpu here: the very same samples
    code, _, err = cli("sample", "--run", run, "--num", 6, "--no-progress", "--device", "cuda")
    assert code == 2 and "no CUDA GPU is available" in err
    code, _, err = cli("audit", "--run", run, "--members", 20, "--nonmembers", 20,
                       "--threads", 1, "--device", "cuda")
    assert code == 2 and "no CUDA GPU is available" in err and not (run / "audit.json").exists()
    code, _, err = cli("audit", "--run", run, "--members", 20, "--nonmembers", 20,
                       "--threads", 1, "--device", "cpu")
    assert code == 0, err
    audit = json.loads((run / "audit.json").read_text())
    assert audit["members"]["count"] == 20 and set(audit["attacks"]) == {
        "denoiser_loss", "reconstruction_loss", "nearest_synthetic"}
    # checkpoints hold per-device generator states: resuming on another kind is refused
    saved["derived"]["device"] = "cuda:0"
    (run / "config.json").write_text(json.dumps(saved))
    code, _, err = cli("train", "--out", run, "--resume", "--no-grid", "--no-progress",
                       "--device", "cpu")
    assert code == 2 and "was trained on cuda:0" in err and "--device cuda" in err
