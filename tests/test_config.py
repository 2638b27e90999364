"""Configuration: presets, overrides, validation, and the saved form's round trip."""

from __future__ import annotations

import dataclasses
import json
import tomllib

import pytest

from dplatent import config
from dplatent.config import (RunConfig, build, from_dict, load_preset, parse_overrides,
                             preset_names, resolve)
from dplatent.errors import ConfigError
from dplatent.models.autoencoder import latent_shape


def test_every_preset_loads_and_validates():
    names = preset_names()
    assert {"smoke", "quick"} <= set(names)
    for name in names:
        cfg = resolve(name, {})
        assert isinstance(cfg, RunConfig) and cfg.preset == name


def test_smoke_preset_values_come_from_its_file():
    raw = tomllib.loads((config.PRESET_DIRS[0] / "smoke.toml").read_text())
    cfg = resolve("smoke", {})
    assert cfg.checkpoint_every == raw["checkpoint_every"]
    assert cfg.autoencoder.channels == tuple(raw["autoencoder"]["channels"])
    assert cfg.diffusion.noise_multiplicity == raw["diffusion"]["noise_multiplicity"]
    assert cfg.sampling.steps == raw["sampling"]["steps"]
    # keys the preset does not set keep their defaults
    assert cfg.privacy == config.PrivacyConfig()
    assert cfg.diffusion.lr == config.DiffusionConfig().lr


def test_fidelity_is_full_with_a_finer_latent_a_deeper_decoder_and_a_conv_stage_2():
    # configs/fidelity.toml documents itself as `full` changed in these keys only; a change to
    # `full` that is not carried over (or a stray one in fidelity) breaks that description.
    cfg = resolve("fidelity", {})
    full, fidelity = resolve("full", {}).to_dict(), cfg.to_dict()
    changed = {f"{section}.{key}" for section, values in full.items() if isinstance(values, dict)
               for key, value in values.items() if fidelity[section][key] != value}
    assert changed == {"autoencoder.channels", "autoencoder.latent_channels",
                       "autoencoder.decoder_blocks",
                       "diffusion.architecture", "diffusion.hidden", "diffusion.blocks",
                       "diffusion.epochs", "diffusion.noise_multiplicity",
                       "sampling.temperature", "sampling.sharpness", "sampling.eta"}
    ae = cfg.autoencoder
    assert latent_shape(28, ae.channels, ae.latent_channels) == (1, 14, 14)


def test_a_preset_can_be_a_toml_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("seed = 7\n[privacy]\nepsilon = 3\naccountant = 'rdp'\n")
    cfg = resolve(str(path), {})
    assert (cfg.preset, cfg.seed, cfg.privacy.epsilon, cfg.privacy.accountant) == (
        "mine", 7, 3.0, "rdp")
    assert isinstance(cfg.privacy.epsilon, float)


def test_overrides_apply_and_are_coerced():
    cfg = resolve("smoke", parse_overrides([
        "diffusion.hidden=64", "autoencoder.channels=16,32", "privacy.epsilon=2.5",
        "seed=3", "diffusion.epochs=1", " sampling.sampler = dpm "]))
    assert cfg.diffusion.hidden == 64 and cfg.autoencoder.channels == (16, 32)
    assert cfg.privacy.epsilon == 2.5 and cfg.seed == 3 and cfg.sampling.sampler == "dpm"
    assert cfg.diffusion.epochs == 1.0 and isinstance(cfg.diffusion.epochs, float)
    # untouched values of the preset survive
    assert cfg.diffusion.blocks == resolve("smoke", {}).diffusion.blocks
    # numeric override values (as the CLI passes them) work too
    assert resolve("smoke", {"privacy.delta": 1e-6, "threads": 2}).privacy.delta == 1e-6


