"""Tests for the ``fid`` metric: the real FID Inception architecture with random weights (built by
torch-fidelity itself, its download bypassed), loaded back through the plugin's loading path and
compared with torchmetrics on the same images; the input range pitfall (reference.md §7.2); the Fréchet
distance against torchmetrics' FID; recipe binding and the factory."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import prx_fid
import pytest
import torch
from prx_fid import INFO, FidConfig
from prx_fid.inception import (
    FidMetric,
    InceptionV3Pool,
    InceptionWeightsError,
    load_inception,
    to_uint8,
)
from safetensors.torch import save_file
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from prx_core.config import RecipeError
from prx_core.context import RunContext
from prx_core.precision import Fp32
from prx_core.recipe import load
from prx_core.testing.fixtures import write_recipe

CPU = torch.device("cpu")


def _torchmetrics_inception_with_random_weights(antialias: bool) -> NoTrainInceptionV3:
    """torchmetrics' own FID network with random weights: its constructor's weight loading is skipped.

    Convolutions get variance-preserving weights and BatchNorms random statistics, so features
    neither vanish nor explode through the 20 layers and every tensor of the file matters.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as tf

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], antialias=antialias)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                module.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(0.01 * torch.randn(module.weight.shape, generator=g))
    return network.eval()


@pytest.fixture(scope="module")
def reference() -> NoTrainInceptionV3:
    return _torchmetrics_inception_with_random_weights(antialias=True)


@pytest.fixture(scope="module")
def weight_files(reference: NoTrainInceptionV3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inception")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    files = {"safetensors": root / "inception.safetensors", "pth": root / "inception.pth"}
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["pth"])
    return files


@pytest.fixture(scope="module")
def metric(weight_files: dict[str, Path]) -> FidMetric:
    return FidMetric(load_inception(str(weight_files["safetensors"]), CPU), CPU)


def _images(n: int, seed: int, size: int = 16, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 3, size, size, generator=g)


#: Real (A) and generated (B) toy sets, B a little brighter: a clear but finite distance.
SET_A = _images(3, seed=1)
SET_B = _images(3, seed=2, low=0.2)


@pytest.fixture(scope="module")
def features_ab(metric: FidMetric) -> torch.Tensor:
    return metric.features(torch.cat([SET_A, SET_B]), [""] * 6)


# --------------------------------------------------------------------------- input range (reference.md §7.2)


def test_to_uint8_rounds_and_clamps_instead_of_wrapping() -> None:
    images = torch.tensor([-0.1, 0.0, 3 / 255, 0.5, 254.6 / 255, 1.0, 1.004]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    assert to_uint8(images)[0, 0, 0].tolist() == [0, 0, 3, 128, 255, 255, 255]
    # Truncation (torchmetrics' normalize=True) would put 254.6 at 254: half a level darker on average.
    assert (images * 255).byte()[0, 0, 0, 4].item() == 254


def test_uint8_input_is_refused_rather_than_scaled_twice(metric: FidMetric) -> None:
    with pytest.raises(ValueError, match="float images in \\[0, 1\\]"):
        metric.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [""])
    with pytest.raises(ValueError, match="RGB"):
        metric.features(torch.zeros(1, 1, 8, 8), [""])


def test_features_equal_torchmetrics_on_correct_input_and_differ_from_the_buggy_path(
    reference: NoTrainInceptionV3, features_ab: torch.Tensor
) -> None:
    correct_uint8 = (SET_A * 255).round().to(torch.uint8)  # the manual, correct conversion
    # The reference bug: uint8 images fed with normalize=True are multiplied by 255 again, in uint8.
    buggy_uint8 = (correct_uint8 * 255).byte()
    assert (torch.tensor([2], dtype=torch.uint8) * 255).item() == 254  # the wrap-around itself
    with torch.no_grad():
        expected = reference(torch.cat([correct_uint8, buggy_uint8]))
    ours = features_ab[:3]
    assert ours.shape == (3, 2048) and ours.dtype == expected.dtype
    assert ours.std(dim=0).mean() > 1e-3, "random network must give distinct, non-vanishing features"
    torch.testing.assert_close(ours, expected[:3], rtol=1e-4, atol=1e-5)
    assert (ours - expected[3:]).abs().max() > 100 * (ours - expected[:3]).abs().max() + 1e-3


