"""Stage 3 (semi-supervised): EMA, thresholding, DTM thresholds, balanced sampling, sliding-window vote, macro-F1,
and a gradient check of every registered algorithm on the test-size ViT."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from sklearn.metrics import f1_score
from torch import nn
from ssfer_lib.dtm import BalancedSampler, sliding_window_vote, update_class_thresholds
from ssfer_lib.evaluate import macro_f1
from ssfer_lib.semi import EMA, SSL_ALGORITHMS, gradient_report, pseudo_label_mask
from ssfer_lib.ssl_baselines import PiModel  # the general baselines register themselves in SSL_ALGORITHMS
from ssfer_lib.ssl_matches import FlexMatch
from ssfer_lib.vit import create_vit, vit_size

torch.set_num_threads(1)


def test_ema_update_is_convex_combination():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    ema = EMA(student, decay=0.99)
    with torch.no_grad():
        for p in student.parameters(): p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 5))  # moves BN running stats and the integer batch counter
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(student, step=10)
    for k, s in student.state_dict().items():
        t = ema.module.state_dict()[k]
        if s.is_floating_point(): torch.testing.assert_close(t, 0.99 * before[k] + 0.01 * s)
        else: assert torch.equal(t, s), k  # num_batches_tracked is copied
    assert not any(p.requires_grad for p in ema.parameters())


@pytest.mark.parametrize('decay', [0.0, 1.0])
def test_ema_extreme_decays(decay):
    torch.manual_seed(0)
    student = nn.Linear(3, 2); ema = EMA(student, decay=decay); w0 = ema.module.weight.clone()
    with torch.no_grad(): student.weight.add_(1.0)
    ema.update(student)
    torch.testing.assert_close(ema.module.weight, w0 if decay == 1.0 else student.weight.detach())


def test_thresholding_masks_exactly_above_tau():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 7, generator=g), 1)
    probs[:5] = torch.tensor([0.7, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])  # exactly τ: not used
    pseudo, mask = pseudo_label_mask(probs, 0.7)
    assert torch.equal(mask, probs.max(1).values > 0.7) and not mask[:5].any()
    assert torch.equal(pseudo, probs.argmax(1))
    tau = torch.linspace(0.3, 0.9, 7)
    _, mask_c = pseudo_label_mask(probs, tau)
    assert torch.equal(mask_c, probs.max(1).values > tau[probs.argmax(1)])


def test_dtm_threshold_update_by_hand():
    # class 0: correct with p0 = 0.9 and 0.7 (mean 0.8), one wrong; class 1: one correct p1 = 0.6; class 2: none correct
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 0, 0, 1, 2])
    prev = torch.tensor([0.5, 0.95, 0.42])
    new = update_class_thresholds(prev, probs, labels, probs.argmax(1), mu=0.9)
    torch.testing.assert_close(new, torch.tensor([0.9 * 0.5 + 0.1 * 0.8, 0.9 * 0.95 + 0.1 * 0.6, 0.42]))


def test_balanced_sampler_is_uniform_over_classes():
    labels = torch.tensor([0] * 500 + [1] * 100 + [2] * 30 + [3] * 10 + [4] * 5 + [5] * 2 + [6] * 1)
    draws = list(BalancedSampler(labels, 7000, torch.Generator().manual_seed(0)))
    counts = np.bincount(labels[draws].numpy(), minlength=7)
    assert counts.sum() == 7000
    assert chisquare(counts).pvalue > 0.01, counts
    assert chisquare(np.bincount(labels.numpy(), minlength=7)).pvalue < 1e-6  # the labeled set itself is far from uniform


def test_sliding_window_vote_by_hand():
    preds = [3, 3, 1, 3, 3, 3, 2, 2, 0, 2, 2, 5]
    vids = ['x'] * 6 + ['y'] * 5 + ['z']
    frames = [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 0]
    out = sliding_window_vote(preds, vids, frames, window=3)
    assert out.tolist() == [3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 5]
    # even window 4 = two frames before, one after: frame 2 of [2, 2, 0, 1, 1] sees 2, 2, 0, 1
    assert sliding_window_vote([2, 2, 0, 1, 1], [0] * 5, range(5), window=4)[2] == 2


def test_macro_f1_equals_sklearn():
    rng = np.random.default_rng(0)
    for n_cls in (2, 7, 8):
        t = rng.integers(0, n_cls, 300); p = np.where(rng.random(300) < 0.6, t, rng.integers(0, n_cls, 300))
        assert macro_f1(t, p) == pytest.approx(f1_score(t, p, average='macro'))
        assert macro_f1(t, p, n_cls + 1) == pytest.approx(
            f1_score(t, p, labels=list(range(n_cls + 1)), average='macro', zero_division=0))


def _vit_batch(nl=4, nu=6, size=16, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    xu, hidden = torch.randn(nu, 3, size, size, generator=g), torch.randint(-1, c, (nu,), generator=g)
    img = lambda n: torch.randn(n, 3, size, size, generator=g)
    idx = torch.arange(nu)  # dataset positions (FlexMatch keeps one state per unlabeled sample)
    return dict(labeled=dict(image=img(nl), label=torch.arange(nl) % c),
                unlabeled=dict(weak=dict(image=xu, label=hidden, index=idx), strong=dict(image=xu + 0.5 * img(nu), label=hidden, index=idx)))


LOW_TAU = {'supervised': {}, 'ema_teacher': dict(tau=0.0), 'fixmatch': dict(tau=0.0), 'dtm': dict(tau_init=0.0),
           'pi_model': {}, 'pseudo_label': dict(tau=0.0), 'mean_teacher': {}, 'vat': {}, 'uda': dict(tau=0.0), 'mixmatch': {},
           'remixmatch': {}, 'flexmatch': dict(tau=0.0, num_unlabeled=6), 'freematch': {}, 'softmatch': {},
           'comatch': dict(tau=0.0), 'ccssl': dict(tau=0.0)}


@pytest.mark.parametrize('name', sorted(SSL_ALGORITHMS))
def test_gradients_reach_the_student_and_never_the_teacher(name):
    torch.manual_seed(0)
    kw = vit_size('test'); kw.pop('model')
    task = SSL_ALGORITHMS[name](create_vit('vit_tiny_patch16_224', num_classes=7, **kw), 7, **LOW_TAU[name])
    r = gradient_report(task, _vit_batch())
    assert r['student_missing'] == [], r
    assert r['teacher_with_grad'] == [], r
    assert r['unlabeled_loss_reaches_student'] is (None if name == 'supervised' else True), r
    teacher = getattr(task, 'teacher', None)
    if teacher is not None:  # the teacher is a separate, frozen copy in eval mode
        assert not {id(p) for p in teacher.parameters()} & {id(p) for p in task.model.parameters()}
        task.train(); assert not teacher.module.training


def test_every_algorithm_is_covered():
    assert set(SSL_ALGORITHMS) == set(LOW_TAU), 'add the new algorithm to LOW_TAU so that it gets a gradient check'


@pytest.mark.slow
def test_experiment_notebook_smoke(tmp_path):
    "The papermill template runs at the `smoke` size into its run folder, with teacher and student reported."
    from ssfer_lib.runner import run_notebook
    params = dict(algorithm='ema_teacher', data='synthfaces', n_train=140, n_test=70, n_unlabeled=140, img_size=16,
                  vit='test', epochs=2, batch_size=16, split_value=0.1, seed=0)
    m = run_notebook('semi', params, name='smoke', root=tmp_path/'runs', cwd=tmp_path)['metrics']
    assert m['reported_model'] == 'teacher' and 0 <= m['test/student/acc'] <= 1 and m['epochs'] == 2
    assert (tmp_path/'runs'/'smoke'/'pseudo_labels.png').exists()
