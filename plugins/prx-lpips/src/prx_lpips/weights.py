"""Loading LPIPS-VGG's two sets of weights: the VGG16 trunk and the five linear layers.

* **VGG16 trunk**: a torchvision-format VGG16 state dict (``features.<i>.weight/bias``; the
  ``classifier.*`` entries of a full model are ignored), from a local ``.safetensors`` or ``.pth``
  file, or, when no path is given, torchvision's ``VGG16_Weights.IMAGENET1K_V1`` through
  ``torch.hub`` (downloaded once into ``$TORCH_HOME/hub/checkpoints``).
* **Linear layers**: the LPIPS v0.1 calibration in the ``lpips`` package's layout
  (``lin<k>.model.1.weight``, shape [1, C, 1, 1]), from a local file or, when no path is given, the
  ``weights/v0.1/vgg.pth`` that ships inside the ``lpips`` package. The package is only located,
  never imported.

:func:`load_lpips_vgg` is the one entry point; the plugin and the tests both go through it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch

from prx_core.weights import read_state_dict as read_weights
from prx_lpips.network import LPIPSVGG, SCALE, SHIFT, STAGE_CHANNELS, VGG16_CFG

#: Where the ``lpips`` package keeps its VGG linear layers, relative to the package directory.
BUNDLED_LIN_FILE = ("weights", "v0.1", "vgg.pth")


def vgg16_feature_shapes() -> dict[str, tuple[int, ...]]:
    """Every ``features.*`` tensor of torchvision's VGG16 with its shape, up to relu5_3."""
    shapes: dict[str, tuple[int, ...]] = {}
    index, in_channels = 0, 3
    for item in VGG16_CFG:
        if item == "M":
            index += 1
            continue
        out_channels = int(item)
        shapes[f"features.{index}.weight"] = (out_channels, in_channels, 3, 3)
        shapes[f"features.{index}.bias"] = (out_channels,)
        index, in_channels = index + 2, out_channels  # conv, then its ReLU
    return shapes


def lin_shapes() -> dict[str, tuple[int, ...]]:
    return {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(STAGE_CHANNELS)}


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A flat name → tensor mapping from ``.safetensors`` or a weights-only ``torch.load`` of ``.pth``/``.pt``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"lpips: {what} file not found: {file}")
    # torch files are mapped to the CPU: the lpips package's own vgg.pth was saved from a GPU.
    return read_weights(file, f"lpips: {what} file", error=ValueError)


def _check_shapes(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str, source: str
) -> None:
    missing = [k for k in expected if k not in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or wrong:
        found = ", ".join(sorted(state)[:6]) + (" …" if len(state) > 6 else "")
        problems = (f"missing {', '.join(missing)}; " if missing else "") + (
            f"wrong shape {', '.join(wrong)}; " if wrong else ""
        )
        raise ValueError(f"lpips: {source} is not a {what}: {problems}it holds {found or 'nothing'}")
    floats = [k for k in expected if not state[k].is_floating_point()]
    if floats:
        raise ValueError(f"lpips: {source} holds non-floating-point tensors: {', '.join(floats)}")


def download_vgg16_state() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 weights (IMAGENET1K_V1) via ``torch.hub``'s cache; needs the network once."""
    try:
        from torchvision.models import VGG16_Weights
    except ImportError as err:
        raise ImportError(
            "lpips: vgg_weights is empty, so the ImageNet VGG16 weights come from torchvision, which is not "
            "installed; `pip install torchvision` or set [plugins.lpips] vgg_weights to a local file"
        ) from err
    url = VGG16_Weights.IMAGENET1K_V1.url
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except OSError as err:  # URLError and socket errors are OSErrors
        raise RuntimeError(
            f"lpips: could not fetch torchvision's VGG16 ImageNet weights (VGG16_Weights.IMAGENET1K_V1, {url}) "
            f"into {torch.hub.get_dir()}/checkpoints: {err}. Offline, set [plugins.lpips] vgg_weights to a local "
            "torchvision VGG16 state dict (.safetensors or .pth)"
        ) from err
    return dict(state)


def bundled_lin_path() -> Path:
    """The ``lpips`` package's ``weights/v0.1/vgg.pth``, located without importing the package."""
    spec = importlib.util.find_spec("lpips")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*BUNDLED_LIN_FILE)
        if candidate.is_file():
            return candidate
    status = "file missing" if locations else "not installed"
    raise FileNotFoundError(
        "lpips: lin_weights is empty and the calibrated LPIPS linear layers could not be found: they ship as "
        f"{'/'.join(BUNDLED_LIN_FILE)} inside the PyPI package 'lpips' ({status}). "
        "`pip install lpips`, or set [plugins.lpips] lin_weights to a local file with lin0..lin4.model.1.weight"
    )