def test_tensorflow_compatible_resize_matches_torchmetrics(
    reference: NoTrainInceptionV3, weight_files: dict[str, Path]
) -> None:
    ours = FidMetric(load_inception(str(weight_files["pth"]), CPU, antialias=False), CPU)
    images = _images(2, seed=5, size=20)
    reference.use_antialias = False  # torchmetrics' FrechetInceptionDistance(antialias=False)
    try:
        with torch.no_grad():
            expected = reference((images * 255).round().to(torch.uint8))
    finally:
        reference.use_antialias = True
    torch.testing.assert_close(ours.features(images, ["", ""]), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- score


class _FirstDims(torch.nn.Module):
    """torchmetrics' network cut to its first ``dims`` features: torchmetrics' FID computes a
    general eigendecomposition of a D×D product, about a minute at D = 2048 on two cores."""

    def __init__(self, network: torch.nn.Module, dims: int) -> None:
        super().__init__()
        self.network = network
        self.num_features = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[:, : self.num_features]


def test_score_matches_torchmetrics_fid(reference: NoTrainInceptionV3, features_ab: torch.Tensor) -> None:
    dims = 64
    fid = FrechetInceptionDistance(feature=_FirstDims(reference, dims))
    fid.update((SET_A * 255).round().to(torch.uint8), real=True)
    fid.update((SET_B * 255).round().to(torch.uint8), real=False)
    expected = fid.compute().item()
    ours = FidMetric.score(None, features_ab[3:, :dims], features_ab[:3, :dims])  # type: ignore[arg-type]
    assert set(ours) == {"fid"}
    assert expected > 0
    assert ours["fid"] == pytest.approx(expected, rel=1e-3)


def test_identical_sets_score_zero(features_ab: torch.Tensor) -> None:
    half = features_ab[:, :1024]
    scores = FidMetric.score(None, half, half.clone())  # type: ignore[arg-type]
    assert abs(scores["fid"]) < 1e-6 * half.var(dim=0).sum().item()


def test_score_needs_a_reference_and_two_samples(features_ab: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="reference"):
        FidMetric.score(None, features_ab, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        FidMetric.score(None, features_ab[:1], features_ab)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- loading


def test_safetensors_pth_and_wrapped_files_load_the_same_tensors(
    weight_files: dict[str, Path], metric: FidMetric, tmp_path: Path
) -> None:
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": torch.load(weight_files["pth"], weights_only=True)}, wrapped)
    for path in (weight_files["pth"], wrapped):
        loaded = load_inception(str(path))
        for (name, a), b in zip(metric.network.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in metric.network.parameters())
    assert not metric.network.training


def test_missing_batchnorm_counters_are_tolerated(weight_files: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(weight_files["safetensors"])).items() if "num_batches_tracked" not in k}
    save_file(state, str(tmp_path / "older.safetensors"))
    assert isinstance(load_inception(str(tmp_path / "older.safetensors")), InceptionV3Pool)


def test_dtype_and_device_come_from_the_caller(weight_files: dict[str, Path]) -> None:
    network = load_inception(str(weight_files["safetensors"]), CPU, torch.float64)
    assert {p.dtype for p in network.parameters()} == {torch.float64}


def test_bad_weight_files_are_clear_errors(weight_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InceptionWeightsError, match="not found"):
        load_inception(str(tmp_path / "nope.pth"))
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(InceptionWeightsError, match="unsupported file type"):
        load_inception(str(tmp_path / "weights.npz"))
    save_file({"fc.weight": torch.zeros(1008, 2048), "extra": torch.zeros(1)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(InceptionWeightsError, match="missing keys Conv2d_1a_3x3.*unexpected keys extra"):
        load_inception(str(tmp_path / "partial.safetensors"))


def test_offline_default_download_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(InceptionWeightsError, match="inception_weights"):
        load_inception("")


# --------------------------------------------------------------------------- plugin wiring


def test_recipe_binds_and_factory_runs(weight_files: dict[str, Path], tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"metrics": {"fid": {"inception_weights": str(weight_files["safetensors"])}}})
    recipe = load(path)
    choice = recipe.metrics["fid"]
    assert choice.plugin == "fid" and choice.config == FidConfig(str(weight_files["safetensors"]))
    entry = recipe.active.registries["metric"].get("fid")
    run = RunContext(recipe=recipe, device=CPU, run_dir=tmp_path, precision=Fp32())
    built = entry.factory(choice.config, run)
    assert built.name == "fid" and built.needs_reference is True
    feats = built.features(torch.cat([SET_A[:2], SET_B[:2]]), ["a", "b", "c", "d"])
    assert feats.shape == (4, 2048) and feats.device == CPU
    scores = built.score(feats[2:], feats[:2])
    assert set(scores) == {"fid"} and scores["fid"] > 0


def test_recipe_rejects_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="metrics.fid.inception_weight"):
        load(write_recipe(tmp_path, {"metrics": {"fid": {"inception_weight": "x"}}}))


def test_info_and_registration() -> None:
    assert INFO.name == "fid" and INFO.requires == () and INFO.conflicts == ()
    registered: list[tuple[str, object, type]] = []

    class Registrar:
        def register(self, name: str, factory: object, config: type) -> None:
            registered.append((name, factory, config))

    prx_fid.prx_register_metrics(Registrar())
    assert [(n, c) for n, _, c in registered] == [("fid", FidConfig)]


def test_import_is_torch_free() -> None:
    code = "import sys, prx_fid; sys.exit('torch' in sys.modules or 'torchmetrics' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.fixture(autouse=True)
def _no_grad_leak() -> Iterator[None]:
    yield
    assert torch.is_grad_enabled()
