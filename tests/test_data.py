"""The training dataset: captions, templates, image decoding, buckets, latent cache and batches."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ti_core.data import (
    BACKGROUND,
    BUILTIN_TEMPLATES,
    DataConfig,
    bucket_sizes,
    check_batch_size,
    encode_dataset,
    load_template,
    open_image,
    render_prompt,
    scan_images,
    split_tags,
    to_rgb,
)


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random-content image (so different images give different latents)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def config(folder: Path, **overrides) -> DataConfig:
    return DataConfig(images=folder, **{"resolution": 32, **overrides})


def encode(tiny_models, data_config: DataConfig, cache_dir: Path | None = None, **kwargs):
    items = scan_images(data_config).items
    return encode_dataset(tiny_models["sd1"], data_config, items, cache_dir=cache_dir, device="cpu", **kwargs)


def folder_of(tmp_path: Path, count: int, size=(32, 32), name: str = "images") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for index in range(count):
        noise_image(*size, seed=index).save(folder / f"{index:03d}-image {index}.png")
    return folder


# --- captions and templates -----------------------------------------------------------------------------


def test_captions_come_from_the_sidecar_text_else_the_file_name(tmp_path):
    for name in ["00012-a red car.png", "photo (2).jpg", "0042.png", "cat.webp", "dog.BMP"]:
        noise_image(32, 32).save(tmp_path / name)
    (tmp_path / "cat.txt").write_text("  a cat,\nsitting on a mat \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")
    captions = {item.path.name: item.caption for item in scan_images(config(tmp_path)).items}
    assert captions == {
        "00012-a red car.png": "a red car",
        "photo (2).jpg": "photo (2)",
        "0042.png": "",
        "cat.webp": "a cat, sitting on a mat",
        "dog.BMP": "dog",
    }


def test_recursive_scan_finds_images_in_subfolders(tmp_path):
    (tmp_path / "sub").mkdir()
    noise_image(32, 32).save(tmp_path / "top.png")
    noise_image(32, 32).save(tmp_path / "sub" / "inner.png")
    assert [item.path.name for item in scan_images(config(tmp_path)).items] == ["top.png"]
    assert {item.path.name for item in scan_images(config(tmp_path, recursive=True)).items} == {"top.png", "inner.png"}


def test_builtin_templates_are_the_a1111_ones():
    assert set(BUILTIN_TEMPLATES) == {"subject", "subject_filewords", "style", "style_filewords", "none"}
    subject, style = load_template("subject"), load_template("style")
    assert (len(subject), len(style)) == (27, 19)
    assert subject[0] == "a photo of a [name]" and style[0] == "a painting, art by [name]"
    assert load_template("subject_filewords") == [line + ", [filewords]" for line in subject]
    assert len(load_template("style_filewords")) == 19
    assert all("[filewords]" in line and "[name]" in line for line in load_template("style_filewords"))
    assert load_template("none") == ["picture"]
    assert load_template("style_filewords.txt") == load_template("style_filewords")


def test_custom_template_file_and_template_errors(tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("a [name] toy, [filewords]\n\n  [name] on a shelf  \n", encoding="utf-8")
    assert load_template(custom) == ["a [name] toy, [filewords]", "[name] on a shelf"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_template(empty)
    with pytest.raises(ValueError, match="no built-in template or file"):
        load_template(tmp_path / "missing.txt")


def test_render_prompt_fills_name_and_filewords():
    rng = random.Random(0)
    line = "a photo of a [name], [filewords]"
    rendered = render_prompt(line, "my-toy", "red, shiny", shuffle_tags=False, tag_dropout=0.0, rng=rng)
    assert rendered == "a photo of a my-toy, red, shiny"
    assert render_prompt("picture", "my-toy", "red", shuffle_tags=True, tag_dropout=0.5, rng=rng) == "picture"


tags_strategy = st.lists(st.text(alphabet="abcdefgh xyz", min_size=1, max_size=8).filter(str.strip), max_size=8)


@settings(max_examples=200, deadline=None)
@given(tags=tags_strategy, dropout=st.floats(0.0, 1.0), seed=st.integers(0, 2**32), shuffle=st.booleans())
def test_shuffle_keeps_the_tags_and_dropout_never_drops_them_all(tags, dropout, seed, shuffle):
    caption = ", ".join(tags)
    rendered = render_prompt(
        "[filewords]", "x", caption, shuffle_tags=shuffle, tag_dropout=dropout, rng=random.Random(seed)
    )
    kept = split_tags(rendered)
    original = Counter(split_tags(caption))
    assert not Counter(kept) - original  # only tags of the caption, never more often than there
    if original:
        assert kept  # at least one tag survives any dropout
    if dropout == 0.0:
        assert Counter(kept) == original  # shuffling alone keeps every tag
    # Same rng state, same prompt: the loop can reproduce a run.
    again = render_prompt(
        "[filewords]", "x", caption, shuffle_tags=shuffle, tag_dropout=dropout, rng=random.Random(seed)
    )
    assert again == rendered


def test_tag_dropout_drops_tags_at_roughly_its_rate():
    caption = ", ".join(f"tag{index}" for index in range(20))
    rng = random.Random(1)
    kept = [
        len(split_tags(render_prompt("[filewords]", "x", caption, shuffle_tags=False, tag_dropout=0.25, rng=rng)))
        for _ in range(200)
    ]
    assert 13 < sum(kept) / len(kept) < 17  # 20 tags x 0.75


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [31, 2056, 100, 0, 24, 512.0, True])
def test_bad_resolutions_are_rejected_with_one_clear_line(tmp_path, resolution):
    with pytest.raises(ValueError, match="resolution must be a multiple of 8 from 32 to 2048") as error:
        DataConfig(images=tmp_path, resolution=resolution)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("resolution", [32, 64, 520, 2048])
def test_good_resolutions_are_accepted(tmp_path, resolution):
    assert DataConfig(images=str(tmp_path), resolution=resolution).images == tmp_path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tag_dropout": 1.5}, "tag_dropout"),
        ({"repeats": 0}, "repeats"),
        ({"latent_sampling": "sometimes"}, "latent_sampling"),
        ({"template": " "}, "template"),
        ({"images": ""}, "images"),
    ],
)
def test_bad_settings_are_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"images": tmp_path, **overrides})


# --- image decoding -------------------------------------------------------------------------------------------


def test_exif_rotated_image_comes_out_upright(tmp_path, tiny_models):
    stored = Image.new("RGB", (64, 32), (255, 0, 0))  # stored sideways: left half red, right half blue
    stored.paste((0, 0, 255), (32, 0, 64, 32))
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": red ends up on top
    stored.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    (item,) = scan_images(config(tmp_path)).items
    assert item.size == (32, 64)
    upright, _ = open_image(item.path)
    top, bottom = upright.getpixel((16, 8)), upright.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    dataset = encode(tiny_models, config(tmp_path, latent_sampling="deterministic"))
    (batch,) = dataset.batches(1, seed=0, epoch=0)
    # Centre crop of the upright 32x64 image: rows 16..48 of the resized image, no column offset.
    assert batch.time_ids.tolist() == [[64, 32, 16, 0, 32, 32]]


def _save_mode(folder: Path, name: str, image: Image.Image, **options) -> Path:
    path = folder / name
    image.save(path, **options)
    return path


def test_every_image_mode_loads_as_rgb(tmp_path):
    gray16 = Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16))  # 50 % grey in 16 bits
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    paths = [
        _save_mode(tmp_path, "gray.png", Image.new("L", (32, 32), 77)),
        _save_mode(tmp_path, "bilevel.png", Image.new("1", (32, 32), 1)),
        _save_mode(tmp_path, "palette.png", palette),
        _save_mode(tmp_path, "palette_transparent.png", palette, transparency=0),
        _save_mode(tmp_path, "cmyk.jpg", Image.new("CMYK", (32, 32), (0, 255, 255, 0))),
        _save_mode(tmp_path, "gray16.png", gray16),
        _save_mode(tmp_path, "la.png", Image.new("LA", (32, 32), (90, 128))),
        _save_mode(tmp_path, "rgba.webp", Image.new("RGBA", (32, 32), (0, 0, 255, 255)), lossless=True),
        _save_mode(tmp_path, "rgb.bmp", Image.new("RGB", (32, 32), (1, 2, 3))),
    ]
    result = scan_images(config(tmp_path))
    assert result.skipped == [] and len(result.items) == len(paths)
    loaded = {path.name: open_image(path) for path in paths}
    assert all(rgb.mode == "RGB" and rgb.size == (32, 32) for rgb, _ in loaded.values())
    assert loaded["gray.png"][0].getpixel((0, 0)) == (77, 77, 77)
    assert loaded["palette.png"][0].getpixel((0, 0)) == (10, 200, 30)
    red = loaded["cmyk.jpg"][0].getpixel((0, 0))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert loaded["gray16.png"][0].getpixel((0, 0)) == (128, 128, 128)  # not clipped to white
    assert loaded["rgba.webp"][1] is None  # fully opaque alpha is no alpha
    assert loaded["palette_transparent.png"][1] is None  # the transparent index is not used
    la_rgb, la_alpha = loaded["la.png"]
    assert la_alpha.getpixel((0, 0)) == 128  # 50 % grey-ish over white:
    assert abs(la_rgb.getpixel((0, 0))[0] - (90 * 128 + 255 * 127) / 255) <= 1


def test_32_bit_and_16_bit_in_memory_modes_are_scaled_not_clipped():
    for mode in ("I", "I;16"):
        rgb, alpha = to_rgb(Image.new(mode, (4, 4), 65535))
        assert rgb.getpixel((0, 0)) == (255, 255, 255) and alpha is None
        rgb, _ = to_rgb(Image.new(mode, (4, 4), 257 * 10))
        assert rgb.getpixel((0, 0)) == (10, 10, 10)


def test_transparent_pixels_are_composited_on_the_background(tmp_path):
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # invisible junk red
    image.paste((0, 255, 0, 255), (16, 0, 32, 32))
    image.save(tmp_path / "cutout.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0] + [0] * 765)
    palette.save(tmp_path / "palette.png", transparency=0)
    rgb, alpha = open_image(tmp_path / "cutout.png")
    assert rgb.getpixel((0, 0)) == BACKGROUND and rgb.getpixel((20, 0)) == (0, 255, 0)
    assert alpha.getpixel((0, 0)) == 0 and alpha.getpixel((20, 0)) == 255
    rgb, alpha = open_image(tmp_path / "palette.png")
    assert rgb.getpixel((0, 0)) == BACKGROUND and alpha.getpixel((0, 0)) == 0


def test_alpha_weight_map_is_alpha_per_latent_cell(tmp_path, tiny_models):
    image = Image.new("RGBA", (32, 32), (200, 10, 10, 255))
    image.putalpha(Image.new("L", (32, 32), 0))
    image.paste((200, 10, 10, 255), (16, 0, 32, 32))  # right half opaque
    image.paste((200, 10, 10, 128), (12, 0, 16, 32))  # half-transparent strip inside latent column 1
    image.save(tmp_path / "a_cutout.png")
    noise_image(32, 32).save(tmp_path / "b_opaque.png")
    dataset = encode(tiny_models, config(tmp_path, alpha_weight=True, latent_sampling="deterministic"))
    (batch,) = dataset.batches(2, seed=0, epoch=0)
    weights = dict(zip(batch.indices, batch.weights, strict=True))
    assert batch.weights.shape == (2, 1, 4, 4)
    assert torch.all((batch.weights >= 0) & (batch.weights <= 1))
    cutout = weights[0][0]
    assert torch.equal(cutout[:, 0], torch.zeros(4)) and torch.equal(cutout[:, 2:], torch.ones(4, 2))
    assert torch.allclose(cutout[:, 1], torch.full((4,), 128 / 255 / 2))
    assert torch.equal(weights[1], torch.ones(1, 4, 4))
    unweighted = encode(tiny_models, config(tmp_path, latent_sampling="deterministic"))
    assert next(unweighted.batches(2, seed=0, epoch=0)).weights is None


# --- unreadable files and empty or small datasets --------------------------------------------------------------


def test_unreadable_files_are_skipped_and_reported(tmp_path):
    noise_image(32, 32).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("I am not a picture", encoding="utf-8")
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    noise_image(64, 64).save(tmp_path / "photo.jpg", quality=90)
    jpeg = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    result = scan_images(config(tmp_path))
    assert [item.path.name for item in result.items] == ["good.png", "photo.jpg"]
    reasons = {path.name: reason for path, reason in result.skipped}
    assert set(reasons) == {"empty.png", "text.png", "truncated.png", "truncated.jpg"}
    assert reasons["empty.png"] == "empty file"
    assert reasons["text.png"] == "not an image Pillow can read"
    assert reasons["truncated.png"].startswith("cannot decode") and reasons["truncated.jpg"].startswith(
        "cannot decode"
    )
    assert "2 images, 4 skipped" in result.summary()


def test_folders_without_usable_images_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        scan_images(config(tmp_path / "missing"))
    (tmp_path / "sub").mkdir()
    noise_image(32, 32).save(tmp_path / "sub" / "deep.png")
    with pytest.raises(ValueError, match="no images .* subfolders are searched only with recursive on"):
        scan_images(config(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no readable images .*1 skipped \(broken.png: empty file\)"):
        scan_images(config(tmp_path))


def test_batch_size_larger_than_the_epoch_is_a_clear_error(tmp_path, tiny_models):
    dataset = encode(tiny_models, config(folder_of(tmp_path, 3)))
    with pytest.raises(ValueError, match="batch size 4 is too large for the dataset: 3 images x 1 repeats"):
        next(dataset.batches(4, seed=0, epoch=0))
    with pytest.raises(ValueError, match="too large"):
        check_batch_size(dataset, 2, world_size=2)
    with pytest.raises(ValueError, match="at least 1"):
        check_batch_size(dataset, 0)
    repeated = encode(tiny_models, config(tmp_path / "images", repeats=2))
    assert len(list(repeated.batches(4, seed=0, epoch=0))) == 1  # 6 samples: one full batch of 4


def test_batch_size_counts_per_bucket(tmp_path, tiny_models):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index in range(2):
        noise_image(64, 64, seed=index).save(folder / f"square{index}.png")
        noise_image(128, 64, seed=10 + index).save(folder / f"wide{index}.png")
    dataset = encode(tiny_models, config(folder, resolution=64, buckets=True))
    with pytest.raises(ValueError, match="2 size buckets \\(the largest holds 2 samples\\)"):
        check_batch_size(dataset, 3)  # four images, but no bucket fills a batch of 3


# --- sizes, buckets and flips ----------------------------------------------------------------------------------


def test_bucket_sizes_respect_area_and_step():
    for resolution, step in [(64, 8), (512, 64), (1024, 64)]:
        sizes = bucket_sizes(resolution)
        assert (resolution, resolution) in sizes
        assert all(w % step == 0 and h % step == 0 and w * h <= resolution**2 for w, h in sizes)
        assert all((h, w) in sizes for w, h in sizes)


def test_buckets_group_samples_of_one_size_per_batch(tmp_path, tiny_models):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index in range(4):
        noise_image(64, 64, seed=index).save(folder / f"square{index}.png")
        noise_image(128, 64, seed=10 + index).save(folder / f"wide{index}.png")
    dataset = encode(tiny_models, config(folder, resolution=64, buckets=True))
    assert dataset.bucket_counts() == {(64, 64): 4, (88, 40): 4}
    shapes = set()
    for epoch in range(3):
        for batch in dataset.batches(2, seed=5, epoch=epoch):
            names = {dataset.items[index].path.name[:4] for index in batch.indices}
            assert len(names) == 1  # never a square and a wide image together
            shapes.add(tuple(batch.latents.shape))
    assert shapes == {(2, 4, 8, 8), (2, 4, 5, 11)}


def test_flip_variant_is_the_latent_of_the_mirrored_image(tmp_path, tiny_models):
    image = noise_image(32, 32, seed=3)
    folder, mirrored = tmp_path / "a", tmp_path / "b"
    folder.mkdir()
    mirrored.mkdir()
    image.save(folder / "x.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / "x.png")
    flipping = encode(tiny_models, config(folder, flip=True, latent_sampling="deterministic"))
    reference = encode(tiny_models, config(mirrored, latent_sampling="deterministic"))
    assert flipping.cache_misses == 2  # the image and its mirror, each encoded once
    assert torch.allclose(flipping.latent(0, flip=True), reference.latent(0), atol=1e-5)
    assert not torch.allclose(flipping.latent(0, flip=False), reference.latent(0), atol=1e-3)
    seen = {
        flip for epoch in range(10) for batch in flipping.batches(1, seed=0, epoch=epoch) for flip in batch.flipped
    }
    assert seen == {False, True}


def test_flipped_samples_report_a_mirrored_crop(tmp_path, tiny_models):
    noise_image(71, 32).save(tmp_path / "wide.png")  # 39 px to spare: crop from 19, or from 20 mirrored
    dataset = encode(tiny_models, config(tmp_path, flip=True, latent_sampling="deterministic"))
    seen = {}
    for epoch in range(10):
        for batch in dataset.batches(1, seed=0, epoch=epoch):
            seen[batch.flipped[0]] = batch.time_ids[0].tolist()
    assert seen == {False: [32, 71, 0, 19, 32, 32], True: [32, 71, 0, 20, 32, 32]}


# --- encoding and the latent cache ------------------------------------------------------------------------------


def all_latents(dataset) -> list[torch.Tensor]:
    flips = (False, True) if dataset.config.flip else (False,)
    return [dataset.latent(index, flip) for index in range(len(dataset)) for flip in flips]


def test_latent_cache_hits_on_the_second_run_with_identical_latents(tmp_path, tiny_models):
    folder, cache = folder_of(tmp_path, 3), tmp_path / "cache"
    calls = []
    first = encode(tiny_models, config(folder), cache, progress=lambda done, total: calls.append((done, total)))
    assert (first.cache_hits, first.cache_misses) == (0, 3)
    assert calls[-1] == (3, 3)
    assert len(list(cache.glob("*.safetensors"))) == 3 and not list(cache.glob("*.tmp"))
    second = encode(tiny_models, config(folder), cache)
    assert (second.cache_hits, second.cache_misses) == (3, 0)
    assert all(torch.equal(a, b) for a, b in zip(all_latents(first), all_latents(second), strict=True))
    # Without a cache directory nothing is reused.
    assert encode(tiny_models, config(folder)).cache_misses == 3


def test_latent_cache_misses_when_content_resolution_or_flip_change(tmp_path, tiny_models):
    folder, cache = folder_of(tmp_path, 3), tmp_path / "cache"
    encode(tiny_models, config(folder), cache)
    noise_image(32, 32, seed=99).save(folder / "001-image 1.png")  # same name, new content
    changed = encode(tiny_models, config(folder), cache)
    assert (changed.cache_hits, changed.cache_misses) == (2, 1)
    larger = encode(tiny_models, config(folder, resolution=64), cache)
    assert (larger.cache_hits, larger.cache_misses) == (0, 3)
    flipped = encode(tiny_models, config(folder, flip=True), cache)
    assert (flipped.cache_hits, flipped.cache_misses) == (3, 3)  # the unflipped latents are reused


def test_a_different_vae_misses_the_cache(tmp_path, tiny_models):
    folder, cache = folder_of(tmp_path, 2), tmp_path / "cache"
    encode(tiny_models, config(folder), cache)
    items = scan_images(config(folder)).items
    other = encode_dataset(tiny_models["sdxl"], config(folder), items, cache_dir=cache, device="cpu")
    assert other.cache_hits == 0  # same architecture of VAE, but its own random weights


def test_corrupt_cache_file_is_re_encoded(tmp_path, tiny_models):
    folder, cache = folder_of(tmp_path, 1), tmp_path / "cache"
    first = encode(tiny_models, config(folder, latent_sampling="deterministic"), cache)
    (cached,) = cache.glob("*.safetensors")
    cached.write_bytes(b"garbage")
    again = encode(tiny_models, config(folder, latent_sampling="deterministic"), cache)
    assert again.cache_misses == 1 and torch.equal(again.latent(0), first.latent(0))


def test_fp16_request_encodes_in_fp32_and_leaves_the_vae_as_it_was(tmp_path, tiny_models):
    folder = folder_of(tmp_path, 1)
    vae = tiny_models["sd1"].vae
    fp32 = encode(tiny_models, config(folder, latent_sampling="deterministic"))
    fp16 = encode(tiny_models, config(folder, latent_sampling="deterministic"), dtype=torch.float16)
    assert torch.equal(fp16.latent(0), fp32.latent(0))
    assert next(vae.parameters()).dtype == torch.float32
    scale = vae.config.scaling_factor
    pixels = torch.from_numpy(np.array(noise_image(32, 32), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(pixels[None]).latent_dist.mean[0]
    assert torch.allclose(fp32.latent(0), mean * scale, atol=1e-5)  # scaled by the VAE's scaling_factor


def test_latent_sampling_methods(tmp_path, tiny_models):
    folder, cache = folder_of(tmp_path, 2), tmp_path / "cache"

    def epoch_latents(dataset, epoch):
        return {
            index: latent
            for batch in dataset.batches(1, seed=0, epoch=epoch)
            for index, latent in zip(batch.indices, batch.latents, strict=True)
        }

    deterministic = encode(tiny_models, config(folder, latent_sampling="deterministic"), cache)
    once = encode(tiny_models, config(folder, latent_sampling="once"), cache)
    random_ = encode(tiny_models, config(folder, latent_sampling="random"), cache)
    assert (once.cache_hits, random_.cache_hits) == (2, 2)  # one cache serves every method
    for dataset, same_each_epoch in [(deterministic, True), (once, True), (random_, False)]:
        a, b = epoch_latents(dataset, 0), epoch_latents(dataset, 1)
        assert all(torch.equal(a[i], b[i]) == same_each_epoch for i in a)
        assert all(torch.equal(a[i], epoch_latents(dataset, 0)[i]) for i in a)  # same (seed, epoch), same batch
    mean = deterministic.latent(0)
    assert not torch.equal(once.latent(0), mean)  # "once" is a draw, not the mean
    fresh_once = encode(tiny_models, config(folder, latent_sampling="once"))
    assert torch.equal(fresh_once.latent(0), once.latent(0))  # the same draw whether cached or not


# --- batches -----------------------------------------------------------------------------------------------------


def test_batches_are_deterministic_per_seed_and_epoch_and_cover_every_repeat(tmp_path, tiny_models):
    dataset = encode(tiny_models, config(folder_of(tmp_path, 6), repeats=2))
    order = [batch.indices for batch in dataset.batches(3, seed=7, epoch=0)]
    assert order == [batch.indices for batch in dataset.batches(3, seed=7, epoch=0)]
    assert order != [batch.indices for batch in dataset.batches(3, seed=7, epoch=1)]
    assert Counter(index for indices in order for index in indices) == {index: 2 for index in range(6)}
    batch = next(dataset.batches(3, seed=7, epoch=0))
    assert batch.latents.dtype == torch.float32 and batch.latents.shape == (3, 4, 4, 4)
    assert batch.captions == [dataset.captions[index] for index in batch.indices]
    assert batch.captions[0].startswith("image ")  # raw filewords, not a rendered prompt
    assert batch.time_ids.shape == (3, 6) and batch.time_ids[0].tolist() == [32, 32, 0, 0, 32, 32]


def test_ranks_get_disjoint_equal_shares_of_the_epoch(tmp_path, tiny_models):
    dataset = encode(tiny_models, config(folder_of(tmp_path, 7), repeats=2))  # 14 samples: 7 batches of 2
    single = [batch.indices for batch in dataset.batches(2, seed=3, epoch=4)]
    shares = [[batch.indices for batch in dataset.batches(2, seed=3, epoch=4, rank=r, world_size=3)] for r in range(3)]
    assert [len(share) for share in shares] == [2, 2, 2]  # 7 batches: the 7th is dropped so ranks stay in step
    assert dataset.batches_per_epoch(2, world_size=3) == 2
    interleaved = [shares[position % 3][position // 3] for position in range(6)]
    assert interleaved == single[:6]  # together the ranks cover the single-process epoch, no batch twice
    with pytest.raises(ValueError, match="rank"):
        next(dataset.batches(2, seed=0, epoch=0, rank=3, world_size=3))
