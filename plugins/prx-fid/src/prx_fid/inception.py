"""The FID Inception-v3 feature network and the ``fid`` metric object (reference.md §6).

The network is the one torchmetrics' ``FrechetInceptionDistance`` uses (its ``NoTrainInceptionV3``,
built on torch-fidelity's ``FeatureExtractorInceptionV3``): the TF-slim Inception-v3 of the original
FID with weights converted from ``pt_inception-2015-12-05``, read out at the 2048-d average pool.
The layers are torch-fidelity's own blocks under the same names, so the same weight file loads
strictly into both. We build the module here instead of instantiating torch-fidelity's class
because that constructor always loads weights itself with full unpickling (``torch.load`` with
``weights_only`` off, which can run arbitrary code and which prx never does); here weights are read
as safetensors or with ``weights_only=True``.

Input range (reference.md §7.2): the network takes uint8 images in [0, 255]. Our images are floats in
[0, 1]; :func:`to_uint8` clamps and rounds them once. The reference instead handed uint8 images
to torchmetrics with ``normalize=True``, which multiplies by 255 *again* in uint8 arithmetic and
wraps around (2 → 510 mod 256 = 254), so the network saw scrambled images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prx_core.metrics_math import frechet_distance_of_features
from prx_core.weights import WeightsError, state_dict_problems
from prx_core.weights import read_state_dict as read_weights

#: torch-fidelity's release of the FID Inception weights, the file torchmetrics downloads.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
#: The trunk up to the 2048-d pool, in forward order (names are the weight file's key prefixes).
_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "MaxPool_1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "MaxPool_2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "AvgPool",
)


class InceptionWeightsError(WeightsError):
    """The Inception weights could not be found, downloaded or loaded; the message says why."""


def _fidelity() -> Any:
    try:
        from torch_fidelity import feature_extractor_inceptionv3
    except ImportError as err:
        raise ImportError(
            "the fid metric needs torch-fidelity (torchmetrics' FID network): pip install torch-fidelity"
        ) from err
    return feature_extractor_inceptionv3


class InceptionV3Pool(torch.nn.Module):
    """FID Inception-v3 mapping uint8 images [B, 3, H, W] to 2048-d pool features [B, 2048].

    ``antialias=True`` resizes to 299 px with antialiased bilinear interpolation, torchmetrics'
    default; ``False`` uses torch-fidelity's TensorFlow-1 compatible bilinear resize, which
    reproduces the original TF FID implementation.
    """

    INPUT_SIZE = 299

    def __init__(self, antialias: bool = True) -> None:
        super().__init__()
        tf = _fidelity()
        self.antialias = antialias
        self.Conv2d_1a_3x3 = tf.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = tf.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = tf.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = torch.nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = tf.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = tf.BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = torch.nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = tf.InceptionA(192, pool_features=32)
        self.Mixed_5c = tf.InceptionA(256, pool_features=64)
        self.Mixed_5d = tf.InceptionA(288, pool_features=64)
        self.Mixed_6a = tf.InceptionB(288)
        self.Mixed_6b = tf.InceptionC(768, channels_7x7=128)
        self.Mixed_6c = tf.InceptionC(768, channels_7x7=160)
        self.Mixed_6d = tf.InceptionC(768, channels_7x7=160)
        self.Mixed_6e = tf.InceptionC(768, channels_7x7=192)
        self.Mixed_7a = tf.InceptionD(768)
        self.Mixed_7b = tf.InceptionE_1(1280)
        self.Mixed_7c = tf.InceptionE_2(2048)
        self.AvgPool = torch.nn.AdaptiveAvgPool2d(output_size=(1, 1))
        # The classifier is unused for pool features but is part of the weight file, and keeping
        # it lets the file load strictly (a truncated or foreign file is an error, not a surprise).
        self.fc = torch.nn.Linear(2048, 1008)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if images_BCHW.dtype != torch.uint8 or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
            raise ValueError(
                f"InceptionV3Pool takes uint8 RGB images [B, 3, H, W] in [0, 255], got {images_BCHW.dtype} "
                f"{tuple(images_BCHW.shape)}"
            )
        # Resize in single precision at least: the antialiased kernel has no bf16 version on CPU,
        # and 0..255 integers are exact there. Only the network itself runs in its own dtype.
        x_BCHW = images_BCHW.float()
        size = (self.INPUT_SIZE, self.INPUT_SIZE)
        if self.antialias:
            x_BCHW = F.interpolate(x_BCHW, size=size, mode="bilinear", align_corners=False, antialias=True)
        else:
            from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

            x_BCHW = interpolate_bilinear_2d_like_tensorflow1x(x_BCHW, size=size, align_corners=False)
        x_BCHW = ((x_BCHW - 128) / 128).to(self.fc.weight.dtype)
        for name in _TRUNK:
            x_BCHW = getattr(self, name)(x_BCHW)
        return torch.flatten(x_BCHW, 1)


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as uint8 in [0, 255], the range the FID network expects.

    Clamped first (a generated pixel at 1.004 must become 255, not wrap to 0) and rounded to the
    nearest level, as an image writer would; truncating (torchmetrics' ``normalize=True`` does
    ``(x * 255).byte()``) would darken continuous generated values by half a level on average
    while leaving real images that came from uint8 unchanged, a small systematic gap between sets.
    """
    if not isinstance(images_BCHW, torch.Tensor) or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
        shape = tuple(images_BCHW.shape) if isinstance(images_BCHW, torch.Tensor) else type(images_BCHW).__name__
        raise ValueError(f"fid: expected RGB images [B, 3, H, W], got {shape}")
    if not images_BCHW.is_floating_point():
        # Multiplying uint8 images by 255 again is exactly the reference's wrap-around bug (reference.md §7.2).
        raise ValueError(f"fid: expected float images in [0, 1], got {images_BCHW.dtype}; pass images / 255")
    return (images_BCHW.detach().float().clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from ``.safetensors`` or a tensors-only ``.pth``/``.pt``/``.bin``."""
    return read_weights(path, "fid: Inception weights", error=InceptionWeightsError)


def _download() -> dict[str, torch.Tensor]:
    try:
        state: dict[str, torch.Tensor] = torch.hub.load_state_dict_from_url(
            INCEPTION_URL, map_location="cpu", progress=False, weights_only=True
        )
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
        raise InceptionWeightsError(
            f"fid: could not download the FID Inception weights ({type(err).__name__}: {err}). On an offline "
            f"machine, fetch {INCEPTION_URL} elsewhere and set [metrics.fid] inception_weights to its local path "
            f"(or place it at {cache})"
        ) from err
    return state


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    # BatchNorm's step counter is unused in eval mode and absent from older conversions; torch's
    # own loader fills it in, so only real parameters and statistics count as missing.
    problems = state_dict_problems(model, state, optional=lambda key: key.endswith("num_batches_tracked"))
    if problems:
        raise InceptionWeightsError(
            f"fid: {where} is not an FID Inception-v3 state dict: {problems}. Use torch-fidelity's "
            f"weights-inception-2015-12-05-6726825d.pth ({INCEPTION_URL})"
        )
    model.load_state_dict(state, strict=True, assign=True)


def load_inception(
    weights: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None, antialias: bool = True
) -> InceptionV3Pool:
    """The one loading path: a local weight file, or (``weights == ""``) the standard download.

    The model comes back frozen (eval mode, no gradients) on ``device`` in ``dtype``.
    """
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(f"fid: Inception weights file not found: {path}")
        state, where = read_state_dict(path), str(path)
    else:
        state, where = _download(), INCEPTION_URL
    # Built on the meta device and filled by assignment: no random initialisation to compute and
    # throw away (seconds for 24M parameters on a CPU), and no draw from the global RNG, so
    # building a metric never shifts the run's later random numbers.
    with torch.device("meta"):
        model = InceptionV3Pool(antialias=antialias)
    _load_strict(model, state, where)
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)


class FidMetric:
    """``fid``: Fréchet distance between Gaussian fits of Inception pool features (reference.md §6)."""

    name = "fid"
    needs_reference = True

    def __init__(self, network: InceptionV3Pool, device: torch.device) -> None:
        self.network = network
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, images_BCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """2048-d pool features [B, 2048] on the CPU, for float images in [0, 1]."""
        pixels_BCHW = to_uint8(images_BCHW).to(self.device)
        return self.network(pixels_BCHW).float().cpu()

    def score(self, generated_ND: torch.Tensor, reference_ND: torch.Tensor | None) -> dict[str, float]:
        if reference_ND is None:
            raise ValueError("fid needs reference features (real held-out images); got None")
        if generated_ND.shape[0] < 2 or reference_ND.shape[0] < 2:
            raise ValueError(
                f"fid needs at least 2 generated and 2 reference images, got {generated_ND.shape[0]} and "
                f"{reference_ND.shape[0]}"
            )
        return {"fid": float(frechet_distance_of_features(generated_ND, reference_ND))}
