"""Open a whole-slide image, read its physical resolution, pick pyramid levels and read RGB pixels.

A thin wrapper around `openslide.OpenSlide` that every stage uses the same way:

    with open_slide(path) as slide:
        level, scale = slide.best_level_for_mpp(0.5)
        rgb = slide.read_rgb(x0, y0, level, w, h)      # uint8 (h, w, 3), transparent areas composited on white

This module also owns the two rules every stage shares about slide files: which suffixes are slides
(`SLIDE_SUFFIXES`, `find_slides`) and what a slide's id is (`slide_id_from_path`).

Memory: nothing here ever holds a whole level. `thumbnail()` picks the coarsest level that is sharp enough and
reads it in horizontal strips, resizing each strip to its share of output rows, so a 100k x 100k slide without
a pyramid still costs one strip plus the (small) thumbnail.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import openslide.lowlevel
from PIL import Image

# File suffixes (lower case) of the slide formats OpenSlide reads: the one list of every slide listing.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".svslide", ".bif")
# A level-0 resolution outside this range is not a microscope slide (72 dpi screen images give 352 um/px).
PLAUSIBLE_MPP_RANGE = (0.05, 20.0)
# Relative difference of mpp-x and mpp-y above which a slide is warned about (and their mean used), and above
# which it is refused: square tiles from pixels 10 % off square would distort the tissue.
ANISOTROPY_WARN = 0.01
ANISOTROPY_REFUSE = 0.10
# Pixels of one thumbnail strip read at a time (bounded memory for slides without a pyramid).
THUMBNAIL_STRIP_PIXELS = 16 * 1024 * 1024
# openslide_read_region into a caller's buffer (openslide-python >= 1.2 names it `_read_region`); None means
# use the public PIL path. Premultiplied ARGB words are only byte-sliced as B, G, R, A on little-endian hosts.
_LOWLEVEL_READ = getattr(openslide.lowlevel, "_read_region", None) if sys.byteorder == "little" else None
_UINT32_POINTER = ctypes.POINTER(ctypes.c_uint32)


class SlideError(Exception):
    """Base class of the errors raised for a slide that cannot be used."""


class SlideOpenError(SlideError):
    """The file is missing, corrupt, truncated or not a format OpenSlide reads."""


class SlideReadError(SlideError):
    """A region of an opened slide cannot be decoded (corrupt tile data)."""


class MissingMppError(SlideError):
    """The slide has no usable physical resolution (mpp) and no override was given."""


class AnisotropicMppError(MissingMppError):
    """The slide's pixels are far from square (mpp-x and mpp-y differ by more than ANISOTROPY_REFUSE)."""


# ------------------------------------------------------------------------------------------------------------
# Slide files: suffixes, listings, ids
# ------------------------------------------------------------------------------------------------------------
def slide_id_from_path(path: str | Path) -> str:
    """Slide id = file name without its (last) extension, e.g. 'CMU-1-Small-Region' (as in CLAM/TRIDENT)."""
    name = Path(path).name
    stem, ext = os.path.splitext(name)
    return stem if ext else name


def is_slide_file_name(path: str | Path) -> bool:
    """True when the file name ends in one of SLIDE_SUFFIXES (any case)."""
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def find_slides(folder: str | Path) -> list[Path]:
    """Every file under `folder` (recursive) with a slide suffix, sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if is_slide_file_name(p) and p.is_file())


def list_file_entries(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a list file (slide lists, held-out lists); '#' starts a comment line."""
    lines = (x.strip() for x in Path(path).read_text().splitlines())
    return [x for x in lines if x and not x.startswith("#")]


