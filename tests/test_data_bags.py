"""WSI bags: .pt and CLAM .h5 reading, concatenation, and errors naming file and case."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedprog.data import BagError
from fedprog.data.bags import bag_shape, find_bag, read_bag, read_case_bags


def test_read_pt_and_h5(tmp_path: Path) -> None:
    torch.save(torch.ones(4, 3, dtype=torch.float64), tmp_path / "s1.pt")
    with h5py.File(tmp_path / "s2.h5", "w") as f:
        f["features"] = np.zeros((5, 3), dtype=np.float32)
        f["coords"] = np.zeros((5, 2))
    assert find_bag(tmp_path, "s2.svs") == tmp_path / "s2.h5"
    assert bag_shape(tmp_path / "s2.h5") == (5, 3)
    bag = read_case_bags([tmp_path / "s1.pt", tmp_path / "s2.h5"], case_id="c", cohort="k")
    assert bag.shape == (9, 3) and bag.dtype == torch.float32
    assert bag[:4].eq(1).all() and bag[4:].eq(0).all()


def test_dimension_mismatch_names_file_and_case(tmp_path: Path) -> None:
    torch.save(torch.ones(4, 3), tmp_path / "a.pt")
    torch.save(torch.ones(4, 5), tmp_path / "b.pt")
    with pytest.raises(BagError, match=r"b\.pt \(case TCGA-X, cohort k\): feature dimension 5 differs.*3"):
        read_case_bags([tmp_path / "a.pt", tmp_path / "b.pt"], case_id="TCGA-X", cohort="k")


def test_empty_and_unreadable_bags(tmp_path: Path) -> None:
    torch.save(torch.ones(0, 3), tmp_path / "empty.pt")
    with pytest.raises(BagError, match=r"empty\.pt \(case c1, cohort k\): empty bag"):
        read_bag(tmp_path / "empty.pt", case_id="c1", cohort="k")
    (tmp_path / "junk.pt").write_bytes(b"not a tensor")
    with pytest.raises(BagError, match=r"junk\.pt \(case c2, cohort k\): unreadable"):
        read_bag(tmp_path / "junk.pt", case_id="c2", cohort="k")
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(BagError, match=r"nofeat\.h5.*no dataset 'features'"):
        read_bag(tmp_path / "nofeat.h5", case_id="c3", cohort="k")
    torch.save(torch.tensor([1.0, float("nan")]).repeat(2, 1), tmp_path / "nan.pt")
    with pytest.raises(BagError, match=r"nan\.pt.*NaN"):
        read_bag(tmp_path / "nan.pt", case_id="c4", cohort="k")
