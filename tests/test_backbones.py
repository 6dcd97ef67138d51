"""Backbone loading: the official EXAONEPath checkpoint layout (strict), timm, our exports; batch transforms."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from exaonepath_core.models.backbone_info import PreprocessSpec
from exaonepath_core.models.backbones import (
    create_backbone,
    load_backbone,
    load_exaonepath_checkpoint,
    make_transform,
)
from exaonepath_core.models.weights import CheckpointMismatchError


def _dino_vit_base_state_dict() -> dict[str, torch.Tensor]:
    """A random timm vit_base_patch16_224 state_dict renamed to DINO's `vit_base(patch_size=16, num_classes=0)`.

    The only difference between the two layouts is the classifier: timm's default model has `head.weight` /
    `head.bias`, DINO's num_classes=0 model has an Identity head (no keys). Every other name is shared.
    """
    import timm

    torch.manual_seed(0)
    timm_model = timm.create_model("vit_base_patch16_224", pretrained=False)  # with its 1000-class head
    state_dict = timm_model.state_dict()
    assert {"head.weight", "head.bias"} <= set(state_dict)
    return {k: v.clone() for k, v in state_dict.items() if not k.startswith("head.")}


@pytest.fixture(scope="module")
def exaonepath_ckpt(tmp_path_factory):
    state_dict = _dino_vit_base_state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "EXAONEPath.ckpt"
    torch.save({"state_dict": state_dict}, path)
    return path, state_dict


def test_official_layout_loads_and_reproduces_outputs(exaonepath_ckpt):
    path, state_dict = exaonepath_ckpt
    model = load_exaonepath_checkpoint(path)
    assert len(state_dict) == 150 and "cls_token" in state_dict and "blocks.0.attn.qkv.bias" in state_dict
    for key in ("cls_token", "pos_embed", "blocks.11.mlp.fc2.weight", "norm.bias"):
        assert torch.equal(model.state_dict()[key], state_dict[key])
    # a DINO-style forward by hand: CLS token of the final norm
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        features = model(x)
        tokens = model.forward_features(x)
    assert features.shape == (2, 768)
    torch.testing.assert_close(features, tokens[:, 0], rtol=0, atol=0)
    assert model.blocks[0].norm1.eps == pytest.approx(1e-6)


def test_half_precision_checkpoint_loads_as_float32_and_runs(exaonepath_ckpt, tmp_path):
    _, state_dict = exaonepath_ckpt
    path = tmp_path / "half.ckpt"
    torch.save({"state_dict": {k: v.half() for k, v in state_dict.items()}}, path)
    model = load_exaonepath_checkpoint(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model.state_dict()["pos_embed"], state_dict["pos_embed"].half().float())
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 768)


def test_unreadable_checkpoint_error_names_file_without_unsafe_advice(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointMismatchError) as info:
        load_exaonepath_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "weights_only=False" not in message


def test_missing_key_is_named(exaonepath_ckpt, tmp_path):
    _, state_dict = exaonepath_ckpt
    broken = dict(state_dict)
    del broken["blocks.3.attn.qkv.bias"]
    path = tmp_path / "missing.ckpt"
    torch.save({"state_dict": broken}, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): blocks\.3\.attn\.qkv\.bias"):
        load_exaonepath_checkpoint(path)


def test_renamed_and_reshaped_keys_are_named(exaonepath_ckpt, tmp_path):
    _, state_dict = exaonepath_ckpt
    renamed = dict(state_dict)
    renamed["fc_norm.weight"] = renamed.pop("norm.weight")
    renamed["pos_embed"] = renamed["pos_embed"][:, :100]
    path = tmp_path / "renamed.ckpt"
    torch.save({"state_dict": renamed}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_exaonepath_checkpoint(path)
    message = str(info.value)
    assert "missing keys (1): norm.weight" in message
    assert "unexpected keys (1): fc_norm.weight" in message
    assert "pos_embed: checkpoint (1, 100, 768) vs model (1, 197, 768)" in message


def test_wrapper_prefixes_and_dino_teacher_layout(exaonepath_ckpt, tmp_path):
    _, state_dict = exaonepath_ckpt
    teacher = {f"module.backbone.{k}": v for k, v in state_dict.items()}
    teacher["module.head.last_layer.weight_g"] = torch.ones(1, 1)  # DINO projection head, not backbone
    path = tmp_path / "dino_checkpoint.pth"
    torch.save({"teacher": teacher, "epoch": 3}, path)
    model = load_exaonepath_checkpoint(path)
    assert torch.equal(model.state_dict()["blocks.5.mlp.fc1.weight"], state_dict["blocks.5.mlp.fc1.weight"])
    torch.save({"weights": state_dict}, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointMismatchError, match="no 'state_dict'"):
        load_exaonepath_checkpoint(tmp_path / "odd.ckpt")


def test_load_backbone_exaonepath_carries_official_preprocessing(exaonepath_ckpt):
    path, _ = exaonepath_ckpt
    model, info = load_backbone(f"exaonepath:{path}")
    assert (info.embed_dim, info.input_size) == (768, 224)
    spec = info.preprocess
    assert (spec.macenko, spec.resize, spec.crop, spec.interpolation) == (True, 256, 224, "bicubic")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert not any(p.requires_grad for p in model.parameters())
    batch = torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert make_transform(info)(batch).shape == (2, 3, 224, 224)


def test_transform_matches_torchvision_pil_pipeline(shared_data):
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    paths = sorted((shared_data / "patches" / "crc_val_he_7k_subset" / "TUM").glob("*.png"))[:2]
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    ours = make_transform(PreprocessSpec(resize=256, crop=224))(torch.from_numpy(images))
    expected = torch.stack([reference(Image.open(p).convert("RGB")) for p in paths])
    difference = (ours - expected).abs()
    # PIL resamples in uint8, torch in float: differences stay below ~1 grey level on average
    assert float(difference.mean()) < 0.01, float(difference.mean())
    assert float(difference.max()) < 0.2


def test_macenko_step_uses_the_stain_reference(shared_data):
    from exaonepath_core.data.stain.macenko import macenko_normalize_batch
    from exaonepath_core.data.stain.reference import MacenkoReference

    tile = np.asarray(Image.open(shared_data / "stain" / "tiatoolbox_source_image.png").convert("RGB"))[:224, :224]
    batch = torch.from_numpy(np.ascontiguousarray(tile))[None]
    with_macenko = make_transform(PreprocessSpec(resize=224, crop=224, macenko=True))
    plain = make_transform(PreprocessSpec(resize=224, crop=224))
    normalized, fallback = macenko_normalize_batch(batch, MacenkoReference.default())
    assert not bool(fallback.any())
    torch.testing.assert_close(with_macenko(batch), plain(normalized))
    assert float((with_macenko(batch) - plain(batch)).abs().mean()) > 0.05  # the stain step changed the colours


def test_ours_export_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", img_size=64, patch_size=16)
    torch.save(model.state_dict(), tmp_path / "teacher_backbone.pth")
    meta = {"arch": "vit_tiny_patch16_224", "patch_size": 16, "img_size": 64, "embed_dim": 192, "arm": "macenko"}
    (tmp_path / "teacher_backbone.json").write_text(json.dumps(meta))
    loaded, info = load_backbone(f"ours:{tmp_path / 'teacher_backbone.pth'}")
    assert (info.embed_dim, info.input_size, info.preprocess.macenko) == (192, 64, True)
    assert info.name == "ours-macenko"
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    del meta["embed_dim"]
    (tmp_path / "teacher_backbone.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lacks embed_dim"):
        load_backbone(f"ours:{tmp_path / 'teacher_backbone.pth'}")


def test_timm_specs():
    model, info = load_backbone({"kind": "timm", "model_name": "resnet18", "input_size": 96, "seed": 0})
    assert (info.embed_dim, info.input_size, info.name) == (512, 96, "timm-resnet18-random")
    with torch.inference_mode():
        out = model(make_transform(info)(torch.zeros(2, 96, 96, 3, dtype=torch.uint8)))
    assert out.shape == (2, 512)
    with pytest.raises(ValueError, match="no model named"):
        load_backbone("timm:not_a_model_xyz")
    with pytest.raises(ValueError, match="unknown backbone kind"):
        load_backbone("hub:dinov2")
    with pytest.raises(ValueError, match="must look like"):
        load_backbone("resnet18")


def test_extra_backbones_with_the_same_file_name_are_all_kept(tmp_path):
    from types import SimpleNamespace

    from exaonepath_core.stages.s04_features import backbone_specs

    extra = [f"exaonepath:{tmp_path}/lab_a/EXAONEPath.ckpt", f"exaonepath:{tmp_path}/lab_b/EXAONEPath.ckpt",
             "timm:resnet18", "timm:resnet18"]
    cfg = SimpleNamespace(arms=["raw"], features=SimpleNamespace(include_untrained=False, extra_backbones=extra))
    specs = backbone_specs(cfg, tmp_path / "03_pretrain")
    assert sorted(specs.values()) == sorted([f"ours:{tmp_path}/03_pretrain/raw/teacher_backbone.pth", *extra])
    assert {"exaonepath_EXAONEPath", "exaonepath_lab_b_EXAONEPath", "timm_resnet18", "timm_resnet18_2"} <= set(specs)


def test_random_init_timm_backbone_is_reproducible_without_a_seed_in_the_spec():
    first, info = load_backbone("timm:resnet18")
    second, _ = load_backbone("timm:resnet18")
    assert info.extra["seed"] == 0
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_official_checkpoint_gets_the_runs_macenko_reference(exaonepath_ckpt, shared_data, capsys):
    from exaonepath_core.config import load_config
    from exaonepath_core.data.stain.macenko import fit_reference
    from exaonepath_core.data.stain.reference import MacenkoReference
    from exaonepath_core.stages import s04_features

    path, _ = exaonepath_ckpt
    cfg = load_config("smoke", {"device": "cpu"})
    _, _, info = s04_features.load_backbone_with_transform(f"exaonepath:{path}", cfg)
    assert info.preprocess.macenko_reference == MacenkoReference.default().to_dict()
    assert (info.preprocess.resize, info.preprocess.crop) == (224, 224)  # smoke: center_crop_fraction 1.0
    assert "target_TCGA-55-A48X" in capsys.readouterr().out  # the user is told how to match the official colours

    target = shared_data / "stain" / "tiatoolbox_target_image.png"
    cfg = load_config("smoke", {"device": "cpu", "normalize.reference_image": str(target)})
    _, transform, info = s04_features.load_backbone_with_transform(f"exaonepath:{path}", cfg)
    fitted = fit_reference(np.asarray(Image.open(target).convert("RGB")))
    np.testing.assert_allclose(info.preprocess.macenko_reference["stain_matrix"], fitted.stain_matrix, atol=1e-9)
    assert "target_TCGA-55-A48X" not in capsys.readouterr().out
    default = load_backbone(f"exaonepath:{path}")[1]
    batch = torch.from_numpy(np.asarray(Image.open(target).convert("RGB"))[:96, :96].copy())[None]
    assert not torch.equal(transform(batch), make_transform(default)(batch))  # the reference reaches the pixels


def test_one_evaluation_crop_recipe_for_every_backbone():
    from exaonepath_core.config import load_config
    from exaonepath_core.stages import s04_features

    cfg = load_config("paper", {"device": "cpu"})
    assert cfg.features.center_crop_fraction == 0.875
    _, transform, info = s04_features.load_backbone_with_transform("timm:vit_tiny_patch16_224", cfg)
    assert (info.preprocess.resize, info.preprocess.crop) == (256, 224)  # DINO's linear-eval Resize 256 + crop 224
    batch = torch.arange(96 * 96 * 3, dtype=torch.int64).reshape(1, 96, 96, 3).remainder(256).to(torch.uint8)
    cropped = transform(batch)
    whole = s04_features.load_backbone_with_transform(
        "timm:vit_tiny_patch16_224", load_config("paper", {"device": "cpu", "features.center_crop_fraction": 1.0}))
    assert whole[2].preprocess.resize == 224 and cropped.shape == whole[1](batch).shape == (1, 3, 224, 224)
    assert not torch.equal(cropped, whole[1](batch))


def test_feature_time_macenko_uses_the_runs_estimate_parameters(exaonepath_ckpt, shared_data):
    from exaonepath_core.config import load_config
    from exaonepath_core.stages import s04_features

    path, _ = exaonepath_ckpt
    spec = f"exaonepath:{path}"
    paper_values = s04_features.load_backbone_with_transform(spec, load_config("smoke", {"device": "cpu"}))
    strict = s04_features.load_backbone_with_transform(spec, load_config("smoke", {"device": "cpu", "normalize.beta": 0.6}))
    assert paper_values[2].preprocess.macenko_params == {"Io": 240.0, "alpha": 1.0, "beta": 0.15}
    assert strict[2].preprocess.macenko_params["beta"] == 0.6
    raw = s04_features.load_backbone_with_transform("timm:vit_tiny_patch16_224", load_config("smoke", {"device": "cpu"}))
    assert raw[2].preprocess.macenko_params is None  # no Macenko step, nothing to parametrise
    tile = np.asarray(Image.open(shared_data / "stain" / "tiatoolbox_source_image.png").convert("RGB"))[:96, :96]
    batch = torch.from_numpy(tile.copy())[None]
    assert not torch.equal(paper_values[1](batch), strict[1](batch))
