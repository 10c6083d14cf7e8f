"""Frozen timm vision encoders (DINOv2 / DINOv3) and the maths every teacher-based plugin shares.

REPA, iREPA, Perceptual DINO and the DINO metrics all need the same things: load a pretrained
ViT once, keep it frozen and out of checkpoints (reference.md §7.9), feed it images in [0, 1] at the
resolution that makes its patch grid match something, and keep only the patch tokens (reference.md §4:
"drop CLS/register/prefix tokens"). That lives here, once, so the plugins never import each other.

There is exactly one loading path, :func:`load_frozen_encoder`:

* ``weights == ""``: ``timm.create_model(id, pretrained=True)``, timm's standard hub download;
* otherwise a local ``.safetensors`` (or ``.pth``/``.pt``/``.bin``, read with
  ``torch.load(weights_only=True)``) state dict, loaded strictly into a freshly created model.

Tests (and toy recipes) use the same path: :func:`write_random_weights` saves a randomly initialised
encoder of the same family, shrunk through ``overrides``, and the plugin loads it back like a real
checkpoint. ``timm`` is imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from prx_core.routing import gather_tokens
from prx_core.towers import DATA_DTYPE
from prx_core.weights import WeightsError, read_state_dict, state_dict_problems

if TYPE_CHECKING:
    from prx_core.keys import RoutePlan

#: Short teacher names used by recipes, mapped to timm model ids (architecture + pretrained tag).
TEACHERS: dict[str, str] = {
    # DINOv2 ViT-L/14 with 4 registers (REPA's default teacher, DINO-MMD's feature network).
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    # DINOv2 ViT-B/14 with 4 registers (Perceptual DINO).
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    # DINOv3 ViT-L/16 distilled on LVD-1689M (REPA-DINOv3 ablation, the speedrun).
    "dinov3_vitl16": "vit_large_patch16_dinov3.lvd1689m",
}

#: How :meth:`FrozenEncoder.prepare` brings images to the encoder's input size.
#:
#: * ``"nearest"``: ``F.interpolate(scale_factor=patch / √(H·W / N))`` in its default nearest mode,
#:   N being the target's patch count. This is exactly how the reference resizes REPA's (and
#:   iREPA's) teacher input (reference.md §8), so it is what :meth:`FrozenEncoder.patch_tokens`
#:   uses unless told otherwise.
#: * ``"antialias"``: bilinear with antialiasing to the target size (a proper low-pass when
#:   downscaling); what the DINO metric's CLS features use.
ResizeMode = Literal["nearest", "antialias"]

#: Used only when a model's pretrained config carries no normalisation (never for the TEACHERS).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderLoadError(WeightsError):
    """A vision encoder could not be created or its weights did not load; the message says why."""


def _timm() -> Any:
    try:
        import timm
    except ImportError as err:  # an optional dependency of the teacher-based plugins
        raise ImportError("frozen vision encoders need the 'timm' package: pip install 'timm>=1.0'") from err
    return timm


def resolve_teacher(name_or_timm_id: str) -> str:
    """A short name from :data:`TEACHERS` or a timm model id, as a timm model id."""
    return TEACHERS.get(name_or_timm_id, name_or_timm_id)


def _check_known(timm: Any, timm_id: str, name: str) -> None:
    if not timm.is_model(timm_id):
        import difflib

        close = difflib.get_close_matches(name, [*TEACHERS, *timm.list_models(pretrained=True)], n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise EncoderLoadError(
            f"unknown vision encoder {name!r}: not one of {sorted(TEACHERS)} nor a timm model id{hint}"
        )


@contextlib.contextmanager
def _private_rng() -> Iterator[None]:
    """Create modules without advancing the global CPU RNG.

    A model's random init is thrown away when weights load, but it would still consume draws from
    the global generator, so whether (and in which order) plugins load teachers would shift every
    later global draw. Forking makes loading a teacher invisible to the rest of the run.
    """
    with torch.random.fork_rng(devices=[]):
        yield


def _create(timm_id: str, pretrained: bool, overrides: Mapping[str, Any]) -> torch.nn.Module:
    timm = _timm()
    # dynamic_img_size: the patch grid follows the input size (RoPE / interpolated position
    # embeddings), which REPA needs to match the denoiser's token grid.
    kwargs: dict[str, Any] = {"dynamic_img_size": True, **overrides}
    with _private_rng():
        return timm.create_model(timm_id, pretrained=pretrained, **kwargs)


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, timm_id: str) -> None:
    # timm's own converter for the architecture maps official checkpoints (Meta's DINOv2/DINOv3
    # .pth files) to timm key names; on a timm-format state dict it is the identity.
    import sys

    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, model)
    problems = state_dict_problems(model, state)
    if problems:
        raise EncoderLoadError(
            f"vision encoder weights {path} do not match timm model '{timm_id}': {problems}. "
            "Check that the file is for this architecture (and that encoder_overrides, if any, match it)"
        )
    model.load_state_dict(state, strict=True)


def load_frozen_encoder(
    name_or_timm_id: str,
    weights: str = "",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> FrozenEncoder:
    """Create a timm ViT, load its weights, freeze it, and wrap it as a :class:`FrozenEncoder`.

    ``overrides`` are extra ``timm.create_model`` arguments (``embed_dim``, ``depth``,
    ``num_heads``, ``img_size``…); with a local ``weights`` file they let tests and toy recipes
    use a tiny encoder of the same family. ``device``/``dtype`` come from the caller (plugins pass
    ``run.device`` and ``run.precision.frozen_dtype``); ``None`` leaves the model on the CPU in fp32.
    """
    timm_id = resolve_teacher(name_or_timm_id)
    timm = _timm()
    _check_known(timm, timm_id, name_or_timm_id)
    extra = dict(overrides or {})
    if not weights:
        try:
            model = _create(timm_id, True, extra)
        except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
            raise EncoderLoadError(
                f"could not fetch pretrained weights for '{timm_id}' ({type(err).__name__}: {err}). "
                "On an offline machine, download the timm checkpoint elsewhere (hub repo "
                f"'timm/{timm_id}', file model.safetensors) and pass its local path as `weights`"
            ) from err
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise EncoderLoadError(f"vision encoder weights file not found: {path}")
        state = read_state_dict(
            path, "vision encoder weights", unwrap=("state_dict", "model", "teacher"), error=EncoderLoadError
        )
        try:
            model = _create(timm_id, False, extra)
        except TypeError as err:
            raise EncoderLoadError(f"cannot create timm model '{timm_id}' with overrides {extra}: {err}") from err
        _load_strict(model, state, path, timm_id)
    model.eval()
    model.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    return FrozenEncoder(model, timm_id)


def write_random_weights(
    name_or_timm_id: str, path: str | Path, *, overrides: Mapping[str, Any] | None = None, seed: int = 0
) -> Path:
    """Save a randomly initialised encoder of this family as ``.safetensors`` (for tests and toy runs).

    The architecture is the named one changed by ``overrides`` (e.g. ``embed_dim=32, depth=1,
    num_heads=2``); load it back with :func:`load_frozen_encoder` and the same overrides.
    """
    from safetensors.torch import save_file

    timm_id = resolve_teacher(name_or_timm_id)
    timm = _timm()
    _check_known(timm, timm_id, name_or_timm_id)
    with _private_rng():
        torch.manual_seed(seed)
        model = timm.create_model(timm_id, pretrained=False, dynamic_img_size=True, **dict(overrides or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


class FrozenEncoder:
    """A frozen timm ViT that turns images in [0, 1] into patch tokens.

    Deliberately not an ``nn.Module``: it can never be registered as a submodule of something
    trainable, so it never reaches an optimizer, an EMA copy or a checkpoint (reference.md §7.9).
    Parameters are frozen but the graph is not cut: gradients flow through it to the input when
    the caller runs it with autograd on (Perceptual DINO needs that; REPA targets use ``no_grad``).
    """

    def __init__(self, model: torch.nn.Module, timm_id: str) -> None:
        self.model = model
        self.timm_id = timm_id
        patch = tuple(model.patch_embed.patch_size)  # type: ignore[union-attr, arg-type]
        if len(patch) != 2 or patch[0] != patch[1]:
            raise EncoderLoadError(f"'{timm_id}' has non-square patches {patch}; only square patches are supported")
        self.patch_size: int = int(patch[0])
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)  # type: ignore[arg-type]
        self.embed_dim: int = int(model.embed_dim)  # type: ignore[arg-type]
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean: tuple[float, ...] = tuple(float(v) for v in cfg.get("mean", _IMAGENET_MEAN))
        self.std: tuple[float, ...] = tuple(float(v) for v in cfg.get("std", _IMAGENET_STD))
        self.has_cls_token: bool = getattr(model, "cls_token", None) is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prepare(
        self, images_BCHW: torch.Tensor, size_hw: tuple[int, int], resize: ResizeMode = "antialias"
    ) -> torch.Tensor:
        """Normalise images in [0, 1] with the encoder's mean/std and resize them to ``size_hw``
        (how: :data:`ResizeMode`; images already at ``size_hw`` are not resampled)."""
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W] in [0, 1], got shape {tuple(images_BCHW.shape)}")
        if resize not in ("nearest", "antialias"):
            raise ValueError(f"unknown resize mode {resize!r}; expected 'nearest' or 'antialias'")
        # Normalise and resize in at least fp32: the antialiased resize has no bf16/fp16 kernel on
        # CPU, and a bf16 x̂0 (autocast output) would lose precision here anyway. The cast is
        # differentiable, so gradients still reach a low-precision input. (Nearest resizing only
        # selects pixels, so it commutes exactly with the per-channel normalisation.)
        work_dtype = torch.promote_types(images_BCHW.dtype, torch.float32)
        x_BCHW = images_BCHW.to(work_dtype)
        mean_C = torch.tensor(self.mean, device=x_BCHW.device, dtype=work_dtype)
        std_C = torch.tensor(self.std, device=x_BCHW.device, dtype=work_dtype)
        x_BCHW = (x_BCHW - mean_C[:, None, None]) / std_C[:, None, None]
        if tuple(x_BCHW.shape[-2:]) != tuple(size_hw):
            x_BCHW = self._resize(x_BCHW, size_hw, resize)
        return x_BCHW.to(device=self.device, dtype=self.dtype)

    def _resize(self, x_BCHW: torch.Tensor, size_hw: tuple[int, int], resize: ResizeMode) -> torch.Tensor:
        if resize == "antialias":
            return F.interpolate(x_BCHW, size=size_hw, mode="bilinear", align_corners=False, antialias=True)
        height, width = x_BCHW.shape[-2:]
        patches = (size_hw[0] // self.patch_size) * (size_hw[1] // self.patch_size)
        if patches < 1 or size_hw[0] % self.patch_size or size_hw[1] % self.patch_size:
            raise ValueError(f"nearest resize targets whole patches of {self.patch_size} px, got size {size_hw}")
        # The reference's formula, term for term: the scale factor (not the target size) goes to
        # F.interpolate, which then maps output pixel i to input pixel floor(i / factor).
        downsampling_ratio = (width * height / patches) ** 0.5
        resized_BCHW = F.interpolate(x_BCHW, scale_factor=self.patch_size / downsampling_ratio)
        if tuple(resized_BCHW.shape[-2:]) != tuple(size_hw):
            raise ValueError(
                f"nearest resize of a {height}x{width} image by {self.patch_size / downsampling_ratio} gives "
                f"{tuple(resized_BCHW.shape[-2:])}, not {tuple(size_hw)}: its aspect ratio differs from the target's"
            )
        return resized_BCHW

    def features(
        self, images_BCHW: torch.Tensor, size_hw: tuple[int, int], resize: ResizeMode = "antialias"
    ) -> torch.Tensor:
        """All output tokens (prefix tokens first, then patch tokens), after the final norm."""
        return self.model.forward_features(self.prepare(images_BCHW, size_hw, resize))  # type: ignore[operator]

    def patch_tokens(
        self, images_BCHW: torch.Tensor, grid_hw: tuple[int, int], resize: ResizeMode = "nearest"
    ) -> torch.Tensor:
        """Patch tokens [B, grid_h·grid_w, E] for images in [0, 1], resized so the grid is ``grid_hw``.

        Row-major token order, like the denoiser's image tokens, so token i of both describe the
        same image region. The default resize is the reference's teacher resize (nearest, by scale
        factor; :data:`ResizeMode`), which REPA and iREPA use.
        """
        grid_h, grid_w = grid_hw
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"grid_hw must be positive, got {grid_hw}")
        tokens_BTE = self.features(images_BCHW, (grid_h * self.patch_size, grid_w * self.patch_size), resize)
        patches_BNE = tokens_BTE[:, self.num_prefix_tokens :]
        if patches_BNE.shape[1] != grid_h * grid_w:
            raise RuntimeError(
                f"'{self.timm_id}' returned {patches_BNE.shape[1]} patch tokens for a {grid_h}×{grid_w} grid"
            )
        return patches_BNE

    def cls_token(self, images_BCHW: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
        """The normalised CLS token [B, E] of images in [0, 1] resized to ``size`` pixels."""
        if not self.has_cls_token:
            raise RuntimeError(f"'{self.timm_id}' has no CLS token")
        size_hw = (size, size) if isinstance(size, int) else size
        return self.features(images_BCHW, size_hw)[:, 0]


# --------------------------------------------------------------------------- shared maths


def token_grid(latent_BCHW: torch.Tensor | torch.Size, patch_size: int) -> tuple[int, int]:
    """The denoiser's image-token grid (rows, columns) for a latent of this shape."""
    shape = latent_BCHW.shape if isinstance(latent_BCHW, torch.Tensor) else latent_BCHW
    height, width = int(shape[-2]), int(shape[-1])
    if height % patch_size or width % patch_size:
        raise ValueError(f"latent size {height}×{width} is not divisible by the patch size {patch_size}")
    return height // patch_size, width // patch_size


