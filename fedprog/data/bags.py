"""WSI patch-feature bags: locate ``features/<slide_id>.pt|.h5`` files and read them one case at a time."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from fedprog.data.errors import BagError

log = logging.getLogger(__name__)

BAG_SUFFIXES = (".pt", ".h5")
H5_DATASET = "features"  # CLAM's dataset name inside an .h5 bag
# Slide file extensions stripped from a slide_id before looking for its bag (TCGA slides.csv lists ``*.svs``).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn")


def bag_candidates(features_dir: Path, stem: str) -> list[Path]:
    """Return the files that may hold the bag of ``stem`` (a slide id or a case id), in preference order."""
    stems = [stem]
    for ext in SLIDE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stems.append(stem[: -len(ext)])
    return [features_dir / f"{s}{suffix}" for s in stems for suffix in BAG_SUFFIXES]


def find_bag(features_dir: Path, stem: str) -> Path | None:
    """Return the existing bag file of ``stem``, or None."""
    for candidate in bag_candidates(features_dir, stem):
        if candidate.is_file():
            return candidate
    return None


def read_bag(path: Path, *, case_id: str = "?", cohort: str = "?") -> torch.Tensor:
    """Read one bag file.

    Parameters
    ----------
    path : Path
        ``.pt`` (a float tensor, or a dict with key ``features``) or CLAM ``.h5`` (dataset ``features``).
    case_id, cohort : str
        Named in error messages.

    Returns
    -------
    torch.Tensor
        float32, shape = (n_patches, dim).
    """
    where = f"bag file {path} (case {case_id}, cohort {cohort})"
    try:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as handle:
                if H5_DATASET not in handle:
                    raise BagError(f"{where}: no dataset {H5_DATASET!r} (found {sorted(handle.keys())})")
                array = np.asarray(handle[H5_DATASET][()])
            bag = torch.from_numpy(array)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and H5_DATASET in obj:
                obj = obj[H5_DATASET]
            if not isinstance(obj, torch.Tensor):
                raise BagError(f"{where}: expected a tensor [n_patches, dim], got {type(obj).__name__}")
            bag = obj
    except BagError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise BagError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from exc
    if bag.ndim == 3 and bag.shape[0] == 1:  # CLAM sometimes stores [1, n, dim]
        bag = bag[0]
    if bag.ndim != 2:
        raise BagError(f"{where}: expected shape [n_patches, dim], got {list(bag.shape)}")
    if bag.shape[0] == 0:
        raise BagError(f"{where}: empty bag (0 patches)")
    bag = bag.to(torch.float32)
    # A finite sum proves every value finite (NaN/inf propagate) at a fraction of an element-wise check;
    # only when the sum overflows or is NaN is the element-wise check needed.
    if not torch.isfinite(bag.sum()) and not torch.isfinite(bag).all():
        raise BagError(f"{where}: contains NaN or infinite values")
    return bag


def bag_shape(path: Path, *, case_id: str = "?", cohort: str = "?") -> tuple[int, int]:
    """Return (n_patches, dim) of a bag; cheap for ``.h5`` (header only), a full read for ``.pt``."""
    if path.suffix == ".h5":
        try:
            with h5py.File(path, "r") as handle:
                if H5_DATASET in handle and handle[H5_DATASET].ndim == 2:
                    n, dim = handle[H5_DATASET].shape
                    if n == 0:
                        raise BagError(
                            f"bag file {path} (case {case_id}, cohort {cohort}): empty bag (0 patches)"
                        )
                    return int(n), int(dim)
        except OSError as exc:
            raise BagError(f"bag file {path} (case {case_id}, cohort {cohort}): unreadable ({exc})") from exc
    bag = read_bag(path, case_id=case_id, cohort=cohort)
    return int(bag.shape[0]), int(bag.shape[1])


def read_case_bags(
    paths: Sequence[Path], *, case_id: str, cohort: str, dim: int | None = None, min_patches: int = 1
) -> torch.Tensor:
    """Read and concatenate the bags of one case's slides.

    Parameters
    ----------
    paths : sequence of Path
        The case's bag files (one per slide).
    dim : int or None
        Expected feature dimension (None: take the first bag's).
    min_patches : int
        A bag with fewer patches is an error.

    Returns
    -------
    torch.Tensor
        float32, shape = (sum of n_patches over slides, dim).
    """
    if not paths:
        raise BagError(f"case {case_id} (cohort {cohort}) has no bag file")
    bags = []
    for path in paths:
        bag = read_bag(path, case_id=case_id, cohort=cohort)
        if dim is None:
            dim = int(bag.shape[1])
        if bag.shape[1] != dim:
            raise BagError(
                f"bag file {path} (case {case_id}, cohort {cohort}): feature dimension {bag.shape[1]} "
                f"differs "
                f"from the dataset's {dim}"
            )
        if bag.shape[0] < min_patches:
            raise BagError(
                f"bag file {path} (case {case_id}, cohort {cohort}): {bag.shape[0]} patches < min_patches "
                f"{min_patches}"
            )
        bags.append(bag)
    return torch.cat(bags, dim=0)
