"""Unit tests for prx-lpips: the maths, the loading code, the recipe check and the hook wiring."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re  # noqa: E402
import urllib.error  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import prx_lpips  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from prx_lpips import weights as weights_mod  # noqa: E402
from prx_lpips.network import LPIPSVGG, lpips_loss, normalize_channels, resize_images, stage_distance  # noqa: E402
from prx_lpips.testing import random_lin_state, random_vgg16_state, write_random_weights  # noqa: E402
from prx_lpips.weights import load_lpips_vgg  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from prx_core.config import RecipeError  # noqa: E402
from prx_core.testing.fixtures import make_trainer, tiny_recipe, write_recipe  # noqa: E402


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_random_weights(tmp_path_factory.mktemp("lpips_weights"), seed=0)


@pytest.fixture(scope="module")
def net(weight_files: tuple[Path, Path]) -> LPIPSVGG:
    vgg, lin = weight_files
    return load_lpips_vgg(str(vgg), str(lin))


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


# --------------------------------------------------------------------------- maths


def test_normalize_channels_hand_computed() -> None:
    feats = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    assert torch.allclose(normalize_channels(feats).flatten(), torch.tensor([0.6, 0.8]))
    # All-zero features stay zero (eps), rather than dividing by zero.
    assert torch.equal(normalize_channels(torch.zeros(1, 2, 1, 1)), torch.zeros(1, 2, 1, 1))


def test_stage_distance_hand_computed() -> None:
    # Unit vectors (0.6, 0.8) and (0.8, 0.6): squared differences (0.04, 0.04); weights (1, 2)
    # give 0.04 + 0.08 = 0.12 at one position. A second position with equal features gives 0,
    # so the spatial mean is 0.06.
    a = torch.tensor([[3.0, 1.0], [4.0, 1.0]]).view(1, 2, 1, 2)
    b = torch.tensor([[4.0, 1.0], [3.0, 1.0]]).view(1, 2, 1, 2)
    lin = torch.tensor([1.0, 2.0])
    assert torch.allclose(stage_distance(a, b, lin), torch.tensor([0.06]))


def _block_means(image: torch.Tensor) -> torch.Tensor:
    """×0.5 by hand: out[i, j] is the mean of the 2×2 block at rows 2i, 2i+1 and columns 2j, 2j+1.

    Bilinear with align_corners=False at scale factor ½ samples input position (i + ½)·2 − ½ =
    2i + ½, halfway between pixels 2i and 2i + 1; an odd last row or column is never sampled.
    """
    rows, cols = image.shape[-2] // 2, image.shape[-1] // 2
    out = torch.empty(*image.shape[:-2], rows, cols, dtype=image.dtype)
    for i in range(rows):
        for j in range(cols):
            out[..., i, j] = image[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].sum(dim=(-2, -1)) / 4
    return out


def test_resize_is_bilinear_without_antialiasing_by_scale_factor() -> None:
    """reference.md §8: the reference resizes with F.interpolate(scale_factor=0.5, bilinear), no antialias."""
    image = torch.arange(1 * 3 * 7 * 7, dtype=torch.float64).reshape(1, 3, 7, 7) ** 1.5  # not a linear ramp
    out = resize_images(image, 0.5)
    # floor(7 × 0.5) = 3 (round() would give 4), each pixel a 2×2 block mean; row and column 6 unused.
    assert out.shape == (1, 3, 3, 3)
    torch.testing.assert_close(out, _block_means(image), rtol=0, atol=1e-12)
    even = _images(2, 8, seed=20).double()
    torch.testing.assert_close(resize_images(even, 0.5), _block_means(even), rtol=0, atol=1e-12)
    # An antialiased resize would blend 4×4 neighbourhoods instead: a different image.
    antialiased = torch.nn.functional.interpolate(even, scale_factor=0.5, mode="bilinear", antialias=True)
    assert not torch.allclose(antialiased, _block_means(even), atol=1e-3)
    assert resize_images(image, 1.0) is image
    assert resize_images(torch.zeros(1, 3, 1024, 1024), 0.5).shape[-2:] == (512, 512)
    # A bf16 x̂0 (autocast output) is resized in fp32 and keeps its gradient.
    low = _images(1, 8, seed=21).bfloat16().requires_grad_(True)
    resized = resize_images(low, 0.5)
    assert resized.dtype == torch.float32
    resized.sum().backward()
    assert low.grad is not None and torch.equal(low.grad, torch.full_like(low, 0.25))


def test_lpips_at_half_resolution_equals_the_lpips_package_on_block_means(tmp_path: Path) -> None:
    """The plugin's value at resize 0.5 is lpips.LPIPS (the reference's network) of the hand-made
    2×2 block means of both images: the resize is exactly the reference's."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {re.sub(r"^slice\d\.", "features.", k): v.clone() for k, v in reference.net.state_dict().items()}
    vgg_path = tmp_path / "vgg.safetensors"
    save_file(trunk, str(vgg_path))
    ours = load_lpips_vgg(str(vgg_path), "")
    x0_hat, x0 = _images(2, 34, seed=22), _images(2, 34, seed=23)  # 34 px → 17 px
    with torch.no_grad():
        value = lpips_loss(ours, x0_hat, x0, torch.tensor([0.3, 0.8]), resize=0.5, t_max=None)
        expected = reference(_block_means(x0_hat), _block_means(x0)).flatten().mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_matches_reference_lpips_package(tmp_path: Path) -> None:
    """Same random VGG16 in both, the real v0.1 linear layers: our distance equals lpips.LPIPS's."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation, inside lpips
        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    # lpips keeps torchvision's indices inside its five slices: slice2.5.weight is features.5.weight.
    trunk = {re.sub(r"^slice\d\.", "features.", k): v.clone() for k, v in reference.net.state_dict().items()}
    vgg_path = tmp_path / "vgg.safetensors"
    save_file(trunk, str(vgg_path))
    ours = load_lpips_vgg(str(vgg_path), "")  # "": the lin layers bundled with lpips
    a, b = _images(3, 32, seed=1), _images(3, 32, seed=2)
    b[0] = a[0]  # identical images: distance 0 in both
    with torch.no_grad():
        expected = reference(a, b).flatten()
        got = ours(a, b)
    assert got[0] == 0
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), (got, expected)
    # Non-square input exercises the spatial means.
    a, b = _images(2, 48, seed=3)[..., :32], _images(2, 48, seed=4)[..., :32]
    with torch.no_grad():
        assert torch.allclose(ours(a, b), reference(a, b).flatten(), rtol=1e-5, atol=1e-7)


def test_gradient_reaches_x0_hat_not_the_vgg(net: LPIPSVGG) -> None:
    x0_hat = _images(2, 32, seed=5).requires_grad_(True)
    x0 = _images(2, 32, seed=6)
    value = lpips_loss(net, x0_hat, x0, torch.tensor([0.3, 0.6]), resize=1.0, t_max=None)
    value.backward()
    assert x0_hat.grad is not None and torch.isfinite(x0_hat.grad).all() and x0_hat.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    assert all(not b.requires_grad for b in net.buffers())
    assert not net.training


def test_t_max_keeps_only_low_noise_samples(net: LPIPSVGG) -> None:
    x0_hat = _images(4, 32, seed=7).requires_grad_(True)
    x0 = _images(4, 32, seed=8)
    t = torch.tensor([0.1, 0.9, 0.5, 0.7])
    value = lpips_loss(net, x0_hat, x0, t, resize=1.0, t_max=0.6)
    with torch.no_grad():
        per_sample = net(x0_hat, x0)
    # Samples 0 and 2 have t < 0.6: the value is their mean, not a mean over all four.
    assert torch.allclose(value, per_sample[[0, 2]].mean())
    value.backward()
    assert x0_hat.grad is not None
    grad_per_sample = x0_hat.grad.abs().flatten(1).sum(1)
    assert (grad_per_sample[[0, 2]] > 0).all() and (grad_per_sample[[1, 3]] == 0).all()
    # Without a threshold every sample counts.
    assert torch.allclose(lpips_loss(net, x0_hat, x0, t, resize=1.0, t_max=None), per_sample.mean())


def test_t_max_with_no_contributing_sample_is_a_connected_zero(net: LPIPSVGG) -> None:
    x0_hat = _images(2, 32, seed=9).requires_grad_(True)
    value = lpips_loss(net, x0_hat, _images(2, 32, seed=10), torch.tensor([0.5, 0.8]), resize=1.0, t_max=0.2)
    assert value.shape == () and value.item() == 0.0
    assert value.requires_grad
    (0.1 * value).backward()
    assert x0_hat.grad is not None and torch.equal(x0_hat.grad, torch.zeros_like(x0_hat))


def test_resize_is_applied_to_both_images_before_the_network(net: LPIPSVGG) -> None:
    x0_hat, x0 = _images(2, 32, seed=11), _images(2, 32, seed=12)
    t = torch.tensor([0.2, 0.4])
    with torch.no_grad():
        resized = lpips_loss(net, x0_hat, x0, t, resize=0.5, t_max=None)
        by_hand = net(resize_images(x0_hat, 0.5), resize_images(x0, 0.5)).mean()
        full = lpips_loss(net, x0_hat, x0, t, resize=1.0, t_max=None)
    assert torch.equal(resized, by_hand)
    assert not torch.allclose(resized, full)


def test_too_small_images_are_an_error_not_a_silent_skip(net: LPIPSVGG) -> None:
    with pytest.raises(ValueError, match="at least 16 px"):
        lpips_loss(net, _images(1, 16, 0), _images(1, 16, 1), torch.tensor([0.5]), resize=0.5, t_max=None)
    with pytest.raises(ValueError, match="differ in shape"):
        net(_images(1, 16, 0), _images(1, 32, 1))


def test_head_dtype_does_not_depend_on_param_dtype(tmp_path: Path, weight_files: tuple[Path, Path]) -> None:
    """bf16_weights differs from bf16_mixed in weight storage only: the trunk runs in the frozen
    dtype (bf16 under both) and the head in fp32 under both, so the loss maths is the same."""
    dtypes = {}
    for policy in ("bf16_mixed", "bf16_weights", "fp32"):
        patch = _patch(weight_files)
        patch["precision"] = {"use": policy}
        trainer = make_trainer(tiny_recipe(tmp_path / policy, patch), tmp_path / f"run-{policy}")
        state = trainer.run.plugin_states["lpips"]
        trunk = {p.dtype for p in state.net.parameters()}
        dtypes[policy] = (trunk, state.head_dtype)
    assert dtypes["bf16_mixed"] == dtypes["bf16_weights"] == ({torch.bfloat16}, torch.float32)
    assert dtypes["fp32"] == ({torch.float32}, torch.float32)


def test_head_dtype_and_trunk_dtype(weight_files: tuple[Path, Path]) -> None:
    vgg, lin = weight_files
    net64 = load_lpips_vgg(str(vgg), str(lin), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in net64.parameters())
    a, b = _images(1, 16, 0), _images(1, 16, 1)
    assert net64(a, b).dtype == a.dtype  # head follows the inputs unless told otherwise
    assert net64(a, b, head_dtype=torch.float64).dtype == torch.float64


# --------------------------------------------------------------------------- loading


def test_random_vgg_weights_round_trip_bitwise(weight_files: tuple[Path, Path], net: LPIPSVGG) -> None:
    vgg_state, lin_state = random_vgg16_state(seed=0), random_lin_state(seed=0)
    loaded = net.state_dict()
    assert len(vgg_state) == 26  # 13 convolutions
    for name, tensor in vgg_state.items():
        assert torch.equal(loaded[name], tensor), name
    for k in range(5):
        assert torch.equal(loaded[f"lin{k}"], lin_state[f"lin{k}.model.1.weight"].flatten())


def test_pth_with_full_torchvision_keys_loads(tmp_path: Path, net: LPIPSVGG) -> None:
    state: dict[str, Any] = dict(random_vgg16_state(seed=0))
    # A full torchvision VGG16 also has classifier.* tensors; LPIPS ignores them.
    state["classifier.0.weight"] = torch.zeros(4, 3)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    lin = tmp_path / "lin.pth"
    torch.save(random_lin_state(seed=0), lin)
    other = load_lpips_vgg(str(path), str(lin))
    for (name, a), b in zip(other.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_loading_errors_name_the_problem(tmp_path: Path, weight_files: tuple[Path, Path]) -> None:
    vgg, lin = weight_files
    state = random_vgg16_state(seed=0)
    with pytest.raises(FileNotFoundError, match="vgg_weights file not found"):
        load_lpips_vgg(str(tmp_path / "nope.safetensors"), str(lin))
    bad_suffix = tmp_path / "vgg.npz"
    bad_suffix.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported file type ..npz.; use \.safetensors"):
        load_lpips_vgg(str(bad_suffix), str(lin))

    missing = {k: v for k, v in state.items() if k != "features.28.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing features\.28\.weight"):
        load_lpips_vgg(str(tmp_path / "missing.safetensors"), str(lin))

    wrong = dict(state, **{"features.0.weight": torch.zeros(64, 1, 3, 3)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"wrong shape features\.0\.weight \(64, 1, 3, 3\)"):
        load_lpips_vgg(str(tmp_path / "wrong.safetensors"), str(lin))

    batchnorm = dict(state, **{"features.1.running_mean": torch.zeros(64)})
    save_file(batchnorm, str(tmp_path / "bn.safetensors"))
    with pytest.raises(ValueError, match="vgg16_bn"):
        load_lpips_vgg(str(tmp_path / "bn.safetensors"), str(lin))

    negative = random_lin_state(seed=0)
    negative["lin2.model.1.weight"][0, 5] = -0.1
    save_file(negative, str(tmp_path / "neg.safetensors"))
    with pytest.raises(ValueError, match="lin2.model.1.weight has negative entries"):
        load_lpips_vgg(str(vgg), str(tmp_path / "neg.safetensors"))

    with pytest.raises(ValueError, match=r"missing lin0\.model\.1\.weight"):
        load_lpips_vgg(str(vgg), str(vgg))


def test_empty_lin_weights_use_the_lpips_package_file(weight_files: tuple[Path, Path]) -> None:
    pytest.importorskip("lpips")
    path = weights_mod.bundled_lin_path()
    assert path.parts[-3:] == ("weights", "v0.1", "vgg.pth")
    bundled = torch.load(path, map_location="cpu", weights_only=True)
    net = load_lpips_vgg(str(weight_files[0]), "")
    for k in range(5):
        assert torch.equal(net.state_dict()[f"lin{k}"], bundled[f"lin{k}.model.1.weight"].flatten())


def test_empty_lin_weights_without_lpips_package_asks_for_it(
    weight_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"'lpips' \(not installed\).*pip install lpips.*lin_weights"):
        load_lpips_vgg(str(weight_files[0]), "")


def test_empty_vgg_weights_load_torchvision_imagenet_from_the_hub_cache(
    tmp_path: Path, weight_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, net: LPIPSVGG
) -> None:
    # torch.hub only downloads when its cache lacks the file; seed the cache, then load with "".
    from torchvision.models import VGG16_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(random_vgg16_state(seed=0), cached)
    other = load_lpips_vgg("", str(weight_files[1]))
    for (name, a), b in zip(other.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_empty_vgg_weights_offline_fails_clearly(
    tmp_path: Path, weight_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def offline(url: str, **kwargs: Any) -> Any:
        calls.append((url, kwargs))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(
        RuntimeError, match=r"VGG16_Weights\.IMAGENET1K_V1.*Offline, set \[plugins\.lpips\] vgg_weights"
    ):
        load_lpips_vgg("", str(weight_files[1]))
    assert calls and calls[0][0].endswith("vgg16-397923af.pth") and calls[0][1]["weights_only"] is True


# --------------------------------------------------------------------------- recipe and hooks


def _patch(weight_files: tuple[Path, Path], **lpips: Any) -> dict[str, Any]:
    vgg, lin = weight_files
    table = {"resize": 1.0, "vgg_weights": str(vgg), "lin_weights": str(lin), **lpips}
    return {"objective": {"use": "x_prediction"}, "plugins": {"lpips": table}}


def test_check_rejects_lpips_without_x_prediction(tmp_path: Path) -> None:
    from prx_core.recipe import load

    path = write_recipe(tmp_path, {"plugins": {"lpips": {}}})  # objective stays flow_matching
    with pytest.raises(RecipeError, match=r"plugin 'lpips' requires objective:x_prediction"):
        load(path)
    assert prx_lpips.INFO.requires == ("objective:x_prediction", "latent_space:pixel")


def test_check_accepts_lpips_with_x_prediction_in_pixel_space(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, {"objective": {"use": "x_prediction"}, "plugins": {"lpips": {"t_max": 0.5}}})
    assert recipe.plugins["lpips"] == prx_lpips.LPIPSConfig(t_max=0.5)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"resize": 0.0}, "resize must be in"),
        ({"resize": 1.5}, "resize must be in"),
        ({"t_max": 0.0}, "t_max must be in"),
        ({"weight": -1.0}, "weight must be"),
        ({"layers": 3}, "unknown key 'plugins.lpips.layers'"),
    ],
)
def test_config_validation(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        tiny_recipe(tmp_path, {"objective": {"use": "x_prediction"}, "plugins": {"lpips": table}})


def test_setup_rejects_images_too_small_after_resize(tmp_path: Path, weight_files: tuple[Path, Path]) -> None:
    recipe = tiny_recipe(tmp_path, _patch(weight_files, resize=0.5))  # 16 px × 0.5 = 8 px
    with pytest.raises(RecipeError, match=r"data\.size 16 × resize 0\.5 = 8 px.*at least 16 px"):
        make_trainer(recipe, tmp_path / "run")


def test_trainer_step_adds_the_term_and_keeps_the_network_frozen_and_out_of_checkpoints(
    tmp_path: Path, weight_files: tuple[Path, Path]
) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path, _patch(weight_files, weight=0.5)), tmp_path / "run")
    run = trainer.run
    lpips_net = prx_lpips.loaded_network(run)
    assert not lpips_net.training
    assert all(not p.requires_grad for p in lpips_net.parameters())
    assert {p.dtype for p in lpips_net.parameters()} == {run.require("precision").frozen_dtype}
    assert {p.device for p in lpips_net.parameters()} == {run.device}
    # Not trainable, not in the optimizer, not in plugin checkpoint state.
    assert "lpips" not in run.require("trainable").extras
    trainable_ids = {id(p) for p in run.require("trainable").parameters()}
    assert not any(id(p) in trainable_ids for p in lpips_net.parameters())
    assert trainer.plugin_states() == {}

    loss, terms, _ = trainer.train_step(0)
    assert set(terms) == {"lpips"} and torch.isfinite(terms["lpips"]) and terms["lpips"] > 0
    assert all(p.grad is None for p in lpips_net.parameters())
    trainer.step = 1
    parts, _ = trainer.checkpoints.load(trainer.save())
    assert parts["plugins"] == {}
    assert set(parts["trainable"]) == set(run.require("trainable").state_dict())
    assert not any(k.startswith(("features.", "lin0")) or ".features." in k for k in parts["trainable"])


def test_term_value_is_the_lpips_of_x0_hat_against_x0(tmp_path: Path, weight_files: tuple[Path, Path]) -> None:
    from prx_core.keys import X0_PREDICTION

    trainer = make_trainer(tiny_recipe(tmp_path, _patch(weight_files, t_max=0.7)), tmp_path / "run")
    captured: dict[str, Any] = {}
    original = prx_lpips.prx_loss_terms

    def spy(step: Any) -> Any:
        captured["x0_hat"] = step.stash[X0_PREDICTION].detach().clone()
        captured["x0"] = step.x0_BCHW.clone()
        captured["t"] = step.t_B.clone()
        out = original(step)
        captured["value"] = out[0].value.detach()
        return out

    manager = trainer.recipe.active.manager
    plugin = manager.get_plugin("lpips")
    manager.unregister(plugin)
    try:
        import types

        shim = types.SimpleNamespace(prx_loss_terms=prx_lpips.hookimpl(spy))
        manager.register(shim, name="lpips_spy")
        trainer.train_step(0)
    finally:
        manager.unregister(name="lpips_spy")
        manager.register(plugin, name="lpips")
    keep = captured["t"] < 0.7
    with torch.no_grad():
        net = prx_lpips.loaded_network(trainer.run)
        expected = net(captured["x0_hat"][keep], captured["x0"][keep]).mean() if keep.any() else torch.zeros(())
    assert torch.allclose(captured["value"], expected, rtol=1e-5, atol=1e-7)


def test_readme_snippet_is_a_valid_recipe(tmp_path: Path) -> None:
    import tomllib

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    recipe = tiny_recipe(tmp_path, tomllib.loads(snippet))
    assert recipe.plugins["lpips"] == prx_lpips.LPIPSConfig(weight=0.1, resize=0.5)
    assert recipe.slots["objective"].use == "x_prediction"