# ------------------------------------------------------------------------------------------------------------
# Physical resolution (mpp) from the file's properties
# ------------------------------------------------------------------------------------------------------------
def _positive_float(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and number > 0 else None


def _mpp_xy_from_properties(props: dict[str, str]) -> tuple[float | None, float | None, str]:
    """Level-0 (um/px along x, along y) from OpenSlide properties, then TIFF resolution tags, and the source.

    One axis missing gives the other for both (most scanners write both; some only mpp-x).
    """
    mpp_x = _positive_float(props.get("openslide.mpp-x"))
    mpp_y = _positive_float(props.get("openslide.mpp-y"))
    if mpp_x is not None or mpp_y is not None:
        return (mpp_x or mpp_y), (mpp_y or mpp_x), ("openslide.mpp-x" if mpp_x is not None else "openslide.mpp-y")
    # OpenSlide fills mpp-x from the TIFF tags itself for generic TIFFs; this covers vendors where it does not.
    unit = (props.get("tiff.ResolutionUnit") or "").lower()
    per_unit_x = _positive_float(props.get("tiff.XResolution"))
    if per_unit_x is not None and unit in ("centimeter", "inch"):
        um_per_unit = 10_000.0 if unit == "centimeter" else 25_400.0
        per_unit_y = _positive_float(props.get("tiff.YResolution")) or per_unit_x
        return um_per_unit / per_unit_x, um_per_unit / per_unit_y, "tiff.XResolution"
    return None, None, "none"


def anisotropy(mpp_x: float, mpp_y: float) -> float:
    """Relative difference of the two pixel sides, |x - y| / min(x, y) (0.0 for square pixels)."""
    return abs(mpp_x - mpp_y) / min(mpp_x, mpp_y)


@dataclass(frozen=True)
class MppReading:
    """A slide's level-0 um/px (None: unknown), where it came from, and a warning about it ('' when none)."""

    mpp: float | None
    source: str
    warning: str = ""


def square_pixel_mpp(props: dict[str, str], name: str, refuse_anisotropic: bool) -> MppReading:
    """The file's level-0 um/px for square tiles: the mean of x and y when they differ by at most
    ANISOTROPY_REFUSE (a warning above ANISOTROPY_WARN); beyond that an AnisotropicMppError (or None
    when `refuse_anisotropic` is False, e.g. reading tiles back, where the mpp is not needed)."""
    mpp_x, mpp_y, source = _mpp_xy_from_properties(props)
    if mpp_x is None or mpp_y is None:
        return MppReading(None, source)
    spread = anisotropy(mpp_x, mpp_y)
    if spread <= ANISOTROPY_WARN:
        return MppReading(mpp_x, source)
    values = f"mpp-x {mpp_x:.6g} vs mpp-y {mpp_y:.6g} um/px ({spread:.1%} apart, from {source})"
    if spread > ANISOTROPY_REFUSE:
        if not refuse_anisotropic:
            return MppReading(None, f"anisotropic: {values}")
        raise AnisotropicMppError(
            f"slide {name} has non-square pixels: {values}; square tiles would be distorted. "
            "If the file is wrong, pass the true level-0 um/px with --mpp-override (mpp_override=)"
        )
    mean = (mpp_x + mpp_y) / 2.0
    warning = f"anisotropic pixels: {values}; using their mean {mean:.6g} um/px"
    warnings.warn(f"slide {name}: {warning}", stacklevel=4)
    return MppReading(mean, f"mean of mpp-x and mpp-y ({source})", warning)


def resolve_mpp(props: dict[str, str], name: str, mpp_override: float | None, require_mpp: bool) -> MppReading:
    """The level-0 um/px a slide is used with: the override, else the file's (square, plausible) value.

    Raises MissingMppError when `require_mpp` and there is none, naming the objective power when the file
    states one (a hint for the override).
    """
    if mpp_override is not None:  # the override wins over whatever the file says (even anisotropic)
        if not mpp_override > 0:
            raise ValueError(f"mpp_override must be > 0, got {mpp_override}")
        return MppReading(float(mpp_override), "override")
    reading = square_pixel_mpp(props, name, refuse_anisotropic=require_mpp)
    if reading.mpp is not None and not PLAUSIBLE_MPP_RANGE[0] <= reading.mpp <= PLAUSIBLE_MPP_RANGE[1]:
        reading = MppReading(None, f"implausible {reading.mpp:.4g} um/px from {reading.source}")
    if reading.mpp is None and require_mpp:
        power = _positive_float(props.get("openslide.objective-power") or props.get("aperio.AppMag"))
        hint = (f"; the file states objective power {power:g}x, commonly {10.0 / power:.3g} um/px at "
                "level 0 (scanners differ: check before using it)" if power else "")
        raise MissingMppError(
            f"no mpp in {name} ({reading.source}); pass an mpp override "
            f"(--mpp-override / mpp_override=) with the scanner's um per pixel at level 0{hint}"
        )
    return reading


# ------------------------------------------------------------------------------------------------------------
# The slide handle
# ------------------------------------------------------------------------------------------------------------
def _open_openslide(path: Path) -> openslide.OpenSlide:
    """openslide.OpenSlide(path), every way it fails turned into a SlideOpenError naming the file."""
    if not path.is_file():
        raise SlideOpenError(f"slide file not found: {path}")
    if path.stat().st_size == 0:
        raise SlideOpenError(f"slide file is empty: {path}")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideOpenError(f"not a slide format OpenSlide reads: {path.name} ({exc})") from exc
    except openslide.OpenSlideError as exc:
        raise SlideOpenError(f"corrupt or truncated slide {path.name}: {exc}") from exc
    except OSError as exc:  # some corrupt files surface as plain OS errors from the C library
        raise SlideOpenError(f"cannot open slide {path.name}: {exc}") from exc


class Slide:
    """An open whole-slide image with its level-0 mpp; use through `open_slide`."""

    def __init__(self, path: str | Path, mpp_override: float | None = None, require_mpp: bool = True):
        self.path = Path(path)
        self._osr = _open_openslide(self.path)
        try:
            self._validate_readable()
            self.properties: dict[str, str] = dict(self._osr.properties)
            reading = resolve_mpp(self.properties, self.path.name, mpp_override, require_mpp)
        except BaseException:
            self._osr.close()
            raise
        self._mpp: float | None = reading.mpp
        self.mpp_source: str = reading.source
        self.mpp_warning: str = reading.warning  # set when the file's pixels are slightly anisotropic

    def _validate_readable(self) -> None:
        """Read one pixel at each corner of level 0: truncated files often open fine and fail on first read."""
        w, h = self._osr.dimensions
        if w <= 0 or h <= 0:
            raise SlideOpenError(f"slide {self.path.name} has empty dimensions {w}x{h}")
        try:
            for x, y in ((0, 0), (w - 1, h - 1)):
                self._osr.read_region((x, y), 0, (1, 1))
        except openslide.OpenSlideError as exc:
            raise SlideOpenError(f"corrupt or truncated slide {self.path.name}: {exc}") from exc

    # -- geometry ---------------------------------------------------------------------------------------------
    @property
    def slide_id(self) -> str:
        """File name without its extension (the id used in every output)."""
        return slide_id_from_path(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0."""
        return self._osr.dimensions

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    @property
    def mpp(self) -> float:
        """Level-0 micrometres per pixel (override, openslide.mpp-x or the TIFF resolution tags)."""
        if self._mpp is None:
            raise MissingMppError(f"no mpp in {self.path.name} ({self.mpp_source}) and no override")
        return self._mpp

    @property
    def has_mpp(self) -> bool:
        return self._mpp is not None

    @property
    def objective_power(self) -> float | None:
        """Scanner objective magnification (e.g. 20.0), or None when the file does not say."""
        value = self.properties.get("openslide.objective-power")
        try:
            return float(value) if value else None
        except ValueError:
            return None

    @property
    def vendor(self) -> str:
        return self.properties.get("openslide.vendor", "unknown")

    def level_mpp(self, level: int) -> float:
        """Micrometres per pixel at `level`."""
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float, tolerance: float = 0.01) -> tuple[int, float]:
        """The coarsest level at least as sharp as target_mpp, and scale = target_mpp / level_mpp (>= 1 shrinks).

        A level within `tolerance` (relative) of the target counts as a match, so a 0.499 um/px scan serves a
        0.5 um/px target from level 0 with scale 1.002. Targets sharper than level 0 return level 0, scale < 1.
        """
        if not target_mpp > 0:
            raise ValueError(f"target_mpp must be > 0, got {target_mpp}")
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * (1.0 + tolerance):
                best = level  # downsamples increase with level, so the last match is the coarsest
        return best, target_mpp / self.level_mpp(best)

    # -- pixels -----------------------------------------------------------------------------------------------
    def _read_error(self, x0: int, y0: int, level: int, w: int, h: int, exc: Exception) -> SlideReadError:
        return SlideReadError(f"cannot read {self.path.name} at level-0 ({x0}, {y0}), level {level}, {w}x{h}: {exc}")

    def read_rgb(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) region whose top-left is level-0 (x0, y0), size w x h in `level` pixels; alpha on white."""
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        out = np.empty((int(h), int(w), 3), dtype=np.uint8)
        self.read_rgb_into(x0, y0, level, out)
        return out

    def read_rgb_into(self, x0: int, y0: int, level: int, out: np.ndarray) -> np.ndarray:
        """Read a region of out's size (h, w, 3) into `out` (no PIL conversion: numpy copy and compositing)."""
        h, w = out.shape[:2]
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        handle = getattr(self._osr, "_osr", None)  # the C handle inside openslide.OpenSlide
        if _LOWLEVEL_READ is None or handle is None or not out.flags.writeable:
            return self._read_rgb_into_via_pil(x0, y0, level, out)
        # OpenSlide writes premultiplied ARGB words; read them straight into numpy, skipping the un-premultiply,
        # PIL image and bytes copy of `read_region` (about a third of the per-tile time next to the decode).
        argb = np.empty((int(h), int(w)), dtype=np.uint32)
        try:
            _LOWLEVEL_READ(handle, argb.ctypes.data_as(_UINT32_POINTER),
                           int(x0), int(y0), int(level), int(w), int(h))
        except openslide.OpenSlideError as exc:
            raise self._read_error(x0, y0, level, w, h, exc) from exc
        bgra = argb.view(np.uint8).reshape(int(h), int(w), 4)  # little-endian words: bytes B, G, R, A
        out[..., 0] = bgra[..., 2]  # three plain channel copies are 3x faster than one reversed-slice copy
        out[..., 1] = bgra[..., 1]
        out[..., 2] = bgra[..., 0]
        if argb.min() < 0xFF000000:  # some alpha < 255: outside the scanned area
            # Premultiplied colour over white is c * a / 255 + 255 - a = stored + (255 - a), never above 255.
            out += (255 - bgra[..., 3])[..., None]
        return out

    def _read_rgb_into_via_pil(self, x0: int, y0: int, level: int, out: np.ndarray) -> np.ndarray:
        """`read_rgb_into` through openslide's public PIL path (big-endian hosts, other openslide-pythons)."""
        h, w = out.shape[:2]
        try:
            region = self._osr.read_region((int(x0), int(y0)), int(level), (int(w), int(h)))
        except openslide.OpenSlideError as exc:
            raise self._read_error(x0, y0, level, w, h, exc) from exc
        rgba = np.asarray(region)
        out[...] = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() < 255:  # outside the scanned area: blend onto white, as PIL's paste with a mask does
            a = alpha[..., None].astype(np.uint16)
            out[...] = ((out.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        return out

    def read_rgb_image(self, x0: int, y0: int, level: int, w: int, h: int) -> Image.Image:
        """Like `read_rgb` but as a PIL RGB image (saves a copy when the caller resizes with PIL next)."""
        try:
            region = self._osr.read_region((int(x0), int(y0)), int(level), (int(w), int(h)))
        except openslide.OpenSlideError as exc:
            raise self._read_error(x0, y0, level, w, h, exc) from exc
        return _composite_on_white(region)

    def associated_image(self, name: str) -> Image.Image | None:
        """The file's associated image `name` (e.g. 'thumbnail', 'label'), or None when it has none."""
        try:
            images = self._osr.associated_images
            # `in images` (and `in images.keys()`) decode the image just to test membership: iterate the names.
            return images[name] if name in list(images) else None
        except openslide.OpenSlideError:
            return None

    def thumbnail(self, max_size: int, use_associated: bool = True, sharpness_slack: float = 1.25) -> np.ndarray:
        """uint8 RGB overview whose longer side is at most max_size, read with bounded memory.

        Reads the coarsest level whose downsample is <= slack x the needed one (a mask need not be sharper
        than asked), in strips. When even that level costs > 16x the output pixels (single-level files such as
        small SVS crops) and the file carries an associated 'thumbnail' of the same aspect ratio, that image
        is used instead: reading the whole level would cost as much as tiling the slide.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        w0, h0 = self.dimensions
        factor = max(w0, h0) / max_size
        if factor <= 1.0:
            out_w, out_h = w0, h0
        else:
            out_w, out_h = max(1, round(w0 / factor)), max(1, round(h0 / factor))
        needed = max(factor, 1.0) * sharpness_slack
        level = 0
        for lv, ds in enumerate(self.level_downsamples):
            if ds <= needed:
                level = lv
        lw, lh = self.level_dimensions[level]
        if use_associated and lw * lh > 16 * out_w * out_h:
            assoc = _associated_thumbnail(self, out_w, out_h)
            if assoc is not None:
                return assoc
        return _strip_thumbnail(self, level, out_w, out_h)

    def close(self) -> None:
        self._osr.close()

    def __repr__(self) -> str:
        mpp = f"{self._mpp:.4g}" if self._mpp is not None else "None"
        return f"Slide({self.path.name!r}, {self.dimensions[0]}x{self.dimensions[1]}, levels={self.level_count}, mpp={mpp})"


# ------------------------------------------------------------------------------------------------------------
# Thumbnails and compositing
# ------------------------------------------------------------------------------------------------------------
def _associated_thumbnail(slide: Slide, out_w: int, out_h: int) -> np.ndarray | None:
    """The file's own overview image resized to (out_w, out_h), if it has the slide's aspect ratio."""
    img = slide.associated_image("thumbnail")
    if img is None:
        return None
    w0, h0 = slide.dimensions
    if abs((img.width / img.height) / (w0 / h0) - 1.0) > 0.02:
        return None  # a label/macro-like image of another region: not a faithful overview
    rgb = _composite_on_white(img)
    if rgb.size != (out_w, out_h):
        rgb = rgb.resize((out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(rgb)


def _strip_thumbnail(slide: Slide, level: int, out_w: int, out_h: int) -> np.ndarray:
    """Resize `level` to (out_w, out_h) strip by strip; each strip maps exactly onto its output rows."""
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    sy = lh / out_h  # level rows per output row
    rows_per_strip = max(1, int(THUMBNAIL_STRIP_PIXELS / max(1, lw) / max(sy, 1.0)))
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for o0 in range(0, out_h, rows_per_strip):
        o1 = min(out_h, o0 + rows_per_strip)
        top, bottom = o0 * sy, o1 * sy
        r0, r1 = math.floor(top), min(lh, math.ceil(bottom))
        strip = slide.read_rgb_image(0, round(r0 * ds), level, lw, max(1, r1 - r0))
        box = (0.0, top - r0, float(lw), min(bottom - r0, float(r1 - r0)))
        out[o0:o1] = np.asarray(strip.resize((out_w, o1 - o0), Image.Resampling.BILINEAR, box=box))
    return out


def _composite_on_white(img: Image.Image) -> Image.Image:
    """RGB image with transparent pixels (outside the scanned area) set to white."""
    if img.mode == "RGB":
        return img
    if img.mode != "RGBA":
        return img.convert("RGB")
    alpha = img.getchannel("A")
    lo, _ = alpha.getextrema()
    if lo == 255:
        return img.convert("RGB")
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(img, mask=alpha)
    return background


@contextlib.contextmanager
def open_slide(path: str | Path, mpp_override: float | None = None, require_mpp: bool = True) -> Iterator[Slide]:
    """Open a slide for the duration of a `with` block (raises SlideOpenError / MissingMppError)."""
    slide = Slide(path, mpp_override=mpp_override, require_mpp=require_mpp)
    try:
        yield slide
    finally:
        slide.close()
