"""The fused CPU path: the numba kernels of `kernels` run over a batch by several threads (the GIL released).

Each thread owns one set of scratch buffers and takes chunks of patches dynamically; the kernels write the
output patches (or the stain estimates) in place into numpy views of the torch tensors.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from exaonepath_core.data.stain import kernels
from exaonepath_core.data.stain.batched import StainEstimate, optical_density_lut, tissue_level_of
from exaonepath_core.data.stain.percentiles import ANGLE_BINS, CONCENTRATION_BINS
from exaonepath_core.data.stain.reference import MacenkoReference


def numba_scratch(n_pixels: int) -> tuple[np.ndarray, ...]:
    """One thread's scratch buffers for `kernels.normalize_patches`, in its argument order."""
    return (
        np.empty(ANGLE_BINS, np.int64),  # angle_hist
        np.empty(CONCENTRATION_BINS, np.int64),  # concentration_hist
        np.empty(n_pixels, np.int32),  # tissue_index
        np.empty(n_pixels, np.float64),  # keys
        np.empty((2, n_pixels), np.float32),  # concentrations
        np.empty(2 * n_pixels, np.float64),  # sample
        np.empty(2 * n_pixels, np.float64),  # candidate_values
        np.empty(2 * n_pixels, np.int64),  # candidate_index
        np.empty((3, 256, 3), np.float64),  # tables
    )


# Patches per kernel call when threads share a batch. Work is taken dynamically, a chunk at a time: the cost
# of a patch varies ~15x (background tiles stop after one pass), and tissue clusters in space, so equal
# contiguous slices per thread left one thread idle for ~15% of a CMU batch. A call costs ~10 us of dispatch;
# 4 patches are ~2 ms of work.
NUMBA_CHUNK = 4


def run_in_chunks(b: int, n_pixels: int, threads: int, kernel) -> None:
    """Call kernel(start, stop, scratch) over [0, b) in chunks of `NUMBA_CHUNK`, taken dynamically by threads.

    `threads` threads (the caller's included) each own one `numba_scratch`; kernels release the GIL.
    """
    threads = max(1, min(int(threads), -(-b // NUMBA_CHUNK)))
    if threads == 1:
        kernel(0, b, numba_scratch(n_pixels))
        return
    starts = iter(range(0, b, NUMBA_CHUNK))
    lock = threading.Lock()

    def work() -> None:
        scratch = numba_scratch(n_pixels)
        while True:
            with lock:
                start = next(starts, None)
            if start is None:
                return
            kernel(start, min(start + NUMBA_CHUNK, b), scratch)

    with ThreadPoolExecutor(max_workers=threads - 1) as pool:
        helpers = [pool.submit(work) for _ in range(threads - 1)]
        work()  # the calling thread is one of the workers
        for helper in helpers:
            helper.result()  # re-raises a worker's exception here


def concentration_rank(n_pixels: int) -> int:
    """Nearest rank of the 99th percentile over n_pixels, as `percentiles.nearest_rank(99, n)` computes it."""
    return 1 + round((0.01 * 99.0) * (n_pixels - 1))


def normalize_fused(patches: torch.Tensor, out: torch.Tensor, fallback: torch.Tensor, lut: torch.Tensor,
                   tissue_level: int, reference: MacenkoReference, Io: float, alpha: float,
                   min_tissue_pixels: int, threads: int) -> None:
    """Run the fused kernel over a contiguous CPU batch into `out` and the fallback flags."""
    b = patches.shape[0]
    n_pixels = patches.shape[1] * patches.shape[2]
    pixels = patches.numpy().reshape(b, n_pixels, 3)
    out_pixels = out.numpy().reshape(b, n_pixels, 3)
    flags = fallback.numpy()
    arguments = (
        lut.numpy(), int(tissue_level), np.ascontiguousarray(reference.stain_matrix, dtype=np.float32),
        np.ascontiguousarray(reference.max_concentrations, dtype=np.float32), float(np.log(float(Io))),
        float(alpha), int(max(min_tissue_pixels, 2)), concentration_rank(n_pixels),
    )

    def kernel(start: int, stop: int, scratch: tuple[np.ndarray, ...]) -> None:
        kernels.normalize_patches(pixels[start:stop], out_pixels[start:stop], flags[start:stop], *arguments, *scratch)

    run_in_chunks(b, n_pixels, threads, kernel)


def estimate_fused(patches: torch.Tensor, Io: float, alpha: float, beta: float, min_tissue_pixels: int,
                    threads: int | None = None) -> StainEstimate:
    """The fused kernel's per-patch Macenko estimate of a uint8 (b, H, W, 3) CPU batch (no output image)."""
    b = patches.shape[0]
    n_pixels = patches.shape[1] * patches.shape[2]
    pixels = patches.contiguous().numpy().reshape(b, n_pixels, 3)
    lut = optical_density_lut(Io)
    usable = np.zeros(b, np.bool_)
    n_tissue = np.zeros(b, np.int64)
    stains = np.zeros((b, 3, 2), np.float32)
    maxima = np.ones((b, 2), np.float32)
    arguments = (lut.numpy(), tissue_level_of(lut, beta), float(alpha), int(max(min_tissue_pixels, 2)),
                 concentration_rank(n_pixels))

    def kernel(start: int, stop: int, scratch: tuple[np.ndarray, ...]) -> None:
        kernels.estimate_patches(pixels[start:stop], usable[start:stop], n_tissue[start:stop], stains[start:stop],
                             maxima[start:stop], *arguments, *scratch)

    run_in_chunks(b, n_pixels, torch.get_num_threads() if threads is None else threads, kernel)
    stains[~usable] = np.eye(3, 2, dtype=np.float32)  # as the torch path: a harmless stand-in when unusable
    maxima[~usable] = 1.0
    stains_t = torch.from_numpy(stains)
    stains64 = stains_t.double()
    pseudo_inverse = torch.linalg.pinv(stains64).to(torch.float32)
    return StainEstimate(stains_t, pseudo_inverse, torch.from_numpy(maxima), torch.from_numpy(usable),
                          torch.from_numpy(n_tissue))

