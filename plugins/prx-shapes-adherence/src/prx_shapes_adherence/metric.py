"""The ``shapes_adherence`` metric object: per-image components as features, their means as scores."""

from __future__ import annotations

import torch

from prx_shapes_adherence.adherence import COMPONENTS, adherence, parse_long_caption


class ShapesAdherenceMetric:
    """Features are [B, 3] fractions correct (colour, background, kind); scores are their means.

    With one shape per image (``max_shapes = 1``) every entry is 0 or 1; with several, the colour
    and kind entries are the fraction of that image's shapes that are right, and background the
    fraction of its empty cells.
    """

    name = "shapes_adherence"
    needs_reference = False

    def features(self, images_BCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if not isinstance(images_BCHW, torch.Tensor) or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
            shape = tuple(images_BCHW.shape) if isinstance(images_BCHW, torch.Tensor) else type(images_BCHW).__name__
            raise ValueError(f"shapes_adherence: expected RGB images [B, 3, S, S] in [0, 1], got {shape}")
        if not images_BCHW.is_floating_point():
            raise ValueError(f"shapes_adherence: expected float images in [0, 1], got {images_BCHW.dtype}")
        if isinstance(prompts, str) or len(prompts) != images_BCHW.shape[0]:
            raise ValueError(
                f"shapes_adherence: needs one prompt per image, got {images_BCHW.shape[0]} images and "
                f"{1 if isinstance(prompts, str) else len(prompts)} prompts"
            )
        rows = [
            adherence(image, parse_long_caption(prompt)) for image, prompt in zip(images_BCHW, prompts, strict=True)
        ]
        if not rows:
            return torch.zeros(0, len(COMPONENTS))
        return torch.stack(rows)

    def score(self, generated_ND: torch.Tensor, reference_ND: torch.Tensor | None) -> dict[str, float]:
        if generated_ND.ndim != 2 or generated_ND.shape[1] != len(COMPONENTS) or generated_ND.shape[0] < 1:
            raise ValueError(
                f"shapes_adherence: expected features [N >= 1, {len(COMPONENTS)}], got {tuple(generated_ND.shape)}"
            )
        means = generated_ND.double().mean(dim=0)
        scores = {f"{self.name}/{part}": float(value) for part, value in zip(COMPONENTS, means, strict=True)}
        scores[self.name] = float(means.mean())
        return scores
