"""One Mixup/CutMix/λ sampler: FaceMix, the Mixup/CutMix baselines (`MixupTask`) and MIMIC's mixed views
(`MixedViews`) all draw λ with `sample_lambda`, the batch's mode with `sample_mix_params` and the CutMix box with
`cutmix_box`; the baselines keep timm's `Mixup` semantics (same distributions of λ, mode and box, same mixing for the
same draws) although their draws now come from the task's generator instead of NumPy's global RNG."""
import numpy as np
import pytest
import torch
from scipy import stats
from timm.data import mixup as timm_mixup
from torch import nn

import ssfer_lib.facemix as facemix
from ssfer_lib.facemix import (FaceMixTask, MixupTask, cutmix_box, mix_flip, sample_lambda, sample_mix_params,
                               smooth_one_hot, soft_cross_entropy)
from ssfer_lib.mscl import MixedViews

torch.set_num_threads(1)
N_DRAWS = 4000


class _Recorder(nn.Module):
    "A linear classifier that keeps the last input it saw."
    def __init__(self, k=3):
        super().__init__(); self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, k)); self.seen = None
    def forward(self, x): self.seen = x.detach().clone(); return self.net(x)


class _Pooled(nn.Module):
    "The few timm ViT methods `encode` calls, on a linear model (MixedViews needs them)."
    def __init__(self, k=3):
        super().__init__(); self.head = nn.Linear(3, k); self.seen = None
    def forward_features(self, x): self.seen = x.detach().clone(); return x.mean((2, 3))
    def forward_head(self, r, pre_logits=False): return r if pre_logits else self.head(r)
    def get_classifier(self): return self.head


@pytest.fixture
def np_centres(monkeypatch):
    "Make timm's box centre (two `np.random.randint` calls) take the values pushed onto the returned list."
    queue = []
    monkeypatch.setattr(timm_mixup.np.random, 'randint', lambda lo, hi=None, size=None: queue.pop(0))
    return queue


def _centre(g, h, w):
    "The centre `cutmix_box(h, w, ·, g)` is about to draw (its two draws from a copy of the generator)."
    c = torch.Generator(); c.set_state(g.get_state())
    return int(torch.randint(h, (1,), generator=c)), int(torch.randint(w, (1,), generator=c))


# ---- λ ----

@pytest.mark.parametrize('alpha', [0.4, 1.0, 2.0])
def test_sample_lambda_is_beta(alpha):
    g = torch.Generator().manual_seed(0)
    lams = [sample_lambda(alpha, g) for _ in range(N_DRAWS)]
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 0.01


# ---- the batch's mode and λ: timm `Mixup._params_per_batch` ----

@pytest.mark.parametrize('mixup_alpha,cutmix_alpha,switch_prob', [(1.0, 0.0, 0.5), (0.0, 1.0, 0.5), (2.0, 2.0, 0.5), (0.8, 1.0, 0.3)])
def test_mix_params_distribution_is_timms(mixup_alpha, cutmix_alpha, switch_prob):
    g = torch.Generator().manual_seed(1)
    ours = [sample_mix_params(mixup_alpha, cutmix_alpha, g, switch_prob=switch_prob) for _ in range(N_DRAWS)]
    np.random.seed(1)
    ref = timm_mixup.Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=1.0, switch_prob=switch_prob, mode='batch')
    theirs = [ref._params_per_batch() for _ in range(N_DRAWS)]
    p_ours, p_theirs = np.mean([m == 'cutmix' for _, m in ours]), np.mean([c for _, c in theirs])
    assert abs(p_ours - p_theirs) < 4 * np.sqrt(switch_prob * (1 - switch_prob) / N_DRAWS) + 1e-9
    for mode, cut in (('mixup', False), ('cutmix', True)):
        a, b = [l for l, m in ours if m == mode], [l for l, c in theirs if c == cut]
        assert (len(a) == 0) == (len(b) == 0)
        if a: assert stats.ks_2samp(a, b).pvalue > 0.01, mode


# ---- the CutMix box: timm `cutmix_bbox_and_lam` ----

@pytest.mark.parametrize('h,w', [(16, 16), (15, 12), (7, 9)])
def test_cutmix_box_is_timms_box(np_centres, h, w):
    "For the same centre, the same box and corrected λ as timm, for λ over [0, 1]."
    g = torch.Generator().manual_seed(2)
    for lam in np.linspace(0, 1, 41):
        for _ in range(5):
            np_centres.extend(_centre(g, h, w))
            (y1, y2, x1, x2), lam_c = cutmix_box(h, w, float(lam), g)
            (ty1, ty2, tx1, tx2), tlam = timm_mixup.cutmix_bbox_and_lam((1, 3, h, w), float(lam))
            assert (y1, y2, x1, x2) == (int(ty1), int(ty2), int(tx1), int(tx2))
            assert lam_c == tlam == 1 - (y2 - y1) * (x2 - x1) / (h * w)


