"""The controlled synthetic multi-site cohort: pyramidal TIFF slides of known tissue classes and stains.

Why it exists: the paper's "WSI-specific feature collapse" needs many slides whose staining differs by lab
while morphology alone carries the tissue label. Here morphology (nuclear size/density/shape, fibres, fat
cells, mucin strands, debris) is drawn as hematoxylin and eosin concentration maps, one low-resolution class
map per slide is the answer key, and colour comes only from Beer-Lambert rendering
``I = Io * exp(-(C_H * h + C_E * e))`` with a stain matrix per site plus smaller per-slide perturbations
(vector angle, concentration scale, brightness, blur; JPEG noise from the tiles). So colour signals site and
slide and nothing else.

Slides are rendered in strips of one tile row from deterministic functions of level-0 coordinates (object
processes generated per grid row from their own seeds, periodic textures), so memory stays bounded as the
slide grows and the pixels do not depend on the strip size. Every pyramid level is its own top-level tiled
TIFF page (OpenSlide's generic-tiff reader); reduced levels are built from the previous one through a
memory-mapped scratch file.

Files per slide in ``out_dir``: ``<slide_id>.tiff``, ``<slide_id>.json`` (sidecar: site, seed, stain
parameters, class names, class-map file and its downsample) and ``<slide_id>_classmap.npy`` (int8, -1 =
background). Plus ``spec.json`` and ``manifest.csv`` for the cohort.

Modules, in the order the data flows:
    spec        `CohortSpec`, tissue classes, slide ids, the generator version
    stains      site and slide stain parameters (H/E optical-density vectors, scales, Io, blur)
    tissue      the class map (answer key) with per-region attributes, and the periodic textures
    render      nuclei, H and E concentrations and Beer-Lambert colour of level-0 rows
    tiff        the tiled pyramidal TIFF of one slide
    writer      `generate_cohort`: every slide, spec.json and manifest.csv, atomically and resumably
    answer_key  sidecars, class maps and `tile_class_labels` for the tiles of a slide
    plots       `plot_cohort_examples`, the class x site figure
"""
