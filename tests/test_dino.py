"""DINO building blocks against their definitions: loss, centre, EMA, head, multi-crop, schedules, DDP gradients."""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from exaonepath_core.models.backbones import create_backbone
from exaonepath_core.pretrain import head as dino_head
from exaonepath_core.pretrain import loss as dino_losses
from exaonepath_core.pretrain import multicrop, view_params
from exaonepath_core.pretrain import step as pretrain_step
from exaonepath_core.pretrain.schedules import cosine_schedule, warmup_then_constant


# ---------------------------------------------------------------------------------------------------------------
# loss, centre, EMA
# ---------------------------------------------------------------------------------------------------------------
def _loss_by_definition(student, teacher, center, student_temp, teacher_temp, n_global):
    """Float64 loops straight from the paper: mean over (teacher view, other student view) pairs and samples."""
    student = student.double().numpy()
    teacher = teacher.double().numpy()
    center = center.double().numpy()
    batch = teacher.shape[0] // n_global
    n_crops = student.shape[0] // batch
    pair_losses = []
    for iq in range(n_global):
        for v in range(n_crops):
            if v == iq:
                continue
            per_sample = []
            for b in range(batch):
                t = (teacher[iq * batch + b] - center[0]) / teacher_temp
                p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
                s = student[v * batch + b] / student_temp
                log_p_s = s - s.max() - np.log(np.exp(s - s.max()).sum())
                per_sample.append(-(p_t * log_p_s).sum())
            pair_losses.append(np.mean(per_sample))
    return float(np.mean(pair_losses)), len(pair_losses)


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_equals_definition(n_local):
    gen = torch.Generator().manual_seed(n_local)
    batch, k = 5, 17
    n_crops = 2 + n_local
    student = torch.randn(n_crops * batch, k, generator=gen) * 3
    teacher = torch.randn(2 * batch, k, generator=gen) * 3
    center = torch.randn(1, k, generator=gen)
    got = dino_losses.dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    want, n_pairs = _loss_by_definition(student, teacher, center, 0.1, 0.04, 2)
    assert n_pairs == 2 * n_crops - 2  # same-view pairs skipped
    assert got.ndim == 0
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_dino_loss_gradient_only_reaches_student():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(8, 6, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 6, generator=gen, requires_grad=True)
    dino_losses.dino_loss(student, teacher, torch.zeros(1, 6), 0.1, 0.04).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert teacher.grad is None


def test_dino_loss_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="not divisible"):
        dino_losses.dino_loss(torch.zeros(6, 4), torch.zeros(3, 4), torch.zeros(1, 4), 0.1, 0.04)
    with pytest.raises(ValueError, match="multiple of the batch"):
        dino_losses.dino_loss(torch.zeros(7, 4), torch.zeros(4, 4), torch.zeros(1, 4), 0.1, 0.04)


def test_update_center_matches_formula():
    gen = torch.Generator().manual_seed(2)
    center = torch.randn(1, 9, generator=gen)
    teacher = torch.randn(12, 9, generator=gen)
    new = dino_losses.update_center(center, teacher, momentum=0.9)
    expected = 0.9 * center.double() + 0.1 * teacher.double().mean(0, keepdim=True)
    torch.testing.assert_close(new.double(), expected, rtol=0, atol=1e-6)
    assert new.shape == (1, 9)
    torch.testing.assert_close(center, torch.randn(1, 9, generator=torch.Generator().manual_seed(2)))  # untouched


@pytest.mark.parametrize("mode", ["per_parameter", "global"])
def test_clip_gradients_matches_definition(mode):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(2, 2)),
              nn.Parameter(torch.randn(4))]
    grads = [torch.randn(5, 3) * 4.0, torch.randn(7) * 0.1, torch.randn(2, 2) * 10.0, None]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    max_norm = 1.5
    total = dino_losses.clip_gradients_(params, max_norm, mode)
    present = [g for g in grads if g is not None]
    expected_total = math.sqrt(sum(float(g.pow(2).sum()) for g in present))
    assert total == pytest.approx(expected_total, rel=1e-5)
    for p, g in zip(params, grads):
        if g is None:
            assert p.grad is None
            continue
        norm = float(g.norm())
        scale = min(1.0, max_norm / ((norm if mode == "per_parameter" else expected_total) + 1e-6))
        torch.testing.assert_close(p.grad, g * scale)
    if mode == "per_parameter":  # the small gradient is untouched, the large ones end at max_norm each
        torch.testing.assert_close(params[1].grad, grads[1])
        assert float(params[0].grad.norm()) == pytest.approx(max_norm, rel=1e-4)
        assert float(params[2].grad.norm()) == pytest.approx(max_norm, rel=1e-4)
    with pytest.raises(ValueError, match="clip mode"):
        dino_losses.clip_gradients_(params, max_norm, "norm")


def test_ema_update_matches_formula():
    torch.manual_seed(3)
    student = dino_head.DINOHead(8, out_dim=10, hidden_dim=12, bottleneck_dim=4)
    teacher = dino_head.DINOHead(8, out_dim=10, hidden_dim=12, bottleneck_dim=4)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    dino_losses.ema_update_(teacher, student, momentum=0.7)
    after = teacher.state_dict()
    for key, old in before_t.items():
        torch.testing.assert_close(after[key], 0.7 * old + 0.3 * before_s[key], rtol=0, atol=1e-6)
    for key, value in student.state_dict().items():
        assert torch.equal(value, before_s[key])  # the student is read, never written
    with pytest.raises(ValueError, match="parameters differ"):
        dino_losses.ema_update_(teacher, nn.Linear(2, 2), 0.5)


