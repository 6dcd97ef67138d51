"""Rendering level-0 rows of one slide: nuclei, H and E concentration maps, Beer-Lambert colour.

``I = Io * exp(-(C_H * h + C_E * e))`` with the slide's stain matrix: colour comes only from the stains, so it
signals site and slide and nothing else. Rows are deterministic functions of level-0 coordinates (nuclei are
drawn per grid row from their own seeds), so the pixels do not depend on the strip size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from exaonepath_core.data.synthetic.spec import (
    ADIPOSE,
    BACKGROUND,
    CLASS_NAMES,
    LYMPHOCYTES,
    MUCIN,
    NECROSIS,
    STROMA,
    TUMOR,
    CohortSpec,
)
from exaonepath_core.data.synthetic.stains import StainParams, slide_stain_params
from exaonepath_core.data.synthetic.tissue import (
    N_FIBRE_ORIENTATIONS,
    REGION_VARIATION,
    TEXTURE_PX,
    layout_class_map,
    slide_textures,
)

_OBJECT_ROW_PX = 64  # height of the grid rows that own the nuclei seeds
_MARGIN_PX = 24  # rows rendered above and below a strip so blur and nuclei cross strip borders seamlessly

# Nuclear morphology per class (level-0 px at 0.5 um/px). Density is nuclei per px^2; radius is the major
# semi-axis; aspect = major/minor; rim > 0 makes a vesicular nucleus (paler centre); irregularity is the
# amplitude of a 3-lobed outline (pleomorphism, karyorrhexis).
_NUCLEI = {
    #              density  r_min r_max asp_min asp_max int_min int_max rim  irregularity
    TUMOR:        (2.2e-3,  6.5, 12.0, 1.0, 1.7, 0.75, 1.20, 0.55, 0.25),
    STROMA:       (4.0e-4,  7.0, 11.0, 3.0, 4.5, 0.90, 1.30, 0.10, 0.05),
    LYMPHOCYTES:  (7.5e-3,  3.5, 4.8, 1.0, 1.15, 1.30, 1.80, 0.00, 0.04),
    ADIPOSE:      (6.0e-5,  6.0, 9.0, 3.0, 4.0, 0.70, 1.00, 0.10, 0.05),
    MUCIN:        (1.2e-4,  4.0, 6.0, 1.0, 1.3, 0.60, 0.90, 0.10, 0.10),
    NECROSIS:     (5.0e-3,  1.2, 3.0, 1.0, 2.0, 0.90, 1.60, 0.00, 0.35),
}
_NUCLEI_TABLE = np.array([_NUCLEI[c] for c in range(len(CLASS_NAMES))], dtype=np.float64)
_MAX_DENSITY = float(_NUCLEI_TABLE[:, 0].max()) * (1 + REGION_VARIATION)
_MAX_NUCLEUS_EXTENT = math.ceil(float((_NUCLEI_TABLE[:, 2] * (1 + _NUCLEI_TABLE[:, 8])).max())) + 2


@dataclass
class SlideContext:
    """Everything needed to render any row range of one slide (built once per slide, read-only after)."""

    spec: CohortSpec
    entropy: tuple[int, ...]
    class_map: np.ndarray
    region_maps: dict[str, np.ndarray]
    textures: dict[str, np.ndarray]
    stain: StainParams

    @property
    def size(self) -> int:
        return self.spec.slide_size_px


def _slide_entropy(spec: CohortSpec, site: int, slide: int) -> tuple[int, ...]:
    return (int(spec.seed), 0x5EED, int(site), int(slide))


def build_context(spec: CohortSpec, site: int, slide: int, site_stain: StainParams) -> SlideContext:
    entropy = _slide_entropy(spec, site, slide)
    rng = np.random.default_rng(list(entropy))
    stain = slide_stain_params(site_stain, rng)
    class_map, region_maps = layout_class_map(spec, rng)
    textures = slide_textures(rng)
    return SlideContext(spec, entropy, class_map, region_maps, textures, stain)


def _class_at(ctx: SlideContext, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Class under level-0 points (float or int coords); -1 outside the slide."""
    ds = ctx.spec.class_map_downsample
    yi, xi = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    inside = (yi >= 0) & (yi < ctx.size) & (xi >= 0) & (xi < ctx.size)
    out = np.full(yi.shape, BACKGROUND, dtype=np.int8)
    out[inside] = ctx.class_map[yi[inside] // ds, xi[inside] // ds]
    return out


def _nuclei_in_row(ctx: SlideContext, row: int) -> dict[str, np.ndarray]:
    """Nuclei whose centres lie in grid row `row`; a thinned Poisson process, seeded by the row alone."""
    rng = np.random.default_rng([*ctx.entropy, 0x0B1, row])
    width = ctx.size
    n = int(rng.poisson(_MAX_DENSITY * _OBJECT_ROW_PX * width))
    # A fixed number of uniforms per candidate keeps the stream aligned whatever the classes are.
    u = rng.random((n, 9))
    x = u[:, 0] * width
    y = (row + u[:, 1]) * _OBJECT_ROW_PX
    cls = _class_at(ctx, y, x)
    tissue = cls >= 0
    table = _NUCLEI_TABLE[np.where(tissue, cls, 0)]
    ds = ctx.spec.class_map_downsample
    cell_y = np.clip(y.astype(np.int64) // ds, 0, ctx.class_map.shape[0] - 1)
    cell_x = np.clip(x.astype(np.int64) // ds, 0, ctx.class_map.shape[1] - 1)
    density = table[:, 0] * ctx.region_maps["density"][cell_y, cell_x]
    keep = tissue & (u[:, 2] < density / _MAX_DENSITY)
    p = TEXTURE_PX
    in_lumen = ctx.textures["lumen"][y.astype(np.int64) % p, x.astype(np.int64) % p] > 0.3
    keep &= ~((cls == TUMOR) & in_lumen)
    u, x, y, cls, table = u[keep], x[keep], y[keep], cls[keep], table[keep]

    def lerp(lo: np.ndarray, hi: np.ndarray, t: np.ndarray) -> np.ndarray:
        return lo + (hi - lo) * t

    r_major = lerp(table[:, 1], table[:, 2], u[:, 3])
    aspect = lerp(table[:, 3], table[:, 4], u[:, 4])
    theta = u[:, 5] * math.pi
    # Stromal nuclei lie along their fibres.
    oriented = cls == STROMA
    if oriented.any():
        ori = ctx.region_maps["orientation"][y[oriented].astype(np.int64) // ds,
                                             x[oriented].astype(np.int64) // ds]
        theta[oriented] = ori * math.pi / N_FIBRE_ORIENTATIONS + (u[oriented, 5] - 0.5) * 0.3
    return {"x": x, "y": y, "rx": r_major, "ry": r_major / aspect, "theta": theta,
                "intensity": lerp(table[:, 5], table[:, 6], u[:, 6]), "rim": table[:, 7],
                "irregularity": table[:, 8] * (0.5 + 0.5 * u[:, 8]), "phase": u[:, 7] * 2 * math.pi}


def _nuclei_in_rows(ctx: SlideContext, y_lo: int, y_hi: int) -> dict[str, np.ndarray]:
    first = max(0, y_lo // _OBJECT_ROW_PX)
    last = min((ctx.size - 1) // _OBJECT_ROW_PX, y_hi // _OBJECT_ROW_PX)
    rows = [_nuclei_in_row(ctx, r) for r in range(first, last + 1)]
    keys = ("x", "y", "rx", "ry", "theta", "intensity", "rim", "irregularity", "phase")
    return {k: np.concatenate([r[k] for r in rows]) if rows else np.zeros(0) for k in keys}


def _stamp_nuclei(nuclei: dict[str, np.ndarray], y0: int, height: int, width: int) -> np.ndarray:
    """Hematoxylin of all nuclei summed into a flat (height*width) float32 window starting at row y0."""
    acc = np.zeros(height * width, dtype=np.float64)
    if len(nuclei["x"]) == 0:
        return acc.astype(np.float32)
    half = np.ceil(nuclei["rx"] * (1 + nuclei["irregularity"])).astype(np.int64) + 1
    for h in np.unique(half):
        sel = half == h
        k = np.arange(-h, h + 1)
        def f32(name: str, sel: np.ndarray = sel) -> np.ndarray:
            return nuclei[name][sel][:, None, None].astype(np.float32)

        cx, cy = nuclei["x"][sel][:, None, None], nuclei["y"][sel][:, None, None]
        px = np.floor(cx).astype(np.int64) + k[None, None, :]
        py = np.floor(cy).astype(np.int64) + k[None, :, None]
        # Offsets from the centre in float32 (the stamp arithmetic dominates the render time).
        du = (k[None, None, :] + 0.5 - (cx - np.floor(cx))).astype(np.float32)
        dv = (k[None, :, None] + 0.5 - (cy - np.floor(cy))).astype(np.float32)
        c, s = np.cos(f32("theta")), np.sin(f32("theta"))
        a, b = du * c + dv * s, -du * s + dv * c
        rx, ry = f32("rx"), f32("ry")
        q = np.sqrt((a / rx) ** 2 + (b / ry) ** 2)
        # Lobed outline (pleomorphism): r(phi) scaled by 1 + amp*(0.6 cos(2phi+p) + 0.4 cos(3phi+p')),
        # with the harmonics expanded in cos/sin of phi (cheaper than arctan2).
        radius = np.sqrt(a * a + b * b) + 1e-6
        cos1, sin1 = a / radius, b / radius
        cos2, sin2 = 2 * cos1 * cos1 - 1, 2 * sin1 * cos1
        cos3, sin3 = cos1 * (4 * cos1 * cos1 - 3), sin1 * (3 - 4 * sin1 * sin1)
        amp, phase = f32("irregularity"), f32("phase")
        lobes = 0.6 * (cos2 * np.cos(phase) - sin2 * np.sin(phase)) \
            + 0.4 * (cos3 * np.cos(2 * phase) - sin3 * np.sin(2 * phase))
        q = q / (1 + amp * lobes)
        edge = np.clip((1 - q) * np.sqrt(rx * ry) + 0.5, 0.0, 1.0)  # about one pixel of soft border
        rim = f32("rim")
        value = f32("intensity") * edge * (1 - rim + rim * np.minimum(q, 1.0))
        row = py - y0
        ok = (value > 0) & (row >= 0) & (row < height) & (px >= 0) & (px < width)
        ok = np.broadcast_to(ok, value.shape)
        flat = np.broadcast_to(row * width + px, value.shape)[ok]
        acc += np.bincount(flat, weights=value[ok], minlength=height * width)
    return acc.astype(np.float32)


def _concentrations(ctx: SlideContext, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentration maps (float32, (y1-y0, width)) of level-0 rows [y0, y1)."""
    width, p, ds = ctx.size, TEXTURE_PX, ctx.spec.class_map_downsample
    height = y1 - y0
    rows = np.arange(y0, y1)
    inside = (rows >= 0) & (rows < ctx.size)
    row_cells = np.clip(rows // ds, 0, ctx.class_map.shape[0] - 1)
    col_cells = np.arange(width) // ds
    cls = ctx.class_map[row_cells][:, col_cells]
    cls[~inside] = BACKGROUND
    cls = cls.ravel()
    ch = np.zeros(height * width, dtype=np.float32)
    ce = np.zeros(height * width, dtype=np.float32)
    tex = ctx.textures

    def lookup(name: str, idx: np.ndarray) -> np.ndarray:
        return tex[name][(idx // width + y0) % p, (idx % width) % p]

    idx = np.flatnonzero(cls == TUMOR)
    open_ = 1.0 - lookup("lumen", idx)
    ce[idx] = (0.45 + 0.12 * lookup("cytoplasm", idx)) * open_
    ch[idx] = 0.06 * open_
    idx = np.flatnonzero(cls == STROMA)
    ori = ctx.region_maps["orientation"][(idx // width + y0).clip(0, ctx.size - 1) // ds, (idx % width) // ds]
    fibre = tex["fibre"][ori, (idx // width + y0) % p, (idx % width) % p]
    ce[idx] = 0.25 + 0.9 * fibre
    ch[idx] = 0.05
    idx = np.flatnonzero(cls == LYMPHOCYTES)
    ce[idx] = 0.25 + 0.05 * lookup("cytoplasm", idx)
    ch[idx] = 0.08
    idx = np.flatnonzero(cls == ADIPOSE)
    membrane = lookup("membrane", idx)
    ce[idx] = 0.04 + 0.8 * membrane
    ch[idx] = 0.02 + 0.12 * membrane
    idx = np.flatnonzero(cls == MUCIN)
    wisp = lookup("wisp", idx)
    ce[idx] = 0.18 + 0.3 * wisp
    ch[idx] = 0.22 + 0.35 * wisp  # mucin takes haematoxylin faintly: pale blue-grey strands
    idx = np.flatnonzero(cls == NECROSIS)
    grain = lookup("granular", idx)
    ce[idx] = np.clip(0.5 + 0.15 * grain, 0.05, None)
    ch[idx] = np.clip(0.14 + 0.08 * grain, 0.0, None)

    nuclei = _stamp_nuclei(_nuclei_in_rows(ctx, y0 - _MAX_NUCLEUS_EXTENT, y1 + _MAX_NUCLEUS_EXTENT),
                           y0, height, width)
    idx = np.flatnonzero(nuclei)
    nuclei[idx] *= 0.85 + 0.12 * lookup("granular", idx)  # chromatin texture
    ch += nuclei
    ce *= 1.0 - 0.6 * np.clip(nuclei, 0.0, 1.0)  # nuclei displace cytoplasm and fibres
    ch, ce = ch.reshape(height, width), ce.reshape(height, width)
    ch *= ctx.region_maps["h_uptake"][row_cells][:, col_cells]
    ce *= ctx.region_maps["e_uptake"][row_cells][:, col_cells]
    return ch, ce


def render_rows(ctx: SlideContext, y0: int, y1: int) -> np.ndarray:
    """RGB uint8 (y1-y0, width, 3) of level-0 rows [y0, y1): Beer-Lambert of the blurred concentrations."""
    ch, ce = _concentrations(ctx, y0 - _MARGIN_PX, y1 + _MARGIN_PX)
    st = ctx.stain
    ch *= st.h_scale
    ce *= st.e_scale
    if st.blur_sigma > 0.05:
        ch = ndimage.gaussian_filter(ch, st.blur_sigma, mode="nearest", truncate=3.0)
        ce = ndimage.gaussian_filter(ce, st.blur_sigma, mode="nearest", truncate=3.0)
    ch, ce = ch[_MARGIN_PX:-_MARGIN_PX], ce[_MARGIN_PX:-_MARGIN_PX]
    rgb = np.empty(ch.shape + (3,), dtype=np.uint8)
    for channel in range(3):
        od = ch * np.float32(-st.h_od[channel])
        od -= ce * np.float32(st.e_od[channel])
        np.exp(od, out=od)
        od *= np.float32(st.io)
        od += np.float32(0.5)
        rgb[..., channel] = np.clip(od, 0, 255, out=od)
    return rgb
