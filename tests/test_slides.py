"""Slide wrapper: real SVS / generic TIFF facts, level choice, pixel reads, thumbnails and bad files."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from exaonepath_core.io import slides
from exaonepath_core.io.slides import MissingMppError, SlideOpenError, open_slide


@pytest.fixture(scope="module")
def svs(shared_data):
    return shared_data / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def pyramid(shared_data):
    return shared_data / "wsi" / "CMU-1-Small-Region_pyramid_generic.tiff"


def write_tiled_tiff(path, rgb, resolution=None, unit=None, tile=64):
    """A single-level tiled TIFF that OpenSlide opens as generic-tiff (resolution tags optional)."""
    kwargs = {"tile": (tile, tile), "photometric": "rgb"}
    if resolution is not None:
        kwargs.update(resolution=(resolution, resolution), resolutionunit=unit)
    tifffile.imwrite(path, rgb, **kwargs)
    return path


def test_svs_metadata(svs):
    with open_slide(svs) as s:
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "openslide.mpp-x"
        assert s.objective_power == 20.0
        assert s.slide_id == "CMU-1-Small-Region"
        assert s.best_level_for_mpp(0.5) == (0, pytest.approx(0.5 / 0.499))


def test_pyramid_levels_and_best_level(pyramid):
    with open_slide(pyramid) as s:
        assert s.level_count == 3
        assert s.mpp == pytest.approx(0.499)
        assert s.objective_power is None
        # 0.5 um/px is within 1% of the 0.499 scan: level 0, nearly no resize.
        assert s.best_level_for_mpp(0.5) == (0, pytest.approx(1.002, abs=1e-3))
        # 2 um/px matches level 1 (downsample 4.002 -> 1.997 um/px); 8 um/px matches level 2.
        assert s.best_level_for_mpp(2.0)[0] == 1
        assert s.best_level_for_mpp(8.0)[0] == 2
        # Between levels: never the coarser one (that would upsample); shrink from the sharper one.
        level, scale = s.best_level_for_mpp(1.0)
        assert level == 0 and scale == pytest.approx(2.004, abs=1e-3)
        # Sharper than the scan: level 0 with scale < 1 (an upsample).
        assert s.best_level_for_mpp(0.25)[1] < 1.0


def test_same_pixels_through_both_files(svs, pyramid):
    """Level-0 tiles at the same coordinates agree across SVS and its JPEG re-encoding."""
    with open_slide(svs) as a, open_slide(pyramid) as b:
        for x, y in [(896, 1344), (1000, 2000), (600, 900)]:
            ra = a.read_rgb(x, y, 0, 224, 224).astype(np.int16)
            rb = b.read_rgb(x, y, 0, 224, 224).astype(np.int16)
            assert ra.shape == rb.shape == (224, 224, 3)
            assert ra.dtype == np.int16  # sanity of the cast; reads themselves are uint8 (checked below)
            diff = np.abs(ra - rb)
            assert diff.mean() < 10.0  # observed 6.4-7.5 grey levels on tissue (double JPEG)
            assert np.corrcoef(ra.ravel(), rb.ravel())[0, 1] > 0.97  # observed 0.985-0.987
        assert a.read_rgb(0, 0, 0, 8, 8).dtype == np.uint8


def test_read_outside_slide_is_white(pyramid):
    with open_slide(pyramid) as s:
        w, h = s.dimensions
        region = s.read_rgb(w - 32, h - 32, 0, 64, 64)
        assert region.shape == (64, 64, 3)
        assert (region[40:, :] == 255).all() and (region[:, 40:] == 255).all()
        with pytest.raises(ValueError):
            s.read_rgb(0, 0, 0, 0, 10)


def test_thumbnail_sources_agree(svs, pyramid):
    """The SVS's associated thumbnail and the TIFF's level-2 read give the same overview."""
    with open_slide(svs) as a, open_slide(pyramid) as b:
        ta, tb = a.thumbnail(300), b.thumbnail(300)
    assert ta.shape == tb.shape == (300, 224, 3)
    assert np.abs(ta.astype(np.int16) - tb).mean() < 4.0  # observed 1.7


def test_strip_thumbnail_matches_single_read(pyramid, monkeypatch):
    """Reading in many strips gives the same thumbnail as one read (no seams, no shifted rows)."""
    with open_slide(pyramid) as s:
        whole = s.thumbnail(400, use_associated=False)
        monkeypatch.setattr(slides, "THUMBNAIL_STRIP_PIXELS", 555 * 20)  # about 20 level-1 rows per strip
        stripped = s.thumbnail(400, use_associated=False)
    assert whole.shape == stripped.shape == (400, 299, 3)
    assert np.abs(whole.astype(np.int16) - stripped).mean() < 1.0


def test_corrupt_and_non_slide_files(svs, tmp_path):
    data = svs.read_bytes()
    cases = {
        "half.svs": data[: len(data) // 2],
        "head.svs": data[:4096],
        "empty.svs": b"",
        "notes.svs": b"this is a text file, not a slide\n" * 10,
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(SlideOpenError) as info, open_slide(tmp_path / name):
            pass
        assert name in str(info.value)
    with pytest.raises(SlideOpenError, match="not found"), open_slide(tmp_path / "missing.svs"):
        pass


def test_missing_mpp_and_override(tmp_path):
    path = write_tiled_tiff(tmp_path / "nores.tiff", np.full((256, 256, 3), 200, np.uint8))
    with pytest.raises(MissingMppError, match="no mpp"), open_slide(path):
        pass
    with open_slide(path, mpp_override=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"
        assert s.best_level_for_mpp(0.5) == (0, pytest.approx(2.0))
    with open_slide(path, require_mpp=False) as s:
        assert not s.has_mpp
        with pytest.raises(MissingMppError):
            _ = s.mpp
    # 72 dpi is what image editors write: 352.8 um/px is no microscope scan.
    screen = write_tiled_tiff(tmp_path / "screen.tiff", np.full((128, 128, 3), 9, np.uint8), 72, "INCH")
    with pytest.raises(MissingMppError, match="implausible"), open_slide(screen):
        pass


def test_missing_mpp_error_names_the_objective_power(svs, tmp_path):
    # the real Aperio file with its MPP field renamed (same length): OpenSlide then reports no mpp, only AppMag
    data = svs.read_bytes()
    assert data.count(b"MPP = 0.4990") == 2
    (tmp_path / "nompp.svs").write_bytes(data.replace(b"MPP = 0.4990", b"XPP = 0.4990"))
    with pytest.raises(MissingMppError, match=r"objective power 20x, commonly 0\.5 um/px"), \
            open_slide(tmp_path / "nompp.svs"):
        pass
    scan = write_tiled_tiff(tmp_path / "scan.tiff", np.full((128, 128, 3), 9, np.uint8), 40000, "CENTIMETER")
    with open_slide(scan) as s:
        assert s.mpp == pytest.approx(0.25)


def test_anisotropic_pixels_warned_or_refused(tmp_path):
    """mpp-x 0.5 with mpp-y 0.25 is refused (was read as 0.5); 2 % apart warns and uses the mean; 0.5 % is quiet."""
    import warnings

    from exaonepath_core.io.slides import AnisotropicMppError

    rgb = np.full((128, 128, 3), 200, np.uint8)

    def tiff(name, mpp_x, mpp_y):
        path = tmp_path / name
        tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", resolutionunit="CENTIMETER",
                         resolution=(1e4 / mpp_x, 1e4 / mpp_y))
        return path

    far = tiff("far.tiff", 0.5, 0.25)
    with pytest.raises(AnisotropicMppError) as info, open_slide(far):
        pass
    message = str(info.value)
    assert "far.tiff" in message and "mpp-x 0.5 " in message and "mpp-y 0.25 " in message
    assert "100.0% apart" in message and "--mpp-override" in message
    with open_slide(far, mpp_override=0.5) as s:  # the override wins
        assert s.mpp == 0.5 and s.mpp_source == "override" and s.mpp_warning == ""
    with open_slide(far, require_mpp=False) as s:  # reading tiles back needs no mpp
        assert not s.has_mpp and s.mpp_source.startswith("anisotropic")

    near = tiff("near.tiff", 0.5, 0.51)
    with pytest.warns(UserWarning, match=r"near.tiff: anisotropic pixels: mpp-x 0.5 vs mpp-y 0.51 .*2.0% apart"), \
            open_slide(near) as s:
        assert s.mpp == pytest.approx(0.505) and "mean" in s.mpp_source and "0.505" in s.mpp_warning

    square_enough = tiff("square.tiff", 0.5, 0.5025)  # 0.5 % apart: scanner rounding, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_slide(square_enough) as s:
            assert s.mpp == pytest.approx(0.5) and s.mpp_source == "openslide.mpp-x" and s.mpp_warning == ""
    assert slides.anisotropy(0.5, 0.25) == pytest.approx(1.0) and slides.anisotropy(0.3, 0.3) == 0.0


def test_direct_numpy_read_equals_public_pil_path(svs, pyramid, tmp_path):
    """The fast read (openslide_read_region into numpy) gives the pixels of openslide's public PIL path."""
    # A slide with partly transparent pixels: alpha 0 outside, and an RGBA TIFF with intermediate alpha.
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 90, 160
    rgba[..., 3] = np.linspace(0, 255, 256).astype(np.uint8)[None, :]
    alpha_tiff = tmp_path / "alpha.tiff"
    tifffile.imwrite(alpha_tiff, rgba, tile=(64, 64), photometric="rgb", extrasamples=["unassalpha"],
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    checked = 0
    for path in (svs, pyramid, alpha_tiff):
        with open_slide(path) as s:
            w, h = s.dimensions
            for x, y, level, size in ((100, 200, 0, 224), (w - 100, h - 50, 0, 224), (-30, -40, 0, 96),
                                      (0, 0, s.level_count - 1, 128)):
                fast = np.empty((size, size, 3), np.uint8)
                slow = np.empty((size, size, 3), np.uint8)
                s.read_rgb_into(x, y, level, fast)
                s._read_rgb_into_via_pil(x, y, level, slow)
                # Premultiplied-over-white vs PIL's paste of un-premultiplied colour: equal up to rounding.
                assert np.abs(fast.astype(int) - slow).max() <= 1, (path.name, x, y, level)
                checked += 1
            outside = s.read_rgb(w + 10, h + 10, 0, 8, 8)
            assert (outside == 255).all()
    assert checked == 12


def test_slide_files_ids_and_list_files_follow_one_rule(tmp_path):
    """The one suffix list and slide-id rule every listing uses (cohort, tiling CLI, held-out lists)."""
    for rel in ("a/one.SVS", "a/b/two.ndpi", "a/notes.txt", "a/three.tiff", "a/.hidden"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "a" / "folder.svs").mkdir()  # a folder named like a slide is not a slide
    found = slides.find_slides(tmp_path / "a")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/b/two.ndpi", "a/one.SVS", "a/three.tiff"]
    assert [slides.slide_id_from_path(p) for p in found] == ["two", "one", "three"]
    assert slides.slide_id_from_path("/x/TCGA-A6.01.svs") == "TCGA-A6.01"  # only the last extension goes
    assert slides.slide_id_from_path("/x/no_extension") == "no_extension"
    listing = tmp_path / "list.txt"
    listing.write_text("# held-out slides\n  one.svs  \n\nslide_b\n#two.svs\n")
    assert slides.list_file_entries(listing) == ["one.svs", "slide_b"]