@pytest.mark.parametrize("overrides,message", [
    ({"diffusion.hiden": "3"}, "unknown key 'hiden'"),
    ({"diffusoin.hidden": "3"}, "unknown section 'diffusoin'"),
    ({"nonsense": "1"}, "unknown key 'nonsense'"),
    ({"autoencoder": "1"}, "unknown key 'autoencoder'"),
    ({"autoencoder.batch_size": "many"}, "bad value 'many' for batch_size"),
    ({"autoencoder.batch_size": "1.5"}, "expected an integer"),
    ({"autoencoder.channels": "8,x"}, "bad value '8,x' for channels"),
    ({"autoencoder.channels": "12,16"}, "multiple of 8"),
    ({"privacy.epsilon": "0"}, "privacy.epsilon must be > 0"),
    ({"privacy.epsilon": "nan"}, "privacy.epsilon must be > 0"),
    ({"privacy.delta": "1"}, "privacy.delta must be in"),
    ({"privacy.accountant": "moments"}, "privacy.accountant must be"),
    ({"privacy.autoencoder_share": "1"}, "autoencoder_share"),
    ({"diffusion.label_dropout": "1"}, "label_dropout"),
    ({"autoencoder.upsample": "bilinear"},
     "autoencoder.upsample: must be 'nearest' or 'shuffle', got 'bilinear'"),
    ({"diffusion.gaussian_covariance": "exact"},
     "diffusion.gaussian_covariance: must be 'psd' or 'denoised' or 'pooled_bulk', got 'exact'"),
    ({"diffusion.prediction": "x0"}, "diffusion.prediction: must be 'v' or 'epsilon', got 'x0'"),
    ({"diffusion.architecture": "unet"},
     "diffusion.architecture: must be 'mlp' or 'conv', got 'unet'"),
    ({"diffusion.architecture": "conv", "diffusion.hidden": "36"},
     "diffusion.hidden must be a multiple of 8 with architecture 'conv'.*got 36"),
    ({"diffusion.coarse_blocks": "1"},
     "diffusion.coarse_blocks needs architecture 'conv'"),
    ({"diffusion.architecture": "conv", "diffusion.coarse_blocks": "-1"},
     "diffusion.coarse_blocks must be >= 0"),
    ({"autoencoder.decoder_blocks": "-1"}, "decoder_blocks must be >= 0"),
    ({"autoencoder.latent_noise": "-0.1"},
     r"autoencoder.latent_noise must be >= 0 and finite, got -0.1"),
    ({"autoencoder.latent_noise": "inf"}, r"latent_noise must be >= 0 and finite, got inf"),
    ({"autoencoder.ema_decay": "1"}, r"autoencoder.ema_decay must be in \[0, 1\), got 1"),
    ({"autoencoder.ema_decay": "-0.5"}, r"autoencoder.ema_decay must be in \[0, 1\), got -0.5"),
    ({"diffusion.beta_schedule": "cosine"}, "beta_schedule"),
    ({"diffusion.noise_multiplicity": "0"}, "noise_multiplicity"),
    ({"sampling.sampler": "euler"}, "sampler"),
    ({"sampling.guidance": "inf"}, r"sampling.guidance must be >= 0 and finite, got inf"),
    ({"sampling.steps": "0"}, r"sampling.steps must be >= 1, got 0"),
    ({"sampling.temperature": "3.5"}, r"sampling.temperature must be in \(0, 3\], got 3.5"),
    ({"sampling.reencode": "11"}, r"sampling.reencode must be in \[0, 10\], got 11"),
    ({"sampling.eta": "1.5"}, r"sampling.eta must be in \[0, 1\], got 1.5"),
    ({"sampling.eta": "1", "sampling.sampler": "dpm"},
     r"sampling.eta 1.0 needs sampler 'ddim' \(got 'dpm'\)"),
    ({"threads": "-1"}, "threads"),
])
def test_bad_overrides_are_config_errors_naming_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve("smoke", overrides)


@pytest.mark.parametrize("text,message", [
    ("[autoencoder]\nwidth = 3\n", r"preset bad \[autoencoder\]: unknown key 'width'"),
    ("[training]\nepochs = 3\n", "unknown key 'training'"),
    ("autoencoder = 3\n", r"\[autoencoder\] must be a table"),
    ("[diffusion]\nhidden = 'wide'\n", "bad value 'wide' for hidden"),
    ("[privacy]\nepsilon = -1\n", "privacy.epsilon must be > 0"),
    ("[privacy\nepsilon = 1\n", "bad.toml"),
])
def test_bad_preset_files_are_config_errors_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(str(path), {})


def test_unknown_preset_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'fastest'.*smoke"):
        load_preset("fastest")
    with pytest.raises(ConfigError, match="not found"):
        load_preset(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize("item", ["diffusion.hidden", "=3", ""])
def test_malformed_set_items_are_refused(item):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides([item])


def test_to_dict_from_dict_round_trip_through_json():
    cfg = resolve("smoke", {"autoencoder.channels": "16,24", "seed": "5",
                            "privacy.accountant": "rdp", "sampling.guidance": "2"})
    saved = json.loads(json.dumps(cfg.to_dict()))
    back = from_dict(saved)
    assert back == cfg
    assert back.autoencoder.channels == (16, 24)
    assert from_dict(back.to_dict()) == cfg
    # every field is saved
    assert set(saved) == {f.name for f in dataclasses.fields(RunConfig)}


def test_from_dict_refuses_unknown_saved_keys():
    d = resolve("smoke", {}).to_dict()
    d["diffusion"]["dropout_rate"] = 0.2
    with pytest.raises(ConfigError, match="dropout_rate"):
        from_dict(d)


def test_read_saved_gives_the_settings_and_the_derived_section_of_a_run(tmp_path):
    cfg = resolve("smoke", {"seed": "7"})
    assert config.read_saved(tmp_path) is None  # no config.json: not a run (yet)
    derived = {"dataset": "mnist", "num_classes": 10}
    (tmp_path / config.CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "derived": derived}))
    saved = config.read_saved(tmp_path)
    assert saved.settings() == cfg and saved.derived == derived
    assert saved.raw["derived"] == derived and saved.path == tmp_path / "config.json"


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"seed": 0}', "no 'derived' section"),
    ('{"seed": 0, "derived": [1]}', "no 'derived' section"),
])
def test_read_saved_refuses_what_training_did_not_write(tmp_path, text, message):
    (tmp_path / config.CONFIG_FILE).write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        config.read_saved(tmp_path)
    assert "not a configuration that `dplatent train` wrote" in str(info.value)
    assert "\n" not in str(info.value)


def test_config_objects_are_frozen_and_keyword_only():
    cfg = resolve("smoke", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.PrivacyConfig(1.0)  # type: ignore[misc]
    with pytest.raises(ConfigError):
        build({}, {"privacy.delta": "0"}, "x")
