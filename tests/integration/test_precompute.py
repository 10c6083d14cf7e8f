"""``prx-run precompute`` end to end: shards from a tiny random FLUX VAE and MiniLM, training from them
without the towers in memory, resume after a crash, two processes, and the refusals."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from prx_core.testing.autoencoders import save_tiny_kl_vae  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.commands.precompute import Options, PrecomputeError, precompute  # noqa: E402
from prx_core.config import RecipeError  # noqa: E402
from prx_core.recipe import Recipe, deep_merge, dump_toml, load  # noqa: E402
from prx_core.shards import read_index  # noqa: E402
from prx_core.testing.fixtures import TINY_RECIPE, make_trainer, run_steps  # noqa: E402

from .test_cli import prx_run  # noqa: E402

pytestmark = pytest.mark.integration

#: A small indexed data source (the interface of ``prx_core.data.indexed.IndexedSource``): images
#: in two buckets, captions "long" and (for most items) "short", and chosen items that fail to
#: decode. Installed as a plugin into a temporary site directory so subprocesses find it too.
FAKE_INDEXED = '''
"""Test double of an indexed image source (prx_core.data.indexed.IndexedSource)."""
from dataclasses import dataclass, field
from typing import Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

INFO = PluginInfo(name="fake_indexed", summary="test double: an indexed image source")


@dataclass(frozen=True)
class Config:
    n: int = 24
    held_out: int = 4
    size: int = 16
    bad: list[int] = field(default_factory=list)


@dataclass
class Item:
    image_CHW: Any
    captions: dict
    name: str


class Source:
    caption_keys = ("long", "short")

    def __init__(self, config):
        self.config = config
        self.fingerprint = f"fake_indexed:n={config.n}:held_out={config.held_out}:bad={config.bad}"
        self.bad_seen = 0

    def bucket_of(self, index):
        side = self.config.size
        return (side, side) if index % 3 or index >= self.config.n else (side, 2 * side)

    def train_indices(self):
        return list(range(self.config.n))

    def held_out_indices(self):
        return list(range(self.config.n, self.config.n + self.config.held_out))

    def load(self, index):
        import torch

        if index in self.config.bad:
            self.bad_seen += 1
            return None
        height, width = self.bucket_of(index)
        image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1000 + index))
        captions = {"long": f"a long caption of picture {index}", "short": f"picture {index}"}
        if index % 5 == 4:
            del captions["short"]
        return Item(image, captions, f"img{index:04d}")

    def stats(self):
        return {"items": float(self.config.n), "bad_decode": float(self.bad_seen)}

    def batch(self, request):
        raise NotImplementedError("the double is only precomputed")

    def held_out_captions(self, n):
        return [f"a long caption of picture {i}" for i in self.held_out_indices()[:n]]

    def held_out(self, start, n):
        import torch

        from prx_core.slots import RawBatch

        items = [self.load(i) for i in self.held_out_indices()[start : start + n]]
        images = torch.stack([item.image_CHW for item in items])
        return RawBatch(images_BCHW=images, captions=[item.captions["long"] for item in items])


@hookimpl
def prx_register_data_sources(registry):
    registry.register("fake_indexed", lambda config, run: Source(config), Config)
'''


def write_recipe(directory: Path, patch: dict[str, Any]) -> Path:
    """The tiny recipe with ``patch`` merged in, except that ``data`` replaces the tiny data table."""
    tables = {k: v for k, v in TINY_RECIPE.items() if k != "data"}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.toml"
    path.write_text(dump_toml(deep_merge(tables, patch)), encoding="utf-8")
    return path


def tiny_recipe(directory: Path, patch: dict[str, Any]) -> Recipe:
    return load(write_recipe(directory, patch))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A site directory holding the fake_indexed plugin as an installed distribution."""
    root = tmp_path_factory.mktemp("site")
    (root / "prx_fake_indexed.py").write_text(FAKE_INDEXED, encoding="utf-8")
    dist = root / "prx_fake_indexed-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: prx-fake-indexed\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[prx]\nfake_indexed = prx_fake_indexed\n")
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("prx_fake_indexed", None)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random AutoencoderKL (3 channels at 2x), saved as flux_vae loads it."""
    root = tmp_path_factory.mktemp("flux_vae")
    save_tiny_kl_vae(root / "vae")
    return root


def _latent(vae_dir: Path) -> dict[str, Any]:
    return {"use": "flux_vae", "path": str(vae_dir), "channels": 3, "spatial_compression": 2}


def _source_patch(vae_dir: Path, **data: Any) -> dict[str, Any]:
    return {"latent_space": _latent(vae_dir), "data": {"use": "fake_indexed", "bad": [5], **data}}


def _train_patch(vae_dir: Path, out: Path, **data: Any) -> dict[str, Any]:
    return {"latent_space": _latent(vae_dir), "data": {"use": "precomputed", "path": str(out), **data}}


def _samples(out: Path) -> list[dict[str, Any]]:
    """Every stored sample as the shards hold it: id, name, bucket, shard, row and captions."""
    from prx_core.shards import ShardReader, read_samples

    index = read_index(out)
    table = read_samples(out, index)
    reader = ShardReader(out / "shards")
    samples = []
    columns = (table[c].tolist() for c in ("ids", "shard", "row", "caption_keys"))
    for sample_id, shard, row, mask in zip(*columns, strict=True):
        file = index["shards"][shard]["file"]
        keys = [k for bit, k in enumerate(index["caption_keys"]) if mask >> bit & 1]
        samples.append(
            {
                "id": sample_id,
                "name": reader.strings(file, "names", [row])[0],
                "bucket": tuple(index["shards"][shard]["bucket"]),
                "shard": shard,
                "row": row,
                "captions": {k: reader.strings(file, f"captions.{k}", [row])[0] for k in keys},
            }
        )
    return samples


def test_precompute_stores_the_posterior_every_caption_and_the_held_out_set(
    site: Path, vae_dir: Path, tmp_path: Path
) -> None:
    recipe = tiny_recipe(tmp_path / "r", _source_patch(vae_dir))
    index = precompute(recipe, Options(tmp_path / "out", dtype="float32", shard_size=5, batch_size=3))
    assert index is not None and index == read_index(tmp_path / "out")
    assert index["mode"] == "sample" and index["dtype"] == "float32"  # flux_vae samples its posterior
    samples = _samples(tmp_path / "out")
    assert [s["id"] for s in samples] == [i for i in range(24) if i != 5]
    assert index["skipped_ids"] == [5] and index["data_stats"] == {"items": 24.0, "bad_decode": 0.0}
    assert index["caption_keys"] == ["long", "short"] and index["text_shape"] == [16, 384]
    assert index["latent_space"] == {"use": "flux_vae", **{k: v for k, v in recipe.resolved()["latent_space"].items()}}
    assert set(index["plugin_versions"]) == {"prx_core", "flux_vae", "minilm", "fake_indexed"}
    assert index["held_out"]["count"] == 4 and index["held_out"]["ids"] == [24, 25, 26, 27]
    assert index["held_out"]["captions"][0] == "a long caption of picture 24"
    assert {tuple(s["bucket"]) for s in index["shards"]} == {(16, 16), (16, 32)}
    assert all(s["rows"] <= 5 for s in index["shards"])

    # A stored row is what the latent space and text encoder give for that item.
    from prx_core.shards import ShardReader

    trainer = make_trainer(recipe, tmp_path / "run")  # builds the same towers
    item = trainer.run.data.load(7)
    stored = samples[6]
    assert stored["id"] == 7 and stored["name"] == item.name
    assert stored["bucket"] == tuple(item.image_CHW.shape[-2:]) and stored["captions"] == item.captions
    shard, row = stored["shard"], stored["row"]
    reader = ShardReader(tmp_path / "out" / "shards")
    file = index["shards"][shard]["file"]
    mean, std = trainer.run.latent_space.encode_distribution(item.image_CHW[None])
    torch.testing.assert_close(reader.rows(file, "latents", [row]), mean)
    torch.testing.assert_close(reader.rows(file, "latent_std", [row]), std)
    states, mask = trainer.run.text_encoder.encoder.encode([item.captions["short"]])
    assert torch.equal(reader.rows(file, "mask.short", [row]), mask)
    torch.testing.assert_close(reader.rows(file, "text.short", [row]), states, atol=1e-5, rtol=1e-5)
    assert reader.rows(file, "ids", [row]).item() == 7
    # Item 9 has no short caption: zero states, nothing attended.
    shard9, row9 = samples[8]["shard"], samples[8]["row"]
    assert samples[8]["id"] == 9 and "short" not in samples[8]["captions"]
    assert reader.strings(index["shards"][shard9]["file"], "captions.short", [row9]) == [""]
    assert not reader.rows(index["shards"][shard9]["file"], "mask.short", [row9]).any()


def test_training_from_shards_never_loads_the_towers_until_sampling(site: Path, vae_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    precompute(tiny_recipe(tmp_path / "r", _source_patch(vae_dir)), Options(out, dtype="bfloat16", shard_size=8))
    recipe = tiny_recipe(
        tmp_path / "t",
        {
            **_train_patch(vae_dir, out, caption_weights={"long": 0.5, "short": 0.5}),
            "train": {"steps": 20, "checkpoint_every": 20},
        },
    )
    hidden = vae_dir.with_name(vae_dir.name + "-away")
    vae_dir.rename(hidden)  # the autoencoder cannot load: any use before sampling would fail
    try:
        trainer = make_trainer(recipe, tmp_path / "run")
        losses = run_steps(trainer, 20)
        assert all(torch.isfinite(torch.tensor(losses)))
        results = trainer.evaluate()  # validation loss from the stored held-out latents and states
        assert torch.isfinite(torch.tensor(results["eval/loss"]))
        assert not trainer.run.latent_space.loaded and not trainer.run.text_encoder.encoder.loaded
        assert trainer.run.text_encoder.misses == 0  # no caption was encoded
    finally:
        hidden.rename(vae_dir)
    images = trainer.generate(["a red square"], steps=2, cfg=2.0, seed=0, size=trainer.sample_size())
    assert images.shape == (1, 3, 16, 16)
    assert trainer.run.latent_space.loaded and trainer.run.text_encoder.encoder.loaded


def test_towers_load_at_setup_when_training_samples_or_evaluates(site: Path, vae_dir: Path, tmp_path: Path) -> None:
    # Grids or evaluations during training need the towers: loaded at setup, not hours into the run.
    out = tmp_path / "out"
    precompute(tiny_recipe(tmp_path / "r", _source_patch(vae_dir)), Options(out, shard_size=8))
    for name, train in (("sampling", {"sample_every": 10}), ("eval", {})):
        patch = {**_train_patch(vae_dir, out), "train": {"steps": 20, **train}}
        if name == "eval":
            patch["eval"] = {"every": 10, "num_samples": 2, "batch": 2}
        trainer = make_trainer(tiny_recipe(tmp_path / name, patch), tmp_path / f"run-{name}")
        assert trainer.run.latent_space.loaded and trainer.run.text_encoder.encoder.loaded, name


def test_training_from_shards_resumes_bitwise(site: Path, vae_dir: Path, tmp_path: Path) -> None:
    from prx_core.testing.fixtures import parameters_vector

    out = tmp_path / "out"
    precompute(tiny_recipe(tmp_path / "r", _source_patch(vae_dir)), Options(out, shard_size=8))
    recipe = tiny_recipe(tmp_path / "t", _train_patch(vae_dir, out, caption_weights={"long": 1.0, "short": 1.0}))
    first = make_trainer(recipe, tmp_path / "run")
    run_steps(first, 2)
    first.save()
    expected = run_steps(first, 2)
    second = make_trainer(recipe, tmp_path / "run", resume="auto")
    assert second.step == 2
    assert run_steps(second, 2) == expected
    assert torch.equal(parameters_vector(second), parameters_vector(first))
    # Another seed is another order (reference.md §7.6).
    reseeded = make_trainer(tiny_recipe(tmp_path / "s", {**_train_patch(vae_dir, out), "seed": 1}), tmp_path / "run2")
    request_ids = [first.run.data.batch(_request(0)).sample_ids, reseeded.run.data.batch(_request(0)).sample_ids]
    assert request_ids[0] != request_ids[1]


def test_read_ahead_gives_the_same_batches(site: Path, vae_dir: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from prx_core.builtins.precomputed import PrecomputedSource
    from prx_core.slots import BatchRequest

    out = tmp_path / "out"
    precompute(tiny_recipe(tmp_path / "r", _source_patch(vae_dir)), Options(out, shard_size=5))
    recipe = tiny_recipe(tmp_path / "t", _train_patch(vae_dir, out, caption_weights={"long": 0.5, "short": 0.5}))
    run = make_trainer(recipe, tmp_path / "run").run
    config = recipe.slot_config("data")
    plain, ahead = PrecomputedSource(replace(config, read_ahead=False), run), PrecomputedSource(config, run)

    def request(step: int, micro: int) -> BatchRequest:
        return BatchRequest(step=step, micro_step=micro, accumulation=2, rank=0, world_size=1, size=3, seed=0)

    # In order (each one read ahead), then a jump (the read-ahead is not used), then in order again.
    requests = [request(s, m) for s in range(4) for m in range(2)] + [request(9, 1), request(10, 0)]
    for r in requests:
        expected, got = plain.batch(r), ahead.batch(r)
        assert got.sample_ids == expected.sample_ids and got.captions == expected.captions
        for name in ("latents_BCHW", "latent_std_BCHW", "text_BLD", "mask_BL"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert ahead.read_ahead_hits == len(requests) - 2 and plain.read_ahead_hits == 0


def _request(step: int) -> Any:
    from prx_core.slots import BatchRequest

    return BatchRequest(step=step, micro_step=0, accumulation=1, rank=0, world_size=1, size=4, seed=0)


def test_stored_posterior_is_sampled_like_the_online_encoding(site: Path, vae_dir: Path, tmp_path: Path) -> None:
    """One step from shards sees the latents the online path would draw with the same generator."""
    from prx_core.data.order import OrderPlan
    from prx_core.seeding import generator_for
    from prx_core.slots import BatchRequest
    from prx_core.towers import batch_encodings

    out = tmp_path / "out"
    precompute(tiny_recipe(tmp_path / "r", _source_patch(vae_dir)), Options(out, dtype="float32"))
    trainer = make_trainer(tiny_recipe(tmp_path / "t", _train_patch(vae_dir, out)), tmp_path / "run")
    run = trainer.run
    request = BatchRequest(step=3, micro_step=0, accumulation=1, rank=0, world_size=1, size=4, seed=0)
    raw = run.data.batch(request)
    assert raw.images_BCHW is None and raw.latent_std_BCHW is not None and raw.features == {}
    x0, text, mask = batch_encodings(raw, run, generator_for(0, "probe"))
    positions = OrderPlan(run.data.bucket_ids, 4, run.data.seed).for_request(request)
    ids = [int(run.data.samples["ids"][p]) for p in positions]
    assert raw.sample_ids == ids
    images = torch.stack([_load(i) for i in ids])
    online = run.latent_space.encode(images, generator_for(0, "probe"))
    torch.testing.assert_close(x0, online, atol=1e-5, rtol=1e-5)
    assert text.shape == (4, 16, 384) and mask.shape == (4, 16)


def _load(index: int) -> torch.Tensor:
    import prx_fake_indexed

    return prx_fake_indexed.Source(prx_fake_indexed.Config()).load(index).image_CHW


def test_an_interrupted_precompute_resumes_to_the_same_index(
    site: Path, vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prx_core.shards

    recipe = tiny_recipe(tmp_path / "r", _source_patch(vae_dir))
    options = {"dtype": "float32", "shard_size": 3, "batch_size": 2}
    straight = precompute(recipe, Options(tmp_path / "straight", **options))
    real = prx_core.shards.write_tensors_atomic
    written: list[str] = []

    def crash_after_two(path: Path, *args: Any, **kwargs: Any) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real(path, *args, **kwargs)
        written.append(path.name)

    monkeypatch.setattr(prx_core.shards, "write_tensors_atomic", crash_after_two)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        precompute(recipe, Options(out, **options))
    assert not (out / "index.json").exists() and len(list((out / "shards").iterdir())) == 2
    done = written[:]
    written.clear()
    monkeypatch.setattr(
        prx_core.shards, "write_tensors_atomic", lambda p, *a, **k: (written.append(p.name), real(p, *a, **k))
    )
    resumed = precompute(recipe, Options(out, **options))
    assert not set(done) & set(written)  # committed shards were not redone
    assert resumed == straight
    for shard in straight["shards"]:
        a = (tmp_path / "straight" / "shards" / shard["file"]).read_bytes()
        assert a == (out / "shards" / shard["file"]).read_bytes()
    # Other settings on the same directory are refused, naming what changed.
    with pytest.raises(PrecomputeError, match="shard_size: 3 -> 4"):
        precompute(recipe, Options(out, **{**options, "shard_size": 4}))
    # So is a directory an older prx started in another shard format.
    settings = json.loads((out / "precompute.json").read_text())
    del settings["format_version"]
    (out / "precompute.json").write_text(json.dumps(settings))
    with pytest.raises(PrecomputeError, match="format_version: None -> 2"):
        precompute(recipe, Options(out, **options))


def test_refusals_name_the_problem(site: Path, vae_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PrecomputeError, match="data source 'synthetic_shapes' cannot be precomputed"):
        precompute(tiny_recipe(tmp_path / "s", {}), Options(tmp_path / "o1"))
    out = tmp_path / "out"
    precompute(tiny_recipe(tmp_path / "r", _source_patch(vae_dir)), Options(out, shard_size=12))
    other = {**_train_patch(vae_dir, out), "latent_space": {**_latent(vae_dir), "shift_factor": 0.0}}
    with pytest.raises(
        RecipeError, match=r"precomputed with \[latent_space\] .*shift_factor.: 0.1159.* this recipe has"
    ):
        make_trainer(tiny_recipe(tmp_path / "t", other), tmp_path / "run")
    with pytest.raises(RecipeError, match="eval.num_samples is 8, but .* stores 4 held-out items"):
        make_trainer(tiny_recipe(tmp_path / "t3", {**_train_patch(vae_dir, out), "eval": {"num_samples": 8}}), tmp_path)
    with pytest.raises(RecipeError, match="unknown caption key 'medium'"):
        make_trainer(
            tiny_recipe(tmp_path / "t2", _train_patch(vae_dir, out, caption_weights={"medium": 1.0})), tmp_path / "run2"
        )


def test_repa_trains_from_stored_teacher_tokens_without_its_teacher(site: Path, vae_dir: Path, tmp_path: Path) -> None:
    from prx_core.vision import write_random_weights

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    weights = write_random_weights("dinov2_vitl14_reg", tmp_path / "teacher.safetensors", overrides=tiny)
    repa = {"repa": {"layer": 0, "projector_dim": 16, "weights": str(weights), "encoder_overrides": tiny}}
    out = tmp_path / "out"
    index = precompute(tiny_recipe(tmp_path / "r", {**_source_patch(vae_dir), "plugins": repa}), Options(out))
    assert index is not None and index["feature_plugins"] == ["repa"]
    # 16-px images, 2x autoencoder, patch 4 -> a 2x2 grid; the wide bucket 2x4.
    assert index["features"] == {"repa:dinov2_vitl14_reg:2x2": [4, 32], "repa:dinov2_vitl14_reg:2x4": [8, 32]}
    trainer = make_trainer(
        tiny_recipe(tmp_path / "t", {**_train_patch(vae_dir, out), "plugins": repa}), tmp_path / "run"
    )
    assert "repa" not in trainer.run.plugin_states  # the teacher was never loaded
    losses = run_steps(trainer, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "repa" not in trainer.run.plugin_states


def _env(site: Path) -> dict[str, str]:
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def test_prx_run_precompute_then_train_twenty_steps_from_the_shards(vae_dir: Path, tmp_path: Path) -> None:
    """The real pipeline: an image folder with every kind of bad file, precomputed, then trained on."""
    from prx_core.testing.image_data import read_manifest, write_image_folder

    root = write_image_folder(tmp_path / "images", n=60, corrupt=True, seed=0)
    data = {
        "use": "image_folder",
        "root": str(root),
        "size": 32,
        "caption_weights": {"long": 0.7, "short": 0.3},
        "held_out": 4,
        "max_skip_ratio": 0.5,
        "index_cache": "off",
    }
    source = tiny_recipe(tmp_path / "r", {"latent_space": _latent(vae_dir), "data": data})
    precompute(source, Options(tmp_path / "out", shard_size=16))  # in-process: the CLI path is tested below
    index = read_index(tmp_path / "out")
    skipped = sum(1 for item in read_manifest(root)["items"].values() if str(item["expect"]).startswith("skipped/"))
    assert index["samples"]["count"] == 60 - 4 - skipped
    assert sum(v for k, v in index["data_stats"].items() if k.startswith("skipped/")) + index["skipped_at_encode"] > 0
    assert index["caption_keys"] == ["long", "short"] and index["held_out"]["count"] == 4
    # The recipe precompute writes next to the shards: the source recipe, training from them.
    steps = ["--set", "train.steps=20", "--set", "train.checkpoint_every=20", "--set", "train.log_every=5"]
    result = prx_run("out/train.toml", "--run-dir", "run", *steps, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert "finished step 20" in result.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [5, 10, 15, 20]
    assert (tmp_path / "run" / "samples" / "step_00000020.png").is_file()  # towers loaded on demand
    assert "eval/loss" in lines[-1]

    # Two gloo ranks train from the same shards (each reading ahead its own share); dropping the
    # last checkpoint and resuming replays the same losses.
    import shutil

    two = ["--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]
    two += ["--set", "train.sample_every=0", "--set", "eval.at_end=false"]
    prx_run("out/train.toml", "--run-dir", "run2", *two, cwd=tmp_path, nproc=2)
    first = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in first if "loss" in x]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    shutil.rmtree(tmp_path / "run2" / "checkpoints" / "step_00000004")
    prx_run("out/train.toml", "--run-dir", "run2", "--resume", "auto", *two, cwd=tmp_path, nproc=2)
    again = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in again if "loss" in x] == losses


def test_two_processes_precompute_the_same_samples_as_one(site: Path, vae_dir: Path, tmp_path: Path) -> None:
    source = write_recipe(tmp_path / "r", _source_patch(vae_dir))
    result = prx_run(
        "precompute", str(source), "--out", "out2", "--shard-size", "4", cwd=tmp_path, nproc=2, env=_env(site)
    )
    assert result.stdout.count("samples in") == 1  # rank 0 reports
    two = read_index(tmp_path / "out2")
    one = precompute(tiny_recipe(tmp_path / "r1", _source_patch(vae_dir)), Options(tmp_path / "out1", shard_size=4))
    assert one is not None
    stored_two, stored_one = _samples(tmp_path / "out2"), _samples(tmp_path / "out1")
    assert [(s["id"], s["name"], s["captions"]) for s in stored_two] == [
        (s["id"], s["name"], s["captions"]) for s in stored_one
    ]
    assert {s["file"][:4] for s in two["shards"]} == {"r000", "r001"}
    assert two["world_size"] == 2 and two["skipped_ids"] == one["skipped_ids"] == [5]
