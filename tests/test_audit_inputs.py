"""Audit inputs that cannot be audited get one clear DataError."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bar_images, train_smoke

from dplatent.audit import audit
from dplatent.errors import DataError


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit-inputs")
    np.savez(folder / "toy.npz", **dict(zip("xy", bar_images(200, 0))))
    np.savez(folder / "toy-test.npz", **dict(zip("xy", bar_images(60, 1))))
    train_smoke(folder / "toy.npz", folder / "run")
    return folder


def test_a_changed_training_split_is_refused(toy_run):
    npz = toy_run / "toy.npz"
    original = npz.read_bytes()
    try:
        np.savez(npz, **dict(zip("xy", bar_images(150, 0))))
        with pytest.raises(DataError) as info:
            audit(toy_run / "run", None, n_members=20, n_nonmembers=20, num_synthetic=10)
        assert str(info.value) == (f"{npz}: the training split has 150 records but the run "
                                   "was trained on 200; not the same data")
    finally:
        npz.write_bytes(original)


@pytest.mark.parametrize("inserted", [True, False])
def test_a_canary_file_without_both_groups_is_refused(inserted, toy_run, tmp_path):
    path = tmp_path / "c-canaries.npz"
    np.savez(path, x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64),
             member=np.full(4, inserted))
    with pytest.raises(DataError, match=f"{path}: needs both inserted and held-out canaries"):
        audit(toy_run / "run", None, n_members=20, n_nonmembers=20, num_synthetic=10,
              canaries=path, out=tmp_path / "a.json")
    assert not (tmp_path / "a.json").exists()