def route_covers(plan: RoutePlan | None, layer: int) -> bool:
    """Whether block ``layer`` sees only the routed (visible) tokens of ``plan``."""
    return plan is not None and plan.start <= layer <= plan.end


def visible_targets(targets_BNE: torch.Tensor, plan: RoutePlan | None, layer: int) -> torch.Tensor:
    """The targets matching block ``layer``'s tokens: all of them, or the visible ones when routed.

    A token router (TREAD, SPRINT) hands blocks ``start..end`` only a subset of the image tokens,
    in order; a feature captured inside that span therefore aligns with the targets at the plan's
    ``visible_idx_BK``.
    """
    if plan is None or not route_covers(plan, layer):
        return targets_BNE
    if plan.full_length != targets_BNE.shape[1]:
        raise ValueError(f"route plan covers {plan.full_length} tokens but the targets have {targets_BNE.shape[1]}")
    return gather_tokens(targets_BNE, plan.visible_idx_BK)


def teacher_feature_key(plugin: str, encoder: str, grid_hw: tuple[int, int]) -> str:
    """The ``prx_precompute_features`` key of a plugin's teacher targets for one token grid.

    It names everything the targets depend on (plugin, teacher, grid), so targets stored for
    another configuration are never picked up by mistake.
    """
    return f"{plugin}:{encoder}:{grid_hw[0]}x{grid_hw[1]}"


