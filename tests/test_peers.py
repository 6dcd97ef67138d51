"""Peer foundation models: released key layouts loaded strictly, authors' preprocessing, probe embeddings, the
paper's comparison table / Figure 1 and the per-model collapse ranking on a run with two small peers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from exaonepath_core.models import peers
from exaonepath_core.models.backbones import load_backbone, make_transform, parse_backbone_spec
from exaonepath_core.models.weights import CheckpointMismatchError
from exaonepath_core.report import comparison

# Models small enough to build at their released size here; the others get 2 blocks with the same per-block keys
FULL_SIZE = ("resnet50", "lunit_vits16", "lunit_vits8", "ctranspath", "phikon")
REDUCED_DEPTH = 2


def _depth(name: str) -> int | None:
    return None if name in FULL_SIZE else REDUCED_DEPTH


def _write_released(name: str, path, depth: int | None, seed: int = 0) -> torch.nn.Module:
    """A random model of `name` saved in its released file layout at `path` (safetensors or torch by suffix)."""
    torch.manual_seed(seed)
    model = peers.get_peer(name).new_model(depth=depth).eval()
    state = peers.released_state_dict(name, model)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"model": state} if name == "ctranspath" else state, path)  # TransPath wraps it in 'model'
    return model


def _suffix(name: str) -> str:
    return ".safetensors" if peers.get_peer(name).hf_repo else ".pth"


# Names and shapes of the published files (model cards / released checkpoints), independent of our builders
PUBLISHED_KEYS = {
    "phikon": {"embeddings.cls_token": (1, 1, 768), "embeddings.position_embeddings": (1, 197, 768),
               "embeddings.patch_embeddings.projection.weight": (768, 3, 16, 16),
               "encoder.layer.0.attention.attention.query.weight": (768, 768),
               "encoder.layer.11.intermediate.dense.weight": (3072, 768), "layernorm.bias": (768,)},
    "ctranspath": {"patch_embed.proj.0.weight": (12, 3, 3, 3), "patch_embed.proj.3.weight": (24, 12, 3, 3),
                   "patch_embed.proj.6.weight": (96, 24, 1, 1), "layers.0.downsample.reduction.weight": (192, 384),
                   "layers.2.downsample.norm.weight": (1536,), "norm.weight": (768,)},
    # SwiGLUPacked: fc1 holds value and gate (int(1280 * 5.3375) = 6832 rows), fc2 takes half of them
    "virchow": {"pos_embed": (1, 257, 1280), "blocks.0.mlp.fc1.weight": (6832, 1280),
                "blocks.0.mlp.fc2.weight": (1280, 3416), "blocks.0.ls1.gamma": (1280,)},
    "virchow2": {"reg_token": (1, 4, 1280), "blocks.0.mlp.fc1.weight": (6832, 1280)},
    "gigapath": {"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16),
                 "blocks.0.mlp.fc1.weight": (8192, 1536), "blocks.0.mlp.fc2.weight": (1536, 4096),
                 "blocks.0.ls2.gamma": (1536,)},
    "uni": {"pos_embed": (1, 197, 1024), "blocks.0.ls1.gamma": (1024,)},
    "uni2h": {"reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536), "patch_embed.proj.weight": (1536, 3, 14, 14)},
    "hoptimus0": {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536)},
    "lunit_vits8": {"patch_embed.proj.weight": (384, 3, 8, 8), "pos_embed": (1, 785, 384)},
    "resnet50": {"conv1.weight": (64, 3, 7, 7), "layer4.2.bn3.running_var": (2048,)},
}
# Parameter counts the model cards / papers print (CTransPath 27.5M, Phikon 85.8M, Virchow 631M, GigaPath 1.13B)
PUBLISHED_PARAMETERS = {"ctranspath": 27_520_038, "phikon": 85_798_656, "virchow": 631_229_184,
                        "gigapath": 1_134_953_984}


@pytest.mark.parametrize("name", list(PUBLISHED_KEYS))
def test_released_layout_has_the_published_names_and_shapes(name):
    with torch.device("meta"):
        model = peers.get_peer(name).new_model()
    layout = peers.get_peer(name).released_layout(model)
    for key, shape in PUBLISHED_KEYS[name].items():
        assert layout.get(key) == shape, (key, layout.get(key), shape)


def test_ctranspath_layout_is_timm_0_5_4():
    with torch.device("meta"):
        layout = peers.get_peer("ctranspath").released_layout(peers.get_peer("ctranspath").new_model())
    assert "layers.3.downsample.reduction.weight" not in layout  # 0.5.4: the last stage has no downsample
    assert "layers.0.blocks.1.attn_mask" in layout and "layers.0.blocks.0.attn_mask" not in layout
    assert "layers.3.blocks.1.attn_mask" not in layout  # 7x7 stage: window = resolution, no shift
    assert "layers.0.blocks.0.attn.relative_position_index" in layout


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_the_published_model(name):
    assert peers.count_parameters(name) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", list(peers.PEERS))
def test_strict_load_of_the_released_layout_reproduces_the_model(name, tmp_path):
    path = tmp_path / f"{name}{_suffix(name)}"
    original = _write_released(name, path, _depth(name))
    loaded, ignored = peers.load_peer_weights(name, path, depth=_depth(name))
    assert ignored == []
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = original(x), loaded(x)
    assert got.shape == (2, loaded.num_features)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["phikon", "ctranspath", "lunit_vits16"])
def test_missing_unexpected_and_misshaped_keys_are_named(name, tmp_path):
    path = tmp_path / f"{name}{_suffix(name)}"
    _write_released(name, path, None)
    state = peers.read_weights(path)
    state = state.get("model", state)
    dropped = sorted(state)[3]
    del state[dropped]
    state["blocks.99.extra.weight"] = torch.zeros(1)
    reshaped = [k for k in sorted(state) if k.endswith(".weight") and k != dropped][2]
    state[reshaped] = torch.zeros(7, 7)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointMismatchError) as err:
        peers.load_peer_weights(name, broken)
    message = str(err.value)
    assert dropped in message and "blocks.99.extra.weight" in message and reshaped in message
    assert "missing keys (1)" in message and "unexpected keys (1)" in message and "shape mismatches (1)" in message


def test_classifier_keys_of_the_released_file_are_ignored_and_reported(tmp_path):
    torch.manual_seed(0)
    import timm

    with_fc = timm.create_model("resnet50", pretrained=False)  # torchvision/timm file: 1000-class fc included
    torch.save(with_fc.state_dict(), tmp_path / "resnet50-0676ba61.pth")
    model, ignored = peers.load_peer_weights("resnet50", tmp_path / "resnet50-0676ba61.pth")
    assert ignored == ["fc.bias", "fc.weight"] and model.num_features == 2048


def test_weights_found_in_hugging_face_cache_layouts(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--owkin--phikon"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    _write_released("phikon", snapshot / "model.safetensors", None)
    expected = snapshot / "model.safetensors"
    assert peers.resolve_weights("phikon", repo) == expected  # models--org--name folder
    assert peers.resolve_weights("phikon", tmp_path / "hub") == expected  # hub cache root
    assert peers.resolve_weights("phikon", snapshot) == expected  # snapshot folder
    assert peers.resolve_weights("phikon", expected) == expected  # the file
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert peers.resolve_weights("phikon") == expected  # peer:phikon alone: the local cache
    _model, info = load_backbone("peer:phikon")
    assert info.name == "peer_phikon" and info.embed_dim == 768 and info.extra["n_parameters"] == 85_798_656
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    with pytest.raises(peers.PeerWeightsAbsent, match="models--owkin--phikon"):
        peers.resolve_weights("phikon")
    with pytest.raises(peers.PeerWeightsAbsent, match="not on the Hugging Face hub"):
        peers.resolve_weights("ctranspath")


def test_spec_parsing_names_the_registered_models():
    assert parse_backbone_spec("peer:phikon=/w/phikon") == {"kind": "peer", "peer": "phikon", "path": "/w/phikon"}
    assert parse_backbone_spec("peer:virchow") == {"kind": "peer", "peer": "virchow"}
    with pytest.raises(ValueError, match="registered: resnet50"):
        parse_backbone_spec("peer:phikonn=/w")


# The authors' recipes, written as their own code writes them (torchvision transforms on PIL images)
def _authors_recipe(name: str):
    from torchvision import transforms as T

    bicubic, bilinear = T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR
    imagenet = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    recipes = {
        "resnet50": [T.Resize(256, bilinear), T.CenterCrop(224), T.ToTensor(), imagenet],
        "vit_large_imagenet": [T.Resize(248, bicubic), T.CenterCrop(224), T.ToTensor(),
                               T.Normalize((0.5,) * 3, (0.5,) * 3)],
        "lunit_vits16": [T.Resize(224, bicubic), T.ToTensor(),
                         T.Normalize((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))],
        "ctranspath": [T.Resize(224, bicubic), T.ToTensor(), imagenet],
        "phikon": [T.Resize((224, 224), bicubic), T.ToTensor(), imagenet],
        "virchow": [T.Resize(224, bicubic), T.CenterCrop(224), T.ToTensor(), imagenet],
        "gigapath": [T.Resize(256, bicubic), T.CenterCrop(224), T.ToTensor(), imagenet],
        "hoptimus0": [T.Resize(224, bicubic), T.ToTensor(),
                      T.Normalize((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))],
    }
    # the same recipe as another entry: Lunit ViT-S/8 as ViT-S/16, Virchow2 as Virchow, UNI / UNI2-h Resize(224)
    recipes |= {"lunit_vits8": recipes["lunit_vits16"], "virchow2": recipes["virchow"],
                "uni": recipes["ctranspath"], "uni2h": recipes["ctranspath"]}
    return T.Compose(recipes[name])


@pytest.mark.parametrize("name", list(peers.PEERS))
@pytest.mark.parametrize("patch", ["pcam_subset/train/1", "crc_val_he_7k_subset/TUM"])
def test_preprocessing_equals_the_authors_recipe_on_a_real_patch(name, patch, shared_data):
    path = min((shared_data / "patches" / patch).glob("*.*"))
    image = Image.open(path).convert("RGB")
    ours = make_transform(peers.get_peer(name).preprocess)(torch.from_numpy(np.asarray(image).copy())[None])[0]
    expected = _authors_recipe(name)(image)
    assert ours.shape == expected.shape == (3, 224, 224)
    difference = (ours - expected).abs()
    # PIL resamples in uint8, torch in float: about one grey level on average
    assert float(difference.mean()) < 0.015, float(difference.mean())
    assert peers.get_peer(name).preprocess.macenko is False  # none of the peers was trained on normalized tiles


@pytest.mark.parametrize("name,n_prefix", [("virchow", 1), ("virchow2", 5)])
def test_virchow_embedding_is_cls_and_mean_of_patch_tokens(name, n_prefix):
    torch.manual_seed(0)
    model = peers.get_peer(name).new_model(depth=1).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = model.vit.forward_features(x)
        embedding = model(x)
    assert tokens.shape == (2, n_prefix + 256, 1280)  # 16x16 patches of 14 px; registers are not patch tokens
    expected = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)
    assert embedding.shape == (2, 2560)
    torch.testing.assert_close(embedding, expected)


@pytest.mark.parametrize("name,dim", [("ctranspath", 768), ("resnet50", 2048), ("phikon", 768),
                                      ("gigapath", 1536), ("uni2h", 1536)])
def test_embedding_dimension(name, dim):
    with torch.device("meta"):
        model = peers.get_peer(name).new_model(depth=_depth(name))
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, dim)


def _feature_run(tmp_path, shared_data):
    """Stage-04-like folders: two small peers' real features of real PCam patches under the six task names,
    plus their probes (stage 05) and collapse metrics per model (stage 06)."""
    from exaonepath_core.data.downstream.datasets import get_dataset
    from exaonepath_core.evaluation import collapse, features, probes

    specs = []
    features_dir = tmp_path / "04_features"
    for name in ("lunit_vits16", "ctranspath"):
        weights = tmp_path / f"{name}.pth"
        _write_released(name, weights, None)
        specs.append(f"peer:{name}={weights}")
        model, info = load_backbone(specs[-1])
        transform = make_transform(info)
        for split in ("train", "test"):
            ds = get_dataset("pcam_subset", shared_data / "patches" / "pcam_subset", split).subset(16, seed=0)
            features.extract_features(model, transform, ds, features_dir / info.name / "pcam" / split,
                                      batch_size=16, progress=False, backbone_info=info)
        for task in ("mhist", "crc100k", "til", "msi_crc", "msi_stad"):  # same features: the table's mechanics
            shutil.copytree(features_dir / info.name / "pcam", features_dir / info.name / task)
    specs.append(f"peer:phikon={tmp_path / 'not_downloaded'}")  # configured, weights absent
    frames = []
    for task in ("pcam", "mhist", "crc100k", "til", "msi_crc", "msi_stad"):
        dirs = {b.name: {s: b / task / s for s in ("train", "test")} for b in sorted(features_dir.iterdir())}
        frames.append(probes.run_probes(task, dirs, seeds=[0], n_boot=20, knn_k=5, probes=("logistic",)))
    summary = probes.summary_table(pd.concat(frames, ignore_index=True))
    metric_frames = []
    for bdir in sorted(features_dir.iterdir()):
        X, y, _, _ = features.load_features(bdir / "pcam" / "train")
        slides = np.repeat([f"s{i}" for i in range(4)], len(X) // 4)
        part = collapse.collapse_metrics(np.asarray(X, np.float32), slides, class_labels=np.asarray(y), k=3,
                                         n_boot=20, seed=0)
        part.insert(0, "arm", bdir.name)
        part.insert(0, "cohort", "synthetic")
        metric_frames.append(part)
    return specs, features_dir, summary, pd.concat(metric_frames, ignore_index=True)


@pytest.mark.slow
def test_comparison_table_figure_and_collapse_ranking_with_two_peers(tmp_path, shared_data):
    specs, features_dir, summary, metrics = _feature_run(tmp_path, shared_data)
    manifest = json.loads((features_dir / "peer_ctranspath" / "pcam" / "train" / "manifest.json").read_text())
    assert manifest["backbone"]["extra"]["n_parameters"] == 27_520_038
    status = comparison.peer_status(specs, sorted(p.name for p in features_dir.iterdir()))
    by_model = status.set_index("model")["status"]
    assert by_model["lunit_vits16"] == by_model["ctranspath"] == "measured"
    assert by_model["phikon"] == "absent" and "does not exist" in status.set_index("model").at["phikon", "detail"]
    assert by_model["virchow"] == "not configured" and by_model["rudolfv"] == "published only"
    table = comparison.model_comparison_table(summary, status)
    measured = table[table.source == "measured"].set_index("model")
    assert sorted(measured.index) == ["ctranspath", "lunit_vits16"]  # absent peers: no measured row, never faked
    assert measured.loc["ctranspath", "n_tasks"] == 6 and np.isfinite(measured.loc["ctranspath", "avg"])
    assert measured.loc["ctranspath", "pcam_ci_low"] <= measured.loc["ctranspath", "pcam"]
    published = table[table.source == "published"].set_index("model")
    assert published.loc["exaonepath", "avg"] == pytest.approx(0.861, abs=5e-4)  # the paper's .861
    assert published.loc["rudolfv", "avg"] == pytest.approx(0.871, abs=5e-4)
    assert np.isnan(published.loc["virchow", "avg"])  # three tasks only
    png = comparison.plot_model_comparison(table, tmp_path / "model_comparison.png")
    assert Image.open(png).size[0] > 800
    ranked = comparison.collapse_by_model(metrics)
    assert list(ranked["rank"]) == [1, 2] and set(ranked["kind"]) == {"peer model"}
    over = ranked["slide_id_probe_accuracy"] - ranked["slide_probe_chance"]
    assert over.iloc[0] >= over.iloc[1]
    assert comparison.plot_collapse_by_model(ranked, tmp_path / "collapse_by_model.png").is_file()


def test_empty_run_gives_header_only_tables_and_figures(tmp_path):
    status = comparison.peer_status([], [])
    assert set(status["status"]) == {"not configured", "published only"}
    table = comparison.model_comparison_table(pd.DataFrame(), status)
    assert set(table["source"]) == {"published"} and list(table.columns) == comparison.COMPARISON_COLUMNS
    assert comparison.plot_model_comparison(table, tmp_path / "a.png").is_file()
    ranked = comparison.collapse_by_model(pd.DataFrame())
    assert ranked.empty and list(ranked.columns) == comparison.COLLAPSE_RANK_COLUMNS
    assert comparison.plot_collapse_by_model(ranked, tmp_path / "b.png").is_file()


def test_stage_07_writes_the_comparison_with_nothing_measured_and_links_it(tmp_path):
    from exaonepath_core.config import load_config
    from exaonepath_core.report import html_index
    from exaonepath_core.stages import s06_collapse, s07_report
    from exaonepath_core.stages.results import ResultsPaths

    cfg = load_config("smoke")
    paths = ResultsPaths.for_profile("smoke", tmp_path / "results")
    csv, png = s07_report.write_model_comparison(cfg, paths)  # no stage 04/05 output at all
    table = pd.read_csv(csv)
    assert set(table["source"]) == {"published"} and png.is_file()
    assert (paths.stage_dir("07") / "peer_status.csv").is_file()
    s06 = paths.stage_dir("06")
    s06_collapse.write_collapse_by_model(pd.DataFrame(), s06)
    assert pd.read_csv(s06 / "collapse_by_model.csv").empty
    items, _ = s07_report.report_items(cfg, paths)
    index = html_index.write_index_html(paths.profile_dir, items, title="t")
    linked = {p.name for p in html_index.linked_files(index)}
    assert {"model_comparison.csv", "model_comparison.png", "collapse_by_model.png", "peer_status.csv"} <= linked


def test_config_check_of_peer_specs(tmp_path):
    from exaonepath_core.config import ConfigError
    from exaonepath_core.models.backbones import check_backbone_spec

    check_backbone_spec("features.extra_backbones[0]", "peer:phikon")  # cache lookup: may be absent at run time
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    check_backbone_spec("features.extra_backbones[0]", f"peer:phikon={weights}")
    with pytest.raises(ConfigError, match="not found"):
        check_backbone_spec("features.extra_backbones[0]", f"peer:phikon={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="registered: resnet50"):
        check_backbone_spec("features.extra_backbones[0]", "peer:phikonn")
