"""The torch device a command or a client trains on, the GPU share of a simulated client, and AMP autocast.

``training.device`` is ``auto`` (CUDA when this process can use a GPU, else CPU), ``cpu`` or ``cuda[:N]``.
``fedprog simulate`` decides once, on the driver (:func:`simulation_device`): clients then get the concrete
device and Ray reserves ``simulation.num_gpus`` of a GPU per client (Ray hides the GPUs from a client that
reserved none, so a CUDA client always needs a share). In deployment a site's node config ``device`` wins.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

log = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEFAULT_GPU_SHARE = 0.25  # a simulated client's GPU share when training on CUDA with simulation.num_gpus=0
AMP_DTYPES = ("bfloat16", "float16")


class DeviceError(ValueError):
    """A device setting that this machine cannot honour (one line, naming the key)."""


def check_device_name(requested: str, key: str = "training.device") -> str:
    """Return ``requested`` when it is auto, cpu, cuda or cuda:N; raise DeviceError otherwise."""
    if not DEVICE_PATTERN.match(str(requested)):
        raise DeviceError(f"{key}={requested!r}: choose auto, cpu, cuda or cuda:N")
    return str(requested)


def resolve_device(
    requested: str, *, num_gpus: float | None = None, key: str = "training.device"
) -> torch.device:
    """The torch device for ``requested`` (auto | cpu | cuda | cuda:N).

    ``num_gpus`` is the GPU share this process was given (a simulated client's ``simulation.num_gpus``);
    ``None`` means not limited. ``auto`` gives CUDA when CUDA is available and the share is not zero.
    ``key`` is the setting named in errors.

    Raises
    ------
    DeviceError
        For an unknown name, or CUDA requested where none is available (or the share is zero).
    """
    name = check_device_name(requested, key)
    has_gpu = torch.cuda.is_available() and (num_gpus is None or num_gpus > 0)
    if name == "auto":
        return torch.device("cuda" if has_gpu else "cpu")
    if name.startswith("cuda") and not has_gpu:
        where = "this client was given no GPU (simulation.num_gpus=0)" if num_gpus == 0 else "CUDA is missing"
        raise DeviceError(f"{key}={name}: {where} on this machine; use {key}=cpu or auto")
    return torch.device(name)


def simulation_device(requested: str, num_gpus: float) -> tuple[str, float]:
    """(device every simulated client trains on, Ray GPU share per client), decided on the driver.

    ``cpu`` gives no GPU share; ``auto`` and ``cuda`` give CUDA with ``num_gpus`` of a GPU per client, or
    :data:`DEFAULT_GPU_SHARE` when ``num_gpus`` is 0; ``auto`` falls back to the CPU where CUDA is missing,
    and ``num_gpus > 0`` without CUDA is an error.
    """
    name = check_device_name(requested)
    if name == "cpu":
        if num_gpus > 0:
            log.info("training.device=cpu: simulation.num_gpus=%s not reserved", num_gpus)
        return "cpu", 0.0
    if num_gpus > 0 and not torch.cuda.is_available():
        raise DeviceError(f"simulation.num_gpus={num_gpus}: CUDA is not available on this machine")
    device = resolve_device(name)
    if device.type != "cuda":
        return "cpu", 0.0
    return "cuda", float(num_gpus) if num_gpus > 0 else DEFAULT_GPU_SHARE


def client_resources(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """Flower's Ray backend ``client_resources``: a GPU share > 0 makes Ray expose a GPU to each client."""
    return {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}


def client_device(training_device: str, node_config: Mapping[str, Any]) -> str:
    """The device a ClientApp trains on: the node config's ``device`` (deployment) or ``training.device``."""
    requested = str(node_config.get("device", training_device))
    return str(resolve_device(requested))


def autocast(device: torch.device, *, enabled: bool, dtype: str = "bfloat16") -> AbstractContextManager:
    """Mixed-precision autocast on ``device`` (bf16 works on CPU and CUDA), or a no-op when disabled."""
    if not enabled:
        return nullcontext()
    if dtype not in AMP_DTYPES:
        raise DeviceError(f"training.amp_dtype={dtype!r}: choose one of {', '.join(AMP_DTYPES)}")
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
