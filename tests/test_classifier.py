"""Downstream classifier protocol on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import quadrant_images
from dplatent.data import LabelledImages
from dplatent.errors import ConfigError, DataError
from dplatent.eval import classifier
from dplatent.eval.classifier import ClassifierConfig

SIZE = 12
CLASSES = 4


def separable(n: int, seed: int, name: str) -> LabelledImages:
    """Class c lights up quadrant c of a noisy 12x12 image."""
    x, y = quadrant_images(n, seed, SIZE, CLASSES)
    return LabelledImages(x=x, y=y, num_classes=CLASSES, name=name)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 64), (1, 12)])
def test_models_accept_grey_and_rgb_inputs(channels, size):
    for kind in classifier.KINDS:
        model = classifier.make_model(kind, channels, size, 10)
        assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_cnn_has_the_literature_layout():
    model = classifier.make_model("cnn", 1, 28, 10)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    dense = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dropout = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert convs == [32, 64, 128] and dense == [128, 10] and dropout == [0.5]
    mlp = [m.out_features for m in classifier.make_model("mlp", 1, 28, 10).modules()
           if isinstance(m, torch.nn.Linear)]
    assert mlp == [100, 10]


def test_unknown_kind_and_bad_config_are_config_errors():
    with pytest.raises(ConfigError):
        classifier.make_model("svm", 1, 28, 10)
    with pytest.raises(ConfigError):
        ClassifierConfig(val_fraction=1.0)
    with pytest.raises(ConfigError):
        ClassifierConfig(epochs=0)


def test_split_indices_are_disjoint_and_cover():
    tr, va = classifier.split_indices(100, 0.1, np.random.default_rng(0))
    assert len(va) == 10 and len(tr) == 90
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(100))
    tr, va = classifier.split_indices(2, 0.1, np.random.default_rng(0))
    assert len(tr) == len(va) == 1


@pytest.mark.parametrize("kind,epochs", [("logreg", 5), ("mlp", 5), ("cnn", 3)])
def test_separable_data_is_learned(kind, epochs):
    train, test = separable(600, 0, "synthetic"), separable(200, 1, "real test")
    config = ClassifierConfig(epochs=epochs, batch_size=32, seeds=2, threads=1)
    result = classifier.downstream_accuracy(kind, train, test, config)
    assert result.accuracy > 0.9, result
    assert len(result.per_seed) == 2 and result.std >= 0
    assert all(1 <= e <= epochs for e in result.best_epoch)


def test_unlearnable_labels_stay_near_chance():
    train, test = separable(600, 0, "synthetic"), separable(400, 1, "real test")
    shuffled = LabelledImages(train.x, np.random.default_rng(5).permutation(train.y),
                              CLASSES, "shuffled")
    config = ClassifierConfig(epochs=3, batch_size=32, seeds=1, threads=1)
    assert classifier.downstream_accuracy("logreg", shuffled, test, config).accuracy < 0.5


def test_real_test_set_is_used_once_per_seed_and_only_after_selection(monkeypatch):
    """Validation calls see the synthetic held-out part; the test set is seen once per seed,
    and the epoch kept is the one the synthetic validation scores chose."""
    train, test = separable(200, 0, "synthetic"), separable(37, 1, "real test")
    val_scores = iter([0.2, 0.9, 0.5, 0.1, 0.3, 0.7])  # seed 0: epoch 2 best; seed 1: epoch 3
    calls = []
    real_accuracy = classifier.accuracy

    def spy(model, x, y, batch_size=1024):
        calls.append(len(y))
        if len(y) == len(test):
            return real_accuracy(model, x, y)
        return next(val_scores)

    monkeypatch.setattr(classifier, "accuracy", spy)
    config = ClassifierConfig(epochs=3, batch_size=32, seeds=2, val_fraction=0.1, threads=1)
    result = classifier.downstream_accuracy("logreg", train, test, config)
    assert calls == [20, 20, 20, 37, 20, 20, 20, 37]
    assert result.best_epoch == [2, 3] and result.val_accuracy == [0.9, 0.7]


def test_selected_model_is_the_best_validation_epoch(monkeypatch):
    """The returned weights are those saved at the best validation epoch, not the last."""
    train = separable(100, 0, "synthetic")
    x, y = classifier.to_tensors(train)
    scores = iter([0.9, 0.1, 0.1])
    snapshots = []

    def spy(model, x_, y_, batch_size=1024):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(classifier, "accuracy", spy)
    model = classifier.make_model("logreg", 1, SIZE, CLASSES)
    config = ClassifierConfig(epochs=3, batch_size=16, seeds=1)
    model, best, epoch = classifier.train_select(model, (x[:90], y[:90]), (x[90:], y[90:]),
                                                 config, seed=0)
    assert epoch == 1 and best == 0.9
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[0][key])
        assert not torch.equal(value, snapshots[2][key])


def test_incompatible_sets_are_rejected():
    train = separable(50, 0, "synthetic")
    other_shape = LabelledImages(np.zeros((5, 16, 16), np.uint8), np.zeros(5, np.int64), CLASSES,
                                 "real")
    other_classes = LabelledImages(train.x, train.y, CLASSES + 1, "real")
    config = ClassifierConfig(epochs=1, seeds=1)
    with pytest.raises(DataError, match="shape"):
        classifier.downstream_accuracy("logreg", train, other_shape, config)
    with pytest.raises(DataError, match="classes"):
        classifier.downstream_accuracy("logreg", train, other_classes, config)


def test_single_seed_has_zero_std():
    train, test = separable(100, 0, "synthetic"), separable(50, 1, "real test")
    result = classifier.downstream_accuracy("logreg", train, test,
                                            ClassifierConfig(epochs=1, seeds=1, threads=1))
    assert result.std == 0.0 and result.per_seed == [result.accuracy]


def test_first_seed_adds_the_same_seeds_a_longer_run_has():
    """Seeds 2..3 run on their own equal seeds 2..3 of a run over 0..3 (records can grow)."""
    train, test = separable(120, 0, "synthetic"), separable(60, 1, "real test")
    train = LabelledImages(train.x, np.random.default_rng(5).integers(0, CLASSES, 120),
                           CLASSES, "random labels")  # per-seed accuracies differ
    base = dict(epochs=2, batch_size=16, threads=1)
    full = classifier.downstream_accuracy("mlp", train, test, ClassifierConfig(seeds=4, **base))
    tail = classifier.downstream_accuracy("mlp", train, test,
                                          ClassifierConfig(seeds=2, first_seed=2, **base))
    assert len(set(full.per_seed)) > 1
    assert tail.per_seed == full.per_seed[2:] and tail.best_epoch == full.best_epoch[2:]
    with pytest.raises(ConfigError, match="first classifier seed"):
        ClassifierConfig(first_seed=-1)


def test_predict_batches_in_eval_mode_and_accuracy_counts_matches():
    """Predictions in batches equal the argmax of one pass with dropout off; a batch size that
    does not divide N keeps every row; accuracy is the share of matching labels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.9))
    x = torch.randn(11, 5)
    model.train()
    pred = classifier.predict(model, x, batch_size=4)
    assert not model.training
    assert torch.equal(pred, model[0](x).argmax(dim=1))
    y = pred.clone()
    y[:3] = (y[:3] + 1) % 3
    # exact: counted, not a float32 mean
    assert classifier.accuracy(model, x, y, batch_size=4) == 8 / 11