def _sinkhorn_reference(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """SwAV/DINOv2 Sinkhorn-Knopp written out plainly in float64: Q = exp(L / T)^T, alternately normalised so
    that each of the K dimensions holds 1/K and each of the B samples 1/B of the mass; rows returned summing to 1."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_knopp_targets_equal_plain_definition(iterations):
    logits = torch.randn(24, 16, generator=torch.Generator().manual_seed(iterations)) * 0.3
    ours = dino_losses.teacher_probabilities(logits, torch.zeros(1, 16), 0.07, "sinkhorn_knopp", iterations)
    np.testing.assert_allclose(ours.numpy(), _sinkhorn_reference(logits.numpy(), 0.07, iterations),
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.sum(1), torch.ones(24))


def test_sinkhorn_knopp_balances_dimensions_and_survives_huge_logits():
    logits = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    logits[:, 5] += 3.0  # one dimension dominates every sample: a running centre needs many steps to undo it
    q = dino_losses.teacher_probabilities(logits, torch.zeros(1, 32), 0.04, "sinkhorn_knopp", 200)
    torch.testing.assert_close(q.sum(0), torch.full((32,), 64 / 32), rtol=0.02, atol=0.0)  # each dim: B/K
    plain = dino_losses.teacher_probabilities(logits, torch.zeros(1, 32), 0.04, "center")
    assert plain[:, 5].mean() > 0.7 and q[:, 5].mean() < 0.05
    # logits / T near 1e4 neither overflow nor give NaN: a common shift is removed exactly
    shifted = dino_losses.teacher_probabilities(logits + 400.0, torch.zeros(1, 32), 0.04, "sinkhorn_knopp", 200)
    torch.testing.assert_close(shifted, q, rtol=0.01, atol=1e-3)  # float32 input: 400 + x keeps ~5 digits of x
    with pytest.raises(ValueError, match="centering"):
        dino_losses.teacher_probabilities(logits, torch.zeros(1, 32), 0.04, "softmax")


def test_teacher_stats_detect_collapse():
    k = 32
    uniform = dino_losses.teacher_stats(torch.zeros(6, k), torch.zeros(1, k), 0.04)
    assert uniform["teacher_entropy"] == pytest.approx(math.log(k), rel=1e-5)
    assert uniform["teacher_kl"] == pytest.approx(0.0, abs=1e-5)
    one_hot = torch.zeros(6, k)
    one_hot[:, 3] = 10.0
    dominant = dino_losses.teacher_stats(one_hot, torch.zeros(1, k), 0.04)
    assert dominant["teacher_entropy_of_mean"] < 1e-3 and dominant["teacher_kl"] == pytest.approx(0.0, abs=1e-3)
    diverse = torch.eye(k)[:6] * 10.0
    healthy = dino_losses.teacher_stats(diverse, torch.zeros(1, k), 0.04)
    assert healthy["teacher_kl"] == pytest.approx(math.log(6), rel=1e-3)


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_loss_and_stats_from_shared_targets_equal_the_direct_ones(centering):
    # the training step computes the targets once for both the loss and the diagnostics
    g = torch.Generator().manual_seed(3)
    student, teacher, center = torch.randn(20, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(1, 16)
    direct = dino_losses.dino_loss(student, teacher, center, 0.1, 0.05, centering=centering)
    p = dino_losses.teacher_probabilities(teacher, center, 0.05, centering)
    assert float(dino_losses.dino_loss_from_targets(student, p, 0.1)) == pytest.approx(float(direct), rel=1e-6)
    assert dino_losses.target_stats(p, center) == dino_losses.teacher_stats(teacher, center, 0.05, centering)
    with pytest.raises(ValueError, match="not divisible"):
        dino_losses.dino_loss_from_targets(student, p[:7], 0.1)


# ---------------------------------------------------------------------------------------------------------------
# head and wrapper
# ---------------------------------------------------------------------------------------------------------------
def test_dino_head_weight_norm_layout_and_frozen_norm():
    head = dino_head.DINOHead(16, out_dim=40, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    keys = set(head.state_dict())
    assert {"last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"} <= keys
    assert not any(k.endswith(("weight_g", "weight_v")) for k in keys)
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (40, 1) and not g.requires_grad and torch.all(g == 1)
    # with g = 1 every output row of the effective weight has unit norm
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    out = head(torch.randn(3, 16))
    assert out.shape == (3, 40)
    # state dict round trip into a fresh head (strict) reproduces outputs
    other = dino_head.DINOHead(16, out_dim=40, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    other.load_state_dict(head.state_dict(), strict=True)
    x = torch.randn(2, 16)
    torch.testing.assert_close(other(x), head(x))
    assert dino_head.DINOHead(16, out_dim=40, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_runs_backbone_once_per_resolution():
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
    head = dino_head.DINOHead(backbone.num_features, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    wrapper = dino_head.MultiCropWrapper(backbone, head).eval()
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    out = wrapper(crops)
    assert calls == [(4, 3, 32, 32), (6, 3, 16, 16)]
    assert out.shape == (10, 20)
    with torch.no_grad():
        separate = torch.cat([head(backbone(c)) for c in crops])
    torch.testing.assert_close(out, separate, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# multi-crop augmentation
# ---------------------------------------------------------------------------------------------------------------
def _he_like_patch(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 180], dtype=np.float64)
    field = rng.normal(0, 30, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
    return np.clip(base + field, 0, 255).astype(np.uint8)


def test_multicrop_shapes_and_determinism():
    aug = multicrop.MultiCropAugmentation(global_size=48, local_size=24, n_local=3)
    image = _he_like_patch()
    views = aug(image, torch.Generator().manual_seed(5))
    assert aug.n_crops == 5 and len(views) == 5
    assert [tuple(v.shape) for v in views] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    again = aug(torch.from_numpy(image), torch.Generator().manual_seed(5))  # tensor input, same seed
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = aug(image, torch.Generator().manual_seed(6))
    assert not torch.equal(views[0], other[0])
    # normalised with ImageNet statistics: the pixel range maps into [-mean/std, (1-mean)/std]
    low = -max(m / s for m, s in zip(view_params.IMAGENET_MEAN, view_params.IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(view_params.IMAGENET_MEAN, view_params.IMAGENET_STD))
    assert all(float(v.min()) >= low - 1e-4 and float(v.max()) <= high + 1e-4 for v in views)


def test_multicrop_crops_follow_scale_and_params_are_well_formed():
    aug = multicrop.MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    params = torch.stack([aug.sample_params(96, 96, torch.Generator().manual_seed(s)) for s in range(200)])
    assert params.shape == (200, 4, view_params.N_VIEW_PARAMS) and params.dtype == torch.float64
    top, left, h, w = (params[..., k] for k in (view_params.P_TOP, view_params.P_LEFT, view_params.P_HEIGHT, view_params.P_WIDTH))
    assert bool((top >= 0).all() and (top + h <= 96).all() and (left >= 0).all() and (left + w <= 96).all())
    area = (h * w / 96**2).numpy()
    assert 0.35 <= area[:, :2].min() and area[:, :2].max() <= 1.0
    assert 0.04 <= area[:, 2:].min() and area[:, 2:].max() <= 0.45
    assert area[:, :2].mean() > 2 * area[:, 2:].mean()
    aspect = (w / h).numpy()
    assert aspect.min() >= 0.7 and aspect.max() <= 1.45  # 3/4..4/3 up to pixel rounding
    # probabilities: flip 0.5, jitter 0.8, grayscale 0.2, blur 1.0 / 0.1 / 0.5, solarize 0.2 on global 2 only
    flips, grays = params[..., view_params.P_FLIP].numpy(), params[..., view_params.P_GRAY].numpy()
    jitter = (params[..., view_params.P_BRIGHTNESS:view_params.P_HUE + 1] != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(-1).numpy()
    sigma, solarize = params[..., view_params.P_SIGMA].numpy(), params[..., view_params.P_SOLARIZE].numpy()
    assert 0.4 < flips.mean() < 0.6 and 0.7 < jitter.mean() < 0.9 and 0.12 < grays.mean() < 0.28
    assert (sigma[:, 0] > 0).all() and (sigma[:, 1] > 0).mean() < 0.2 and 0.4 < (sigma[:, 2:] > 0).mean() < 0.6
    assert sigma.max() <= 2.0 and sigma[sigma > 0].min() >= 0.1
    assert solarize[:, [0, 2, 3]].sum() == 0 and 0.12 < solarize[:, 1].mean() < 0.3
    factors = params[..., view_params.P_BRIGHTNESS:view_params.P_HUE + 1].numpy()
    assert factors[..., :2].min() >= 0.6 and factors[..., :2].max() <= 1.4 and np.abs(factors[..., 3]).max() <= 0.1
    orders = params[..., view_params.P_ORDER].numpy()
    assert (np.sort(orders, -1) == np.arange(4)).all()  # a permutation of the four colour ops
    assert len({tuple(o) for o in orders[jitter]}) == 24  # every order occurs


def test_batched_multicrop_is_per_sample_deterministic_regardless_of_batch():
    """Same (seed, epoch, index) -> same views, whether alone, in a batch, or in another batch order."""
    aug = multicrop.MultiCropAugmentation(global_size=40, local_size=20, n_local=3)
    images = torch.from_numpy(np.stack([_he_like_patch(64, seed) for seed in range(9)]))
    params = torch.stack([
        aug.sample_params(64, 64, torch.Generator().manual_seed(view_params.sample_seed(7, 2, i))) for i in range(9)
    ])
    again = aug.sample_params(64, 64, torch.Generator().manual_seed(view_params.sample_seed(7, 2, 4)))
    assert torch.equal(again, params[4])
    whole = aug.apply(images, params)
    order = torch.tensor([5, 2, 8, 0, 7])
    subset = aug.apply(images[order], params[order])
    for view_whole, view_subset in zip(whole, subset):
        assert torch.equal(view_whole[order], view_subset)
    for index in (0, 4):
        alone = aug(images[index].numpy(), torch.Generator().manual_seed(view_params.sample_seed(7, 2, index)))
        assert all(torch.equal(v[index], a) for v, a in zip(whole, alone))
    # a different epoch draws different views of the same image
    other = aug.sample_params(64, 64, torch.Generator().manual_seed(view_params.sample_seed(7, 3, 4)))
    assert not torch.equal(other, params[4])


def test_batched_multicrop_statistics_are_sane():
    aug = multicrop.MultiCropAugmentation(global_size=48, local_size=24, n_local=4)
    images = torch.from_numpy(np.stack([_he_like_patch(96, seed) for seed in range(32)]))
    params = torch.stack([aug.sample_params(96, 96, torch.Generator().manual_seed(s)) for s in range(32)])
    views = aug.apply(images, params)
    assert [tuple(v.shape) for v in views] == [(32, 3, 48, 48)] * 2 + [(32, 3, 24, 24)] * 4
    low = -max(m / s for m, s in zip(view_params.IMAGENET_MEAN, view_params.IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(view_params.IMAGENET_MEAN, view_params.IMAGENET_STD))
    for view in views:
        assert view.dtype == torch.float32 and bool(torch.isfinite(view).all())
        assert low - 1e-4 <= float(view.min()) and float(view.max()) <= high + 1e-4
        # pink H&E-like inputs: channel means of the un-normalised views stay near the input's, spread is kept
        pixels = view * torch.tensor(view_params.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(view_params.IMAGENET_MEAN).view(
            1, 3, 1, 1)
        mean = pixels.mean((0, 2, 3))
        input_mean = images.float().mean((0, 1, 2)) / 255
        assert float((mean - input_mean).abs().max()) < 0.2, (mean, input_mean)  # grayscale p=0.2 pulls to gray
        assert 0.03 < float(pixels.std()) < 0.4
    # the views of one sample are different crops of it
    assert float((views[2] - views[3]).abs().mean()) > 0.05


def test_batched_pixel_ops_match_torchvision():
    """Crop+resize, blur and brightness/contrast/saturation equal torchvision's ops (float rounding apart)."""
    import torchvision.transforms.v2.functional as tvf
    from torchvision.transforms import InterpolationMode

    aug = multicrop.MultiCropAugmentation(global_size=48, local_size=24, n_local=2)
    image = torch.from_numpy(_he_like_patch(96, 3))
    params = aug.sample_params(96, 96, torch.Generator().manual_seed(0))[None].clone()
    params[..., view_params.P_FLIP] = 1.0
    params[..., view_params.P_BRIGHTNESS:view_params.P_HUE + 1] = torch.tensor([1.2, 0.8, 1.3, 0.0])
    params[..., view_params.P_ORDER] = torch.tensor([1.0, 0.0, 2.0, 3.0])  # contrast, brightness, saturation
    params[..., view_params.P_GRAY] = 0.0
    params[..., view_params.P_SIGMA] = torch.tensor([1.5, 0.0, 0.7, 0.0])
    params[..., view_params.P_SOLARIZE] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    views = aug.apply(image[None], params)
    img = image.permute(2, 0, 1).float() / 255
    for c, view in enumerate(views):
        top, left, h, w = (int(params[0, c, k]) for k in (view_params.P_TOP, view_params.P_LEFT, view_params.P_HEIGHT, view_params.P_WIDTH))
        size = view.shape[-1]
        ref = tvf.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                               antialias=True).clamp(0, 1)
        ref = tvf.horizontal_flip(ref)
        ref = tvf.adjust_saturation(tvf.adjust_brightness(tvf.adjust_contrast(ref, 0.8), 1.2), 1.3)
        sigma = float(params[0, c, view_params.P_SIGMA])
        if sigma > 0:
            kernel = min(2 * math.ceil(3 * sigma) + 1, size - 1)
            ref = tvf.gaussian_blur(ref, [kernel, kernel], [sigma, sigma])
        if c == 1:
            ref = tvf.solarize(ref, 0.5)
        ref = tvf.normalize(ref, view_params.IMAGENET_MEAN, view_params.IMAGENET_STD)
        torch.testing.assert_close(view[0], ref, rtol=0, atol=2e-5)