def test_cutmix_corrected_lam_distribution_is_timms():
    "The whole CutMix draw (λ, centre, correction) over many batches: same distribution of the corrected λ."
    g = torch.Generator().manual_seed(3)
    ours = [cutmix_box(16, 16, sample_mix_params(0.0, 1.0, g)[0], g)[1] for _ in range(N_DRAWS)]
    np.random.seed(3)
    ref = timm_mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode='batch')
    theirs = [timm_mixup.cutmix_bbox_and_lam((1, 3, 16, 16), ref._params_per_batch()[0])[1] for _ in range(N_DRAWS)]
    assert stats.ks_2samp(ours, theirs).pvalue > 0.01


# ---- MixupTask = timm's Mixup, given the same draws ----

@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
@pytest.mark.parametrize('n', [6, 5])
def test_mixup_task_mixes_as_timm(np_centres, monkeypatch, mixup_alpha, cutmix_alpha, n):
    """The old MixupTask was timm's `Mixup` on the even part of the batch (odd last image unmixed). Handing timm the
    draws the task makes gives the very same model input and loss."""
    torch.manual_seed(0)
    task = MixupTask(_Recorder(), 3, mixup_alpha, cutmix_alpha, label_smoothing=0.1, seed=4)
    ref = timm_mixup.Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=1.0, switch_prob=0.5, mode='batch',
                           label_smoothing=0.1, num_classes=3)
    x, y = torch.randn(n, 3, 8, 8), torch.arange(n) % 3
    modes = set()
    for _ in range(12):
        g = task.generator(); lam, mode = sample_mix_params(mixup_alpha, cutmix_alpha, g); modes.add(mode)
        if mode == 'cutmix': np_centres.extend(_centre(g, 8, 8))
        monkeypatch.setattr(ref, '_params_per_batch', lambda: (lam, mode == 'cutmix'))
        m = n - n % 2
        xe, te = ref(x[:m].clone(), y[:m])
        want_x, want_t = torch.cat([xe, x[m:]]), torch.cat([te, smooth_one_hot(y[m:], 3, 0.1)])
        loss = task(dict(image=x, label=y))['loss']
        assert torch.equal(task.model.seen, want_x)  # bit for bit
        torch.testing.assert_close(loss, soft_cross_entropy(task.model.net(want_x), want_t).mean())
        assert not np_centres
    assert modes == ({'mixup', 'cutmix'} if mixup_alpha and cutmix_alpha else {'mixup' if mixup_alpha else 'cutmix'})


def test_mixup_task_stream_is_seeded_and_resumable():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    a = MixupTask(_Recorder(), 3, 1.0, 1.0, seed=1)
    seen = []
    for _ in range(3): a(dict(image=x, label=y)); seen.append(a.model.seen)
    assert int(a.state_dict()['calls']) == 3
    b = MixupTask(_Recorder(), 3, 1.0, 1.0, seed=1)
    for s in seen: b(dict(image=x, label=y)); assert torch.equal(b.model.seen, s)   # same seed: same stream
    c = MixupTask(_Recorder(), 3, 1.0, 1.0, seed=1); c.load_state_dict(a.state_dict())
    a(dict(image=x, label=y)); c(dict(image=x, label=y)); assert torch.equal(a.model.seen, c.model.seen)  # resumed
    d = MixupTask(_Recorder(), 3, 1.0, 1.0, seed=2); d(dict(image=x, label=y))
    assert not torch.equal(d.model.seen, seen[0])                                      # another seed: another stream
    a.eval(); a(dict(image=x, label=y)); assert int(a.calls) == 4                       # evaluation does not advance it


# ---- one sampler behind all three methods ----

def test_one_lambda_sampler_for_all_methods(monkeypatch):
    "Every method's λ comes from `facemix.sample_lambda`: replace it, and all three mix with the replacement."
    monkeypatch.setattr(facemix, 'sample_lambda', lambda alpha, generator: 0.25)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    fm = FaceMixTask(_Recorder(), 3, kappa='psnr')
    assert fm(dict(image=x, label=y))['lam'] == 0.25
    mt = MixupTask(_Recorder(), 3, 1.0, 0.0); mt(dict(image=x, label=y))
    torch.testing.assert_close(mt.model.seen, 0.25 * x + 0.75 * x.flip(0))
    mv = MixedViews(_Pooled(), 3, mixup_alpha=1.0, cutmix_alpha=0.0)
    assert mv(dict(image=x, label=y))['mix_lam'] == 0.25
    torch.testing.assert_close(mv.model.seen, 0.25 * x + 0.75 * x.flip(0))


def test_one_cutmix_box_for_both_flip_methods(monkeypatch):
    "MixupTask's and MIMIC's CutMix boxes both come from `facemix.cutmix_box`."
    monkeypatch.setattr(facemix, 'cutmix_box', lambda h, w, lam, generator: ((0, 4, 0, 8), 0.5))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    want = torch.cat([x.flip(0)[..., :4, :], x[..., 4:, :]], dim=-2)
    mt = MixupTask(_Recorder(), 3, 0.0, 1.0); mt(dict(image=x, label=y))
    torch.testing.assert_close(mt.model.seen, want)
    mv = MixedViews(_Pooled(), 3, mixup_alpha=0.0, cutmix_alpha=1.0)
    assert mv(dict(image=x, label=y))['mix_lam'] == 0.5
    torch.testing.assert_close(mv.model.seen, want)
    assert mix_flip(x, y, 3, 0.9, 'cutmix', torch.Generator())[2] == 0.5
