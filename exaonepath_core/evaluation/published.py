"""Published numbers of the paper's comparison: one table of per-task top-1, WSI counts and releases.

Per-task top-1 (linear evaluation) from EXAONEPath's repository README, whose values other than GigaPath's are
taken from the RudolfV paper. EXAONEPath's own row is `downstream.datasets.PAPER_ACCURACY` (one source of truth).
WSI counts are those each model's paper reports for its pretraining data; ImageNet models saw no WSI.
"""
from __future__ import annotations

from dataclasses import dataclass

from exaonepath_core.data.downstream.datasets import PAPER_ACCURACY

SIX_TASKS = tuple(PAPER_ACCURACY)  # pcam, mhist, crc100k, til, msi_crc, msi_stad


@dataclass(frozen=True)
class PublishedModel:
    """One model of the paper's table: its published top-1 per task and what it was trained on."""

    key: str  # registry name (exaonepath_core.models.peers.PEERS) or "exaonepath" / "rudolfv"
    title: str
    top1: dict[str, float]  # task -> published top-1; tasks without a number are left out
    n_wsis: int | None  # WSIs of pretraining (0: ImageNet), None: not reported
    wsi_source: str
    licence: str
    n_parameters: int | None = None  # only for models with no architecture here (RudolfV)

    def average(self) -> float | None:
        """The six-task average, None unless all six tasks have a number (Virchow: three only)."""
        if not all(task in self.top1 for task in SIX_TASKS):
            return None
        return sum(self.top1[task] for task in SIX_TASKS) / len(SIX_TASKS)


def _row(*values: float | None) -> dict[str, float]:
    return {task: v for task, v in zip(SIX_TASKS, values) if v is not None}


PUBLISHED: dict[str, PublishedModel] = {m.key: m for m in (
    PublishedModel("resnet50", "ResNet50 ImageNet", _row(.833, .806, .849, .915, .653, .664), 0,
                   "ImageNet-1k (no WSI)", "BSD-3 (torchvision)"),
    PublishedModel("vit_large_imagenet", "ViT-L/16 ImageNet", _row(.852, .796, .847, .924, .669, .671), 0,
                   "ImageNet-21k/1k (no WSI)", "Apache-2.0 (timm)"),
    PublishedModel("lunit_vits16", "Lunit DINO ViT-S/16", _row(.918, .771, .949, .943, .745, .756), 36_666,
                   "Kang et al. 2023 (CVPR): 36,666 WSIs", "non-commercial (Lunit), ungated GitHub release"),
    PublishedModel("ctranspath", "CTransPath", _row(.872, .817, .840, .930, .694, .726), 32_220,
                   "Wang et al. 2022 (MedIA): TCGA + PAIP, 32,220 WSIs", "GPL-3.0 code; weights via Google Drive"),
    PublishedModel("phikon", "Phikon", _row(.906, .795, .883, .946, .733, .751), 6_093,
                   "Filiot et al. 2023: TCGA, 6,093 WSIs", "Owkin non-commercial, ungated on Hugging Face"),
    PublishedModel("virchow", "Virchow", _row(.933, .834, .968, None, None, None), 1_488_550,
                   "Vorontsov et al. 2024 (Nat Med): 1,488,550 WSIs", "Apache-2.0, gated on Hugging Face"),
    PublishedModel("rudolfv", "RudolfV", _row(.944, .821, .973, .943, .755, .788), 103_000,
                   "Dippel et al. 2024 (arXiv 2401.04079v1): 103k slides (134k in v4)",
                   "not released: published numbers only", n_parameters=304_000_000),
    PublishedModel("gigapath", "Prov-GigaPath (tile encoder)", _row(.947, .822, .964, .938, .753, .748), 171_189,
                   "Xu et al. 2024 (Nature): 171,189 WSIs", "Prov-GigaPath licence, gated on Hugging Face"),
    PublishedModel("exaonepath", "EXAONEPath", dict(PAPER_ACCURACY), 34_795,
                   "Yun et al. 2024 (arXiv 2408.00380): 34,795 WSIs", "EXAONEPath NC licence, GitHub release"),
)}

# Registered models the paper's table does not have (no published six-task numbers): WSI counts of their papers
EXTRA_WSIS: dict[str, tuple[int, str]] = {
    "lunit_vits8": (36_666, "Kang et al. 2023: 36,666 WSIs (same data as ViT-S/16)"),
    "virchow2": (3_134_922, "Zimmermann et al. 2024: 3.1M WSIs"),
    "uni": (100_426, "Chen et al. 2024 (Nat Med): Mass-100K, 100,426 WSIs"),
    "uni2h": (350_000, "MahmoodLab model card: over 350k WSIs"),
    "hoptimus0": (500_000, "Bioptimus model card: over 500k WSIs"),
}
