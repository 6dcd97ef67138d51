"""The downstream datasets: the paper's six tasks in their official layouts, the small real subsets on disk,
and your own image folders, plus their download sources and command line.

Modules:
    base      `PatchDataset`, `FolderClassDataset`, the layout and read errors
    datasets  PCam, MHIST, CRC-100K, TIL, MSI-CRC, MSI-STAD, the subsets, `folder_<task>`; the registry
              (`DATASETS`, `dataset_class`, `get_dataset`) and the paper's accuracies (`PAPER_ACCURACY`)
    check     `available_datasets` (layout check, optionally decoding every image: `check_images`)
    sources   official sources and checksums; `prepare` downloads when reachable
    cli       `python -m exaonepath_core.data.downstream {check,prepare,sources}`
"""
