import numpy as np
import pytest
import torch
from timm.data import Mixup

from pretrain.config import MixConfig
from pretrain.mix import MaskCutMix, create_mixer


def batch(n=6, size=16, classes=5):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    mask = torch.randint(0, classes, (n, size, size), generator=g)
    return x, mask, torch.arange(n) % classes


def test_mixed_mask_is_exactly_the_box_paste_of_the_partner():
    x, mask, target = batch()
    np.random.seed(3)
    mx, mm, soft, box = MaskCutMix(alpha=0.7, prob=1.0, label_smoothing=0.0, num_classes=5)(
        x.clone(), mask.clone(), target)
    yl, yh, xl, xh = box
    assert 0 < (yh - yl) * (xh - xl) < 16 * 16
    expected = mask.clone()
    expected[:, yl:yh, xl:xh] = mask.flip(0)[:, yl:yh, xl:xh]
    assert torch.equal(mm, expected)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[yl:yh, xl:xh] = False
    assert torch.equal(mm[:, outside], mask[:, outside])
    assert torch.equal(mx[..., yl:yh, xl:xh], x.flip(0)[..., yl:yh, xl:xh])
    lam = 1 - (yh - yl) * (xh - xl) / 256
    assert target[1] != target.flip(0)[1]
    assert torch.allclose(soft[1, target[1]], torch.tensor(lam, dtype=soft.dtype))
    assert torch.allclose(soft.sum(1), torch.ones(6))


def test_images_mixed_exactly_like_timm_cutmix():
    x, mask, target = batch()
    np.random.seed(11)
    ours, _, soft, _ = MaskCutMix(0.7, 1.0, 0.1, 5)(x.clone(), mask.clone(), target)
    np.random.seed(11)
    timm_x, timm_soft = Mixup(mixup_alpha=0.0, cutmix_alpha=0.7, prob=1.0, mode="batch", label_smoothing=0.1,
                              num_classes=5)(x.clone(), target)
    assert torch.equal(ours, timm_x) and torch.allclose(soft, timm_soft)


def test_prob_zero_and_odd_batch():
    x, mask, target = batch()
    mx, mm, soft, box = MaskCutMix(0.7, 0.0, 0.1, 5)(x.clone(), mask.clone(), target)
    assert box is None and torch.equal(mm, mask) and torch.equal(mx, x)
    with pytest.raises(ValueError, match="even batch"):
        MaskCutMix(0.7, 1.0, 0.1, 5)(x[:5], mask[:5], target[:5])


def test_create_mixer_by_objective():
    assert isinstance(create_mixer(MixConfig(), "cls", 5), Mixup)
    assert isinstance(create_mixer(MixConfig(), "cls+seg", 5), MaskCutMix)
    assert create_mixer(MixConfig(prob=0.0), "seg", 5) is None