def test_hue_jitter_is_a_luma_preserving_rotation_close_to_torchvision():
    import torchvision.transforms.v2.functional as tvf

    # H&E-like colours (the approximation is looser on saturated arbitrary colours: not asserted)
    pixels = torch.from_numpy(_he_like_patch(32, 1)).permute(2, 0, 1)[None].float() / 255
    factors = torch.tensor([0.0, 0.05, -0.08], dtype=torch.float64)
    matrices = multicrop._hue_matrices(factors)
    assert torch.equal(matrices[0], torch.eye(3, dtype=torch.float64))  # exactly the identity at 0
    luma = torch.tensor(view_params.RGB_TO_YIQ[0])
    for matrix, factor in zip(matrices[1:], factors[1:]):
        torch.testing.assert_close(luma @ matrix, luma)  # Y unchanged
        shifted = torch.einsum("ij,njhw->nihw", matrix.float(), pixels)[0]
        opposite = torch.einsum("ij,jhw->ihw", multicrop._hue_matrices(-factor.view(1))[0].float(), pixels[0])
        reference = tvf.adjust_hue(pixels[0], float(factor))
        error = float((shifted - reference).abs().mean())
        # same direction as torchvision's HSV shift: closer to it than no change or the opposite rotation
        assert error < 0.85 * float((pixels[0] - reference).abs().mean())
        assert error < 0.85 * float((opposite - reference).abs().mean())