def precomputed_teacher_width(run: Any, plugin: str, encoder: str) -> int | None:
    """The teacher's embedding width when the data source stores ``plugin``'s targets from
    ``encoder``, else None (training from ``prx-run precompute --features`` shards then never
    loads the teacher)."""
    from prx_core.config import RecipeError

    stored = getattr(run.data, "precomputed_features", None) or {}
    widths = {shape[-1] for key, shape in stored.items() if key.startswith(f"{plugin}:{encoder}:")}
    if len(widths) > 1:
        raise RecipeError(f"{plugin}: the precomputed '{encoder}' targets have several widths {sorted(widths)}")
    return widths.pop() if widths else None


def image_token_grid(run: Any, images_BCHW: torch.Tensor, label: str) -> tuple[int, int]:
    """The denoiser's token grid for these images (one token per latent compression × patch pixels)."""
    stride = run.require("latent_space").spatial_compression * run.recipe.model.patch_size
    height, width = images_BCHW.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(f"{label}: images of {height}x{width} do not cut into {stride}-px tokens")
    return height // stride, width // stride


def alignment_targets(
    label: str,
    stored_BNE: torch.Tensor | None,
    online_BKE: Callable[[], torch.Tensor] | None,
    grid_hw: tuple[int, int],
    plan: RoutePlan | None,
    layer: int,
) -> torch.Tensor:
    """Teacher targets for block ``layer``'s tokens: from precomputed ones (``prx-run precompute``
    stored them over the full grid) when the batch has them, else computed online by ``online_BKE``
    (None when there is no teacher or no image to run it on)."""
    if stored_BNE is not None:
        return visible_targets(stored_BNE.detach(), plan, layer)
    if online_BKE is None:
        raise RuntimeError(
            f"{label}: this batch has no images and no precomputed teacher targets for a {grid_hw[0]}x{grid_hw[1]} "
            "token grid; precompute with --features and the same encoder and patch size"
        )
    return online_BKE()


