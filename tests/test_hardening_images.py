"""Issue 22 (images): training images load as they look (16-bit greyscale, EXIF orientation), and
every refusal or skip names the file. Test images are built here with PIL and numpy."""
import os

import numpy as np
import pytest
from PIL import Image

from seqlora_core.app.images import load_images, load_images_and_masks, upright_rgb_ready
from seqlora_core.errors import InputError


def test_a_16_bit_greyscale_png_loads_as_grey_levels_not_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # PIL writes 'I;16' as a 16-bit greyscale PNG
    pixels = load_images([path], 16, fit="stretch")
    assert float(pixels.min()) < -0.9 and float(pixels.max()) > 0.9
    assert abs(float(pixels.mean())) < 0.1  # a ramp from black to white averages mid grey
    assert float((pixels[:, 0] - pixels[:, 2]).abs().max()) == 0  # grey: R = G = B


@pytest.mark.parametrize("mode,top", [("I;16", 65535), ("I", 65535), ("F", 1.0)])
def test_wide_greyscale_modes_scale_to_8_bit(mode, top):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    arr = np.array([[0, top / 2, top]], dtype=np.float64).astype(dtype)
    img = Image.fromarray(arr, mode) if mode != "I;16" else Image.fromarray(arr)
    out = np.asarray(upright_rgb_ready(img).convert("RGB"))[0, :, 0]
    assert list(out) == [0, 128, 255] or list(out) == [0, 127, 255]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # stored: red left, blue right
    arr[:, 10:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": red ends up on top
    path = tmp_path / "phone.png"
    img.save(path, exif=exif)
    px = load_images([path], 16, fit="stretch")[0]
    assert float(px[0, :4].mean()) > 0.9 and float(px[0, -4:].mean()) < -0.9  # red on top, not on the left
    assert float((px[:, :, 0] - px[:, :, -1]).abs().max()) < 1e-6  # left and right columns alike


def test_an_image_too_large_to_decode_is_one_sentence_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (40, 40), (10, 20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 × 100: PIL's bomb refusal
    with pytest.raises(InputError) as err:
        load_images([tmp_path], 16)
    assert "huge.png" in str(err.value) and "\n" not in str(err.value)


def test_a_folder_or_link_loop_named_like_an_image_is_skipped_with_a_warning(tmp_path):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "good.png")
    (tmp_path / "album.png").mkdir()
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    (tmp_path / "masks").mkdir()  # an ordinary sub-folder: passed over quietly
    warnings = []
    pixels = load_images([tmp_path], 8, warn=warnings.append)
    assert len(pixels) == 1
    assert len(warnings) == 2
    assert any("album.png" in w and "folder" in w for w in warnings)
    assert any("loop.jpg" in w and "link" in w for w in warnings)


def test_a_fully_transparent_png_is_named(tmp_path):
    Image.new("RGBA", (8, 8), (200, 0, 0, 255)).save(tmp_path / "a.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "ghost.png")
    with pytest.raises(InputError) as err:
        load_images_and_masks([tmp_path], 8)
    assert "ghost.png" in str(err.value) and "transparent" in str(err.value)