def test_multicrop_rejects_bad_input():
    aug = multicrop.MultiCropAugmentation(32, 16, 1)
    with pytest.raises(ValueError, match="uint8"):
        aug(np.zeros((32, 32, 3), dtype=np.float32), torch.Generator())
    with pytest.raises(ValueError, match="uint8"):
        aug(np.zeros((3, 32, 32), dtype=np.uint8), torch.Generator())
    with pytest.raises(ValueError, match="global_scale"):
        multicrop.MultiCropAugmentation(32, 16, 1, global_scale=(0.5, 0.2))


def test_sample_seed_is_pure_and_distinct():
    assert view_params.sample_seed(0, 1, 2) == view_params.sample_seed(0, 1, 2)
    seeds = {view_params.sample_seed(0, e, i) for e in range(3) for i in range(100)}
    assert len(seeds) == 300


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------
def test_cosine_schedule_length_and_end_points():
    sched = cosine_schedule(1.0, 0.1, epochs=5, steps_per_epoch=7, warmup_epochs=2, start_warmup=0.0)
    assert len(sched) == 35
    assert sched[0] == 0.0
    assert sched[14] == pytest.approx(1.0)  # first step after warm-up starts the cosine at `base`
    assert sched[-1] == pytest.approx(0.1)
    assert np.all(np.diff(sched[:14]) > 0) and np.all(np.diff(sched[14:]) < 0)
    midpoint = 14 + (35 - 14 - 1) / 2
    assert np.interp(midpoint, np.arange(35), sched) == pytest.approx(0.55, abs=1e-3)
    no_warmup = cosine_schedule(0.996, 1.0, epochs=3, steps_per_epoch=4)
    assert len(no_warmup) == 12 and no_warmup[0] == pytest.approx(0.996) and no_warmup[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cosine_schedule(1, 0, epochs=2, steps_per_epoch=3, warmup_epochs=3)


def test_teacher_temperature_schedule():
    sched = warmup_then_constant(0.04, 0.07, warmup_epochs=2, epochs=4, steps_per_epoch=5)
    assert len(sched) == 20
    assert sched[0] == pytest.approx(0.04) and sched[9] == pytest.approx(0.07)
    assert np.all(sched[10:] == 0.07) and np.all(np.diff(sched[:10]) > 0)


# ---------------------------------------------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------------------------------------------
def _tiny_student(seed: int = 0, out_dim: int = 64, norm_last_layer: bool = True) -> dino_head.MultiCropWrapper:
    torch.manual_seed(seed)
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
    head = dino_head.DINOHead(backbone.num_features, out_dim=out_dim, hidden_dim=64, bottleneck_dim=16,
                         norm_last_layer=norm_last_layer)
    return dino_head.MultiCropWrapper(backbone, head)


def _fixed_views(batch: int, seed: int = 0) -> list[torch.Tensor]:
    aug = multicrop.MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    per_sample = [aug(_he_like_patch(64, seed + i), torch.Generator().manual_seed(seed + i)) for i in range(batch)]
    return [torch.stack([s[c] for s in per_sample]) for c in range(aug.n_crops)]


def test_few_steps_decrease_loss_on_fixed_batch():
    student = _tiny_student(0)
    teacher = _tiny_student(1)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    views = _fixed_views(8)
    center = torch.zeros(1, 64)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        with torch.no_grad():
            teacher_out = teacher(views[:2])
        loss = dino_losses.dino_loss(student(views), teacher_out, center, 0.1, 0.04)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dino_losses.ema_update_(teacher, student, 0.99)
        center = dino_losses.update_center(center, teacher_out, 0.9)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------------------------------------------------------
# the real step, pretrain_step.DINOTrainStep, against a hand computation from DINO's Algorithm 1
# ---------------------------------------------------------------------------------------------------------------
LAST_LAYER = "head.last_layer."


def _targets_by_definition(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float, centering: str,
                           iterations: int) -> torch.Tensor:
    """Float64 teacher targets: softmax((t - c) / T), or the plain Sinkhorn-Knopp of `_sinkhorn_reference`."""
    if centering == "center":
        return torch.softmax((teacher_out.double() - center.double()) / teacher_temp, dim=-1)
    return torch.from_numpy(_sinkhorn_reference(teacher_out.double().numpy(), teacher_temp, iterations))


def _loss_from_definition(student_out: torch.Tensor, targets: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over (teacher global view i, student view v != i) of the batch-mean cross-entropy H(P_t^i, P_s^v)."""
    batch = targets.shape[0] // 2
    n_views = student_out.shape[0] // batch
    terms = []
    for i in range(2):
        p_teacher = targets[i * batch:(i + 1) * batch]
        for v in range(n_views):
            if v != i:
                log_p_student = torch.log_softmax(student_out[v * batch:(v + 1) * batch].double() / student_temp, -1)
                terms.append(-(p_teacher * log_p_student).sum(-1).mean())
    assert len(terms) == 2 * n_views - 2
    return torch.stack(terms).mean()


def _clip_by_definition(grads: dict[str, torch.Tensor], max_norm: float, mode: str) -> float:
    """DINO's per-parameter clipping (each gradient to norm <= max_norm) or one joint scale; returns the norm
    of all gradients before clipping."""
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    for grad in grads.values():
        norm = float(grad.double().norm()) if mode == "per_parameter" else total
        grad.mul_(min(1.0, max_norm / (norm + 1e-6)))
    return total


class _AdamWByDefinition:
    """Loshchilov & Hutter's AdamW written out in float64: decoupled decay (none on biases and 1-D tensors, as
    DINO's `get_params_groups`), bias-corrected moments, torch's defaults betas (0.9, 0.999) and eps 1e-8; a
    parameter without gradient is skipped altogether (no decay, no moment update)."""

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.betas, self.eps = betas, eps
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float,
             weight_decay: float) -> dict[str, torch.Tensor]:
        """The parameters after one step (those without a gradient returned unchanged)."""
        beta1, beta2 = self.betas
        updated = dict(params)
        for name, grad in grads.items():
            grad = grad.double()
            m, v, t = self.moments.get(name, (torch.zeros_like(grad), torch.zeros_like(grad), 0))
            m, v, t = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad * grad, t + 1
            self.moments[name] = (m, v, t)
            decay = 0.0 if name.endswith(".bias") or params[name].ndim <= 1 else weight_decay
            value = params[name].double() * (1 - lr * decay)
            value -= lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + self.eps)
            updated[name] = value.float()
        return updated


def _assert_close_by_name(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str,
                          atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys(), f"{what}: {sorted(actual.keys() ^ expected.keys())[:4]}"
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=atol,
                                   msg=lambda detail, name=name: f"{what}, {name}: {detail}")


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("centering, clip_mode, freeze_last_layer", [
    ("center", "per_parameter", False),
    ("sinkhorn_knopp", "global", False),
    ("center", "per_parameter", True),
])
def test_train_step_equals_dino_algorithm_by_hand(centering, clip_mode, freeze_last_layer):
    """Two calls of the production step against the definition: teacher targets from the two global views only,
    the loss over (teacher view i, student view v != i) pairs, clipping, AdamW, then the EMA of the UPDATED
    student; with freeze_last_layer the head's last layer (its norm g trainable here) does not move."""
    student = _tiny_student(0, norm_last_layer=False)
    teacher = _tiny_student(1)  # unlike the student: wrong targets or a wrong EMA cannot hide behind equality
    teacher.requires_grad_(False)
    step = pretrain_step.DINOTrainStep(student, student, teacher, pretrain_step.make_optimizer(student, fused=False),
                                  student_temp=0.1, centering=centering, sinkhorn_iterations=3, clip_grad=0.3,
                                  use_amp=False, clip_grad_mode=clip_mode)
    adamw = _AdamWByDefinition()
    center = torch.randn(1, 64, generator=torch.Generator().manual_seed(9)) * 0.3
    last_layer = {n for n, _ in student.named_parameters() if n.startswith(LAST_LAYER)}
    assert len(last_layer) == 2  # weight-norm direction v and norm g
    for call, (lr, weight_decay, teacher_temp, momentum) in enumerate([(2e-3, 0.04, 0.04, 0.9),
                                                                       (1e-3, 0.2, 0.06, 0.8)]):
        views = _fixed_views(4, seed=10 * call)
        student_before, teacher_before = _parameters(student), _parameters(teacher)
        # by hand, on the same networks before the step (no drop-path: the forward is deterministic)
        with torch.no_grad():
            teacher_out = teacher(views[:2])
        targets = _targets_by_definition(teacher_out, center, teacher_temp, centering, 3)
        loss = _loss_from_definition(student(views), targets, 0.1)
        grads = dict(zip([n for n, _ in student.named_parameters()],
                         torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)))
        grads = {n: g for n, g in grads.items() if g is not None}
        grad_norm = _clip_by_definition(grads, 0.3, clip_mode)
        if freeze_last_layer:
            grads = {n: g for n, g in grads.items() if n not in last_layer}

        result = step(views, center, lr=lr, weight_decay=weight_decay, teacher_temp=teacher_temp,
                      momentum=momentum, freeze_last_layer=freeze_last_layer)

        assert result.finite
        assert result.loss == pytest.approx(loss.item(), rel=1e-5), f"call {call}: loss != definition"
        torch.testing.assert_close(result.teacher_out, teacher_out)
        torch.testing.assert_close(result.teacher_p, targets.float(), rtol=1e-4, atol=1e-6)
        assert result.grad_norm == pytest.approx(grad_norm, rel=1e-4)
        moved = {n for n, p in student.named_parameters() if not torch.equal(p, student_before[n])}
        assert set(student_before) - last_layer <= moved, f"call {call}: not moved: {set(student_before) - moved}"
        if freeze_last_layer:
            assert not moved & last_layer, f"call {call}: frozen last layer moved: {sorted(moved & last_layer)}"
        else:
            assert moved >= last_layer
        # the step's (clipped) gradients are the definition's, to float32 rounding (~2e-7 of up to 0.2)
        step_grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
        _assert_close_by_name(step_grads, grads, f"call {call}: clipped gradient != definition's")
        # AdamW by hand on those gradients. Fed the hand gradients themselves, Adam's first step, which moves a
        # weight by lr * g / (|g| + 1e-8), would turn their rounding noise (the attention key bias's gradient is
        # exactly 0 in exact arithmetic) into noise-signed moves of a fraction of lr
        expected_student = adamw.step(student_before, step_grads, lr, weight_decay)
        _assert_close_by_name(_parameters(student), expected_student, f"call {call}: student != AdamW by hand")
        expected_teacher = {n: momentum * t + (1 - momentum) * expected_student[n] for n, t in teacher_before.items()}
        _assert_close_by_name(_parameters(teacher), expected_teacher,
                              f"call {call}: teacher != m * teacher + (1 - m) * updated student")


# ---------------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes on half batches == 1 process on the whole batch
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CENTERINGS = ("center", "sinkhorn_knopp")
DDP_STEP = {"lr": 2e-3, "weight_decay": 0.04, "teacher_temp": 0.04, "momentum": 0.9, "freeze_last_layer": False}


def _one_production_step(student: nn.Module, student_net: dino_head.MultiCropWrapper, views: list[torch.Tensor],
                         centering: str) -> dict:
    """One call of `step.DINOTrainStep` (the loop's step) from fixed networks; what it produced."""
    teacher = _tiny_student(1)
    teacher.requires_grad_(False)
    step = pretrain_step.DINOTrainStep(student, student_net, teacher, pretrain_step.make_optimizer(student_net, fused=False),
                                  student_temp=0.1, centering=centering, sinkhorn_iterations=3, clip_grad=0.3,
                                  use_amp=False)
    before, teacher_before = _parameters(student_net), _parameters(teacher)
    center = torch.full((1, 64), 0.01)
    result = step(views, center, **DDP_STEP)
    return {
        "loss": torch.tensor(result.loss), "grad_norm": torch.tensor(result.grad_norm),
        "grads": {n: p.grad.clone() for n, p in student_net.named_parameters() if p.grad is not None},
        "before": before, "student": _parameters(student_net),
        "teacher_before": teacher_before, "teacher": _parameters(teacher),
        # the loop's centre update from this step's teacher output (all-reduced over ranks)
        "center": dino_losses.update_center(center, result.teacher_out, 0.9),
    }


def _ddp_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        views = _fixed_views(8)
        half = [v[rank * 4:(rank + 1) * 4] for v in views]
        results = {}
        for centering in CENTERINGS:
            student_net = _tiny_student(0)
            ddp = nn.parallel.DistributedDataParallel(student_net)
            results[centering] = _one_production_step(ddp, student_net, half, centering)
        torch.save(results, f"{result_dir}/rank{rank}.pt")
        # every rank done with the group before either tears it down: a gloo peer that closes early can make
        # the other abort at exit ("terminate called without an active exception"), seen once in CI
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_concatenated_batch(tmp_path):
    """The production step under DDP (2 gloo ranks, 4 samples each) equals it in one process on the 8 samples,
    for the running centre and for Sinkhorn-Knopp targets, whose balance is over the global batch."""
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    views = _fixed_views(8)
    for centering in CENTERINGS:
        ddp, other_rank = ranks[0][centering], ranks[1][centering]
        student_net = _tiny_student(0)
        one = _one_production_step(student_net, student_net, views, centering)
        # the loss is the ranks' mean: the per-sample mean over 8 equals the average of two 4-sample means
        assert float(ddp["loss"]) == pytest.approx(float(one["loss"]), rel=1e-5), centering
        assert float(ddp["grad_norm"]) == pytest.approx(float(one["grad_norm"]), rel=1e-4), centering
        assert len(one["grads"]) > 10
        _assert_close_by_name(ddp["grads"], one["grads"], f"{centering}: DDP clipped gradient")
        torch.testing.assert_close(ddp["center"], one["center"], rtol=1e-5, atol=1e-7)
        # both ranks hold the same networks after the step
        for part in ("student", "teacher"):
            _assert_close_by_name(other_rank[part], ddp[part], f"{centering}: rank 1 {part} != rank 0's", atol=0)
        # each side's update is AdamW, then the EMA of the updated student, on its own gradients (shown equal
        # above) to float rounding
        momentum = DDP_STEP["momentum"]
        for name, side in (("DDP", ddp), ("1 process", one)):
            expected = _AdamWByDefinition().step(side["before"], side["grads"], DDP_STEP["lr"],
                                                 DDP_STEP["weight_decay"])
            _assert_close_by_name(side["student"], expected, f"{centering}: {name} student != AdamW by hand")
            expected = {n: momentum * t + (1 - momentum) * side["student"][n]
                        for n, t in side["teacher_before"].items()}
            _assert_close_by_name(side["teacher"], expected, f"{centering}: {name} teacher != EMA")
        moved = sum(int((ddp["student"][n] != ddp["before"][n]).sum()) for n in ddp["before"])
        assert moved > 0.9 * sum(t.numel() for t in ddp["before"].values())
        # and the two sides' networks directly: Adam's first step, lr * g / (|g| + 1e-8), turns the rounding
        # noise of gradients that are exactly 0 in exact arithmetic (the attention key bias) into moves of a
        # fraction of lr (up to 3e-5 of lr 2e-3 seen), so the tolerance is lr / 10
        _assert_close_by_name(ddp["student"], one["student"], f"{centering}: DDP student", atol=DDP_STEP["lr"] / 10)
        _assert_close_by_name(ddp["teacher"], one["teacher"], f"{centering}: DDP teacher",
                              atol=(1 - momentum) * DDP_STEP["lr"] / 10)


def _recipe_params(aug: multicrop.MultiCropAugmentation, n: int, size: int) -> torch.Tensor:
    params = torch.stack([aug.sample_params(size, size, torch.Generator().manual_seed(view_params.sample_seed(1, 0, i)))
                          for i in range(n)])
    params[0, :, view_params.P_FLIP] = 1.0  # every op in play in at least one view
    params[1, :, view_params.P_SOLARIZE] = 1.0
    params[2, :, view_params.P_GRAY] = 1.0
    params[3, :, view_params.P_SIGMA] = 0.0
    return params


def test_device_multicrop_path_equals_the_host_path():
    """`apply_on_device` (weights built from the parameter tensor, no host matrices) reproduces `apply`'s views:
    same crops, resampling kernel, colour maps, blur and solarize, float32 rounding apart."""
    aug = multicrop.MultiCropAugmentation(global_size=40, local_size=20, n_local=3)
    images = torch.from_numpy(np.stack([_he_like_patch(64, seed) for seed in range(6)]))
    params = _recipe_params(aug, 6, 64)
    host = aug.apply(images, params)
    device = aug.apply_on_device(images, params.float())
    assert [v.shape for v in device] == [v.shape for v in host]
    for view_host, view_device in zip(host, device):
        assert view_device.dtype == torch.float32
        torch.testing.assert_close(view_device, view_host, rtol=0, atol=5e-5)
    # still a pure function of each sample's own parameters: a sub-batch gives the same views
    order = torch.tensor([4, 1, 3])
    for view_whole, view_subset in zip(device, aug.apply_on_device(images[order], params[order])):
        torch.testing.assert_close(view_whole[order], view_subset, rtol=0, atol=1e-6)


def test_device_multicrop_path_never_reads_a_device_value_on_the_host():
    """On meta tensors any host read (.item(), bool(), nonzero) raises: the path runs with none, so on a GPU it
    queues its kernels without a synchronisation."""
    aug = multicrop.MultiCropAugmentation(global_size=16, local_size=8, n_local=2)
    images = torch.zeros(4, 24, 24, 3, dtype=torch.uint8, device="meta")
    params = _recipe_params(aug, 4, 24).to("meta")
    views = aug.apply_on_device(images, params)
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(views[0].sum() > 0)  # the check above is real: a host read on meta fails


def _tiny_vit_step(precision: str) -> tuple[pretrain_step.DINOTrainStep, nn.Module, nn.Module]:
    """The production step over a ViT-Tiny/8 student and its teacher copy (seed 0), fused AdamW, 32-way head."""
    torch.manual_seed(0)
    nets = []
    for _ in range(2):
        backbone = create_backbone("vit_tiny_patch16_224", 16, 8)
        nets.append(dino_head.MultiCropWrapper(backbone, dino_head.DINOHead(backbone.num_features, 32, 16, 8)))
    student, teacher = nets
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    step = pretrain_step.DINOTrainStep(student, student, teacher, pretrain_step.make_optimizer(student, fused=True),
                                       student_temp=0.1, centering="center", sinkhorn_iterations=3, clip_grad=3.0,
                                       precision=precision)
    return step, student, teacher


def test_sync_free_step_skips_a_non_finite_update_and_stays_stopped():
    """Fused AdamW: a non-finite loss leaves weights, moments, step count, teacher and centre as they were, with
    no host read in the step; later finite steps stay skipped until the loop reads the flag and stops."""
    step, student, teacher = _tiny_vit_step("fp32")
    assert step.sync_free
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8)]
    kwargs = {"lr": 1e-3, "weight_decay": 0.04, "teacher_temp": 0.04, "momentum": 0.9, "freeze_last_layer": False}
    center = torch.zeros(1, 32)
    result = step(views, center, **kwargs)
    center = step.next_center(center, result.teacher_out, 0.9)
    assert result.finite and bool(step.healthy)

    def snapshot() -> dict:
        state = {f"s.{k}": v.clone() for k, v in student.state_dict().items()}
        state.update({f"t.{k}": v.clone() for k, v in teacher.state_dict().items()})
        for i, moments in enumerate(step.optimizer.state.values()):
            state.update({f"o{i}.{k}": v.clone() for k, v in moments.items()})
        return state

    before, center_before = snapshot(), center.clone()
    bad = [v.clone() for v in views]
    bad[0][0, 0, 0, 0] = float("nan")
    for batch in (bad, views):  # the bad batch, then a good one: both leave everything untouched
        result = step(batch, center, **kwargs)
        center = step.next_center(center, result.teacher_out, 0.9)
        after = snapshot()
        assert all(torch.equal(after[k], before[k]) for k in before), [k for k in before
                                                                        if not torch.equal(after[k], before[k])]
        assert torch.equal(center, center_before)
    assert not bool(step.healthy)