def mean_cosine_similarity(a_BKE: torch.Tensor, b_BKE: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token, averaged per sample over tokens, then over the batch (a scalar).

    Computed in at least fp32 (the step's :data:`~prx_core.towers.DATA_DTYPE`) whatever the
    projector's, the teacher's or autocast's dtype, as the reference does (an explicit ``.float()``
    in Perceptual DINO; CUDA autocast runs ``cosine_similarity`` in fp32 for REPA). A bf16 cosine
    would quantise 1 − cos near 1 to steps of 2⁻⁸, and CPU autocast would leave it in bf16.
    """
    if a_BKE.shape != b_BKE.shape:
        raise ValueError(f"cannot compare tokens of shapes {tuple(a_BKE.shape)} and {tuple(b_BKE.shape)}")
    dtype = torch.promote_types(torch.promote_types(a_BKE.dtype, b_BKE.dtype), DATA_DTYPE)
    cos_BK = F.cosine_similarity(a_BKE.to(dtype), b_BKE.to(dtype), dim=-1)
    return cos_BK.mean(dim=1).mean()


def frozen_encoder_for_run(run: Any, plugin: str, config: Any) -> FrozenEncoder:
    """The frozen encoder a plugin's config names, loaded once per run and kept in its plugin state.

    ``config`` must have ``encoder``, ``weights`` and ``encoder_overrides``; the encoder runs on
    ``run.device`` in the precision policy's ``frozen_dtype``. Being plugin state, never a trained
    module, it stays out of the optimizer, EMA and checkpoints (reference.md §7.9).
    """

    def load() -> FrozenEncoder:
        return load_frozen_encoder(
            config.encoder,
            config.weights,
            run.device,
            run.require("precision").frozen_dtype,
            overrides=config.encoder_overrides,
        )

    encoder: FrozenEncoder = run.plugin_state(plugin, load)
    return encoder