def vgg16_state(vgg_weights: str) -> dict[str, torch.Tensor]:
    """The trunk's ``features.*`` tensors, checked against VGG16's layout."""
    if vgg_weights:
        state, source = read_state_dict(vgg_weights, "vgg_weights"), f"vgg_weights file {vgg_weights}"
    else:
        state, source = download_vgg16_state(), "torchvision's VGG16_Weights.IMAGENET1K_V1"
    expected = vgg16_feature_shapes()
    _check_shapes(state, expected, "torchvision VGG16 state dict (features.<i>.weight/bias)", source)
    # A features.* key VGG16 does not have (say a BatchNorm's running_mean) means another network.
    extra = sorted(k for k in state if k.startswith("features.") and k not in expected)
    if extra:
        raise ValueError(
            f"lpips: {source} has features the plain VGG16 lacks ({', '.join(extra[:4])}); is it vgg16_bn?"
        )
    return {k: state[k] for k in expected}


def lin_state(lin_weights: str) -> dict[str, torch.Tensor]:
    """The five linear layers as flat [C] vectors keyed ``lin<k>``, checked non-negative."""
    path = Path(lin_weights) if lin_weights else bundled_lin_path()
    source = f"lin_weights file {path}"
    state = read_state_dict(path, "lin_weights")
    _check_shapes(state, lin_shapes(), "LPIPS linear-layer state dict (lin<k>.model.1.weight)", source)
    out: dict[str, torch.Tensor] = {}
    for k in range(len(STAGE_CHANNELS)):
        weight_C = state[f"lin{k}.model.1.weight"].flatten()
        # LPIPS clamps these to >= 0 while calibrating, which makes the distance a sum of
        # non-negative terms; a negative entry means the file is not an LPIPS calibration.
        if bool((weight_C < 0).any()):
            raise ValueError(f"lpips: {source}: lin{k}.model.1.weight has negative entries; LPIPS weights are >= 0")
        out[f"lin{k}"] = weight_C
    return out


def load_lpips_vgg(
    vgg_weights: str = "",
    lin_weights: str = "",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LPIPSVGG:
    """The frozen LPIPS-VGG network: eval mode, no gradients, on ``device`` in ``dtype``.

    Empty paths take the standard sources (module docstring). Every tensor is checked by name and
    shape before anything is assigned, so a wrong file fails with a message, not a shape error
    deep inside ``load_state_dict``.
    """
    state: dict[str, torch.Tensor] = {**vgg16_state(vgg_weights), **lin_state(lin_weights)}
    state["shift"] = torch.tensor(SHIFT).view(1, 3, 1, 1)
    state["scale"] = torch.tensor(SCALE).view(1, 3, 1, 1)
    # Built on the meta device: the real tensors are assigned below, so random init would be wasted.
    with torch.device("meta"):
        net = LPIPSVGG()
    net.load_state_dict(state, strict=True, assign=True)
    net = net.to(device=device, dtype=dtype)
    net.eval()
    net.requires_grad_(False)
    return net