def test_cpu_bf16_step_runs_math_attention_and_computes_the_same_step():
    """On CPU under bf16 the step switches timm attention to the math path (the fused SDPA backward is several
    times slower there); fp32 keeps the fused kernel. The switch changes the speed, not the function: the math
    path's backbone output equals the fused kernel's in fp32, and the bf16 step's loss stays within bf16 rounding
    of the fp32 step's (the fused bf16 kernel is as far off, in its own direction)."""
    fp32_step, fp32_student, _ = _tiny_vit_step("fp32")
    assert fp32_step.attention == "fused"
    assert all(m.fused_attn for m in fp32_student.modules() if hasattr(m, "fused_attn"))
    math_step, math_student, _ = _tiny_vit_step("bf16")
    assert math_step.attention == "math"
    flags = [m.fused_attn for m in math_student.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)

    gen = torch.Generator().manual_seed(3)
    views = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2)] + [torch.randn(4, 3, 8, 8, generator=gen)]
    with torch.no_grad():  # same weights (seed 0), math path vs fused kernel, both fp32
        torch.testing.assert_close(math_student.backbone(views[0]), fp32_student.backbone(views[0]),
                                   rtol=1e-4, atol=1e-5)
    kwargs = {"lr": 1e-3, "weight_decay": 0.04, "teacher_temp": 0.04, "momentum": 0.9, "freeze_last_layer": False}
    reference = fp32_step(views, torch.zeros(1, 32), **kwargs).loss
    assert math_step(views, torch.zeros(1, 32), **kwargs).loss == pytest.approx(reference, rel=3e-2)
