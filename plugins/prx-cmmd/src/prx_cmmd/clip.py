"""CLIP image embeddings and the ``cmmd`` metric object (reference.md §6, arXiv 2401.09603).

One loading path, :func:`load_clip`: ``CLIPVisionModelWithProjection.from_pretrained`` on a hub id
or a local directory (optionally a ``subfolder`` such as a pipeline's ``image_encoder``). The
image processor's work (resize the short side to the model's input size with bicubic filtering,
centre-crop, CLIP mean/std) is done here in torch, on the run's device, so no image round-trips
through PIL; mean and std come from the checkpoint's ``preprocessor_config.json`` when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prx_core.metrics_math import MMD_SCALE, MMD_SIGMA, mmd_rbf

#: OpenAI CLIP's normalisation (every OpenAI checkpoint's preprocessor_config.json states it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLoadError(RuntimeError):
    """The CLIP vision tower could not be loaded; the message says from where and why."""


def _normalisation(model: str, subfolder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean``/``image_std`` of the checkpoint's processor config, else OpenAI CLIP's."""
    config: dict[str, Any] | None = None
    local = Path(model).expanduser() / subfolder / "preprocessor_config.json"
    if local.is_file():
        config = json.loads(local.read_text(encoding="utf-8"))
    elif not Path(model).expanduser().exists():
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "preprocessor_config.json", subfolder=subfolder or None)
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - no processor file (or offline): CLIP's constants apply
            config = None
    mean = tuple(float(v) for v in (config or {}).get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in (config or {}).get("image_std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ClipLoadError(f"cmmd: {model!r} has an invalid image_mean/image_std {mean}/{std}")
    return mean, std


def load_clip(model: str, subfolder: str, device: torch.device | str | None, dtype: torch.dtype | None) -> ClipEmbedder:
    """Load the frozen CLIP vision tower with its projection, on ``device`` in ``dtype``."""
    try:
        from transformers import AutoConfig, CLIPVisionModelWithProjection
    except ImportError as err:
        raise ImportError("cmmd needs transformers: pip install 'transformers>=4.40'") from err
    where = f"'{model}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    try:
        config = AutoConfig.from_pretrained(model, subfolder=subfolder)
        if getattr(config, "model_type", "") == "clip":
            # A full CLIP checkpoint (the OpenAI repos are): take its vision tower, and the
            # projection width from the top level, which is where CLIPModel keeps it (the vision
            # sub-config's own projection_dim may be a stale default).
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            config = vision
        # Module creation draws random numbers before the weights overwrite them; fork so loading
        # the metric never shifts the run's later global draws.
        with torch.random.fork_rng(devices=[]):
            network = CLIPVisionModelWithProjection.from_pretrained(model, subfolder=subfolder, config=config)
    except OSError as err:
        raise ClipLoadError(
            f"cmmd: cannot load a CLIP vision model from {where}: {err}. Offline, download the checkpoint "
            "elsewhere (e.g. `hf download openai/clip-vit-large-patch14-336`) and set [metrics.cmmd] model to "
            "its local directory"
        ) from err
    network = network.to(device=device, dtype=dtype).eval().requires_grad_(False)
    mean, std = _normalisation(model, subfolder)
    return ClipEmbedder(network, mean, std)


class ClipEmbedder:
    """Images in [0, 1] to L2-normalised CLIP image embeddings (``image_embeds``)."""

    def __init__(self, network: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.network = network
        self.image_size = int(network.config.image_size)
        self.mean = mean
        self.std = std

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def prepare(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """CLIPImageProcessor's steps in torch: short side to ``image_size`` (bicubic, antialiased),
        centre crop to a square, normalise with the model's mean/std."""
        if not isinstance(images_BCHW, torch.Tensor) or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
            shape = tuple(images_BCHW.shape) if isinstance(images_BCHW, torch.Tensor) else type(images_BCHW).__name__
            raise ValueError(f"cmmd: expected RGB images [B, 3, H, W] in [0, 1], got {shape}")
        if not images_BCHW.is_floating_point():
            raise ValueError(f"cmmd: expected float images in [0, 1], got {images_BCHW.dtype}")
        # Resize in single precision at least (no bf16 antialiased kernels on CPU).
        x_BCHW = images_BCHW.detach().to(self.device).float()
        height, width = x_BCHW.shape[-2:]
        size = self.image_size
        scale = size / min(height, width)
        new_hw = (max(size, round(height * scale)), max(size, round(width * scale)))
        if new_hw != (height, width):
            x_BCHW = F.interpolate(x_BCHW, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
        # The processor works on 8-bit images, so bicubic overshoot is clipped to [0, 1] there too.
        x_BCHW = x_BCHW[:, :, top : top + size, left : left + size].clamp(0.0, 1.0)
        mean_C = torch.tensor(self.mean, device=x_BCHW.device, dtype=x_BCHW.dtype)
        std_C = torch.tensor(self.std, device=x_BCHW.device, dtype=x_BCHW.dtype)
        return ((x_BCHW - mean_C[:, None, None]) / std_C[:, None, None]).to(self.dtype)

    @torch.no_grad()
    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Unit-norm ``image_embeds`` [B, projection_dim], on the network's device and dtype."""
        embeds_BD = self.network(pixel_values=self.prepare(images_BCHW)).image_embeds
        return F.normalize(embeds_BD.float(), dim=-1)


class CmmdMetric:
    """``cmmd``: RBF MMD (σ = 10, biased, × 1000) between CLIP embeddings of generated and real images."""

    name = "cmmd"
    needs_reference = True

    def __init__(self, embedder: ClipEmbedder) -> None:
        self.embedder = embedder

    def features(self, images_BCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.embedder.embed(images_BCHW).cpu()

    def score(self, generated_ND: torch.Tensor, reference_ND: torch.Tensor | None) -> dict[str, float]:
        if reference_ND is None:
            raise ValueError("cmmd needs reference features (real held-out images); got None")
        return {"cmmd": float(mmd_rbf(generated_ND, reference_ND, sigma=MMD_SIGMA, scale=MMD_SCALE))}
