"""Stage 3 under review: where the defaults come from, the teacher and DTM's thresholds moving inside `fit`, DTM's
fused pseudo-labels against real per-class thresholds on hand numbers, and the sliding-window vote on predictions
that change from frame to frame (alone and through `evaluate_models`)."""
import copy, inspect
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from ssfer_lib.data import FERDataset, Sample
from ssfer_lib.dtm import DTM, sliding_window_vote, update_class_thresholds
from ssfer_lib.semi import EMATeacher, FixMatch, SSL_ALGORITHMS
from ssfer_lib.config import config_args
from ssfer_lib.semi_train import SemiConfig, evaluate_models, semi_config
from ssfer_lib.train import build_optimizer, fit

torch.set_num_threads(1)


# ---------------------------------------------------------------- defaults

def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}


def test_ssfer_defaults_are_the_official_codes():
    "λu = 5 (`coefficient_u`), τ = 0.7 (`threshold`), m = 0.999 (`ema_decay`), 64 + 64 images (`mu` = 1): fine-tune.py."
    d = _defaults(EMATeacher)
    assert (d['tau'], d['lambda_u'], d['ema_decay'], d['ema_warmup']) == (0.7, 5.0, 0.999, False)
    c = SemiConfig()
    assert (c.algorithm, c.tau, c.lambda_u, c.ema_decay, c.batch_size, c.uratio) == ('ema_teacher', 0.7, 5.0, 0.999, 64, 1)


def test_fixmatch_and_dtm_defaults_are_their_own_papers():
    assert {k: _defaults(FixMatch)[k] for k in ('tau', 'lambda_u')} == dict(tau=0.95, lambda_u=1.0)  # Sohn et al. 2020
    d = _defaults(DTM)  # Yu et al.: λ1 = 1, λ2 = 0.8, μ = 0.9 (§4.2), network B decay 0.999 (§3.3)
    assert (d['lambda_l'], d['lambda_u'], d['thr_momentum'], d['ema_decay']) == (1.0, 0.8, 0.9, 0.999)
    fm, dtm = semi_config('fixmatch'), semi_config('dtm')
    assert (fm.tau, fm.lambda_u, fm.uratio) == (0.95, 1.0, 7)
    assert (dtm.lambda_l, dtm.lambda_u, dtm.thr_momentum, dtm.ema_decay, dtm.batch_size, dtm.uratio) == (1.0, 0.8, 0.9, 0.999, 32, 1)


@pytest.mark.parametrize('name', sorted(SSL_ALGORITHMS))
def test_config_and_task_defaults_agree(name):
    "The config a run records (SSFER's defaults + the algorithm's recipe) equals the task's own defaults."
    cls = SSL_ALGORITHMS[name]
    kw = config_args(cls, semi_config(name))
    assert kw == {k: v for k, v in _defaults(cls).items() if k in kw}, (name, kw)


# ---------------------------------------------------------------- the teacher inside fit

class _Recording:
    "A list of batches whose iteration snapshots `task.model` before handing out each batch: the k-th batch fetched"
    " (0-based, over all epochs) sees the student after k optimizer steps (accum_steps = 1)."
    def __init__(self, batches, model): self.batches, self.model, self.seen = batches, model, []
    def __len__(self): return len(self.batches)
    def __iter__(self):
        for b in self.batches:
            self.seen.append(copy.deepcopy(self.model.state_dict())); yield b


def _semi_batch(nl=6, nu=8, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xu = torch.randn(nu, d, generator=g); hid = torch.randint(-1, c, (nu,), generator=g)
    return dict(labeled=dict(image=torch.randn(nl, d, generator=g), label=torch.arange(nl) % c),
                unlabeled=dict(weak=dict(image=xu, label=hid), strong=dict(image=xu + torch.randn(nu, d, generator=g), label=hid)))


def _mlp(): return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3))


def _hand_ema(trajectory, decays):
    "θt(0) = θs(0); θt(k) = d_k θt(k-1) + (1 − d_k) θs(k) on floating tensors; integer buffers copied."
    t = copy.deepcopy(trajectory[0])
    for s, d in zip(trajectory[1:], decays):
        for k in t: t[k] = d * t[k] + (1 - d) * s[k] if t[k].is_floating_point() else s[k].clone()
    return t


@pytest.mark.parametrize('algo,warmup', [('ema_teacher', False), ('ema_teacher', True), ('dtm', False)])
def test_teacher_is_the_ema_of_the_students_trajectory_in_fit(algo, warmup):
    torch.manual_seed(0)
    extra = dict(tau=0.0, ema_warmup=warmup) if algo == 'ema_teacher' else dict(tau_init=0.0)
    task = SSL_ALGORITHMS[algo](_mlp(), 3, ema_decay=0.8, **extra)
    loader = _Recording([_semi_batch(seed=s) for s in range(3)], task.model)
    epochs = 2
    fit(task, loader, optimizer=build_optimizer(task.model, lr=0.2, weight_decay=0), epochs=epochs, device='cpu', progress=False)
    traj = loader.seen + [copy.deepcopy(task.model.state_dict())]  # θs(0) … θs(6)
    n = epochs * len(loader)
    assert len(traj) == n + 1
    decays = [min(0.8, (1 + k) / (10 + k)) if warmup else 0.8 for k in range(1, n + 1)]  # `fit` passes steps done
    want, got = _hand_ema(traj, decays), task.teacher.module.state_dict()
    assert set(want) == set(got)
    for k in want:
        if want[k].is_floating_point(): torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
        else: assert torch.equal(got[k], want[k]), k
    # it moved away from its start, and is not simply the final student
    w0, wt, ws = traj[0]['0.weight'], got['0.weight'], traj[-1]['0.weight']
    assert (wt - w0).abs().max() > 1e-2 and (wt - ws).abs().max() > 1e-3


# ---------------------------------------------------------------- DTM thresholds inside fit

def test_dtm_thresholds_move_once_per_epoch_in_fit():
    g = torch.Generator().manual_seed(3)
    lab_loader = [dict(image=torch.randn(9, 4, generator=g), label=torch.arange(9) % 3),
                  dict(image=torch.randn(6, 4, generator=g), label=torch.arange(6) % 3)]
    x_lab, y_lab = torch.cat([b['image'] for b in lab_loader]), torch.cat([b['label'] for b in lab_loader])
    torch.manual_seed(0)
    task = DTM(nn.Linear(4, 3), 3, labeled_loader=lab_loader, tau_init=0.5, ema_decay=0.5, thr_momentum=0.7)

    class Watch(list):  # the thresholds seen by every batch of an epoch
        def __iter__(self):
            for b in list.__iter__(self): within.append(task.thresholds.clone()); yield b
    within, ends = [], []
    def on_end(epoch, log): ends.append((copy.deepcopy(task.teacher.module), task.thresholds.clone(), log))
    hist = fit(task, Watch([_semi_batch(seed=s) for s in range(3)]), optimizer=build_optimizer(task.model, lr=0.5, weight_decay=0),
               epochs=3, device='cpu', progress=False, on_epoch_end=on_end)
    tau, prev = torch.full((3,), 0.5), torch.full((3,), 0.5)
    for e, (B, thr, log) in enumerate(ends):
        assert all(torch.equal(t, prev) for t in within[3 * e: 3 * e + 3])  # fixed during the epoch
        with torch.no_grad(): p = B(x_lab).softmax(1)  # network B as it is at the end of epoch e
        tau = update_class_thresholds(tau, p, y_lab, p.argmax(1), mu=0.7)
        torch.testing.assert_close(thr, tau)
        assert [log[f'dtm/tau_{c}'] for c in range(3)] == pytest.approx(tau.tolist())
        assert hist[e][f'dtm/tau_0'] == pytest.approx(tau[0].item())
        prev = thr
    assert not torch.allclose(ends[0][1], torch.full((3,), 0.5)) and not torch.allclose(ends[2][1], ends[0][1])


# ---------------------------------------------------------------- DTM forward on hand numbers

def _logits_are_input():
    m = nn.Linear(3, 3, bias=False)
    with torch.no_grad(): m.weight.copy_(torch.eye(3))
    return m


PW = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4], [0.025, 0.95, 0.025]])
PS = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.4, 0.1, 0.5], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
# fused ½(Pw + Ps): [.65 .25 .1], [.075 .85 .075], [.3 .15 .55], [.3 .1 .6], [.1625 .675 .1625]
PL, YL = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]), torch.tensor([0, 1])
HIDDEN = torch.tensor([0, 1, 2, 0, -1])


def _hand_batch():
    return dict(labeled=dict(image=PL.log(), label=YL),
                unlabeled=dict(weak=dict(image=PW.log(), label=HIDDEN), strong=dict(image=PS.log(), label=HIDDEN)))


@pytest.mark.parametrize('lam_l,lam_u', [(1.0, 0.8), (2.0, 0.5)])
def test_dtm_fused_pseudo_labels_against_class_thresholds(lam_l, lam_u):
    task = DTM(_logits_are_input(), 3, lambda_l=lam_l, lambda_u=lam_u)
    task.thresholds.copy_(torch.tensor([0.6, 0.9, 0.5]))
    out = task(_hand_batch())
    # pseudo-labels 0 1 2 2 1; used: 0 (0.65 > 0.6), 2 (0.55 > 0.5), 3 (0.6 > 0.5); dropped: 1 (0.85 ≤ 0.9), 4 (0.675 ≤ 0.9)
    assert out['mask_rate'].item() == pytest.approx(3 / 5)
    loss_l = (np.log(2) + np.log(5)) / 2
    loss_u = -(np.log(0.6) + np.log(0.5) + np.log(0.8)) / 5  # strong-view p of classes 0, 2, 2; mean over all 5
    assert out['loss_l'].item() == pytest.approx(loss_l, rel=1e-5)
    assert out['loss_u'].item() == pytest.approx(loss_u, rel=1e-5)
    assert out['loss'].item() == pytest.approx(lam_l * loss_l + lam_u * loss_u, rel=1e-5)
    log = task.after_epoch(0)
    assert [log[f'pl/count_{c}'] for c in range(3)] == [1, 0, 2]  # sample 3 is labeled 2 (fusion), not 0 (weak alone)
    assert (log['pl/acc'], log['pl/acc_all']) == (pytest.approx(2 / 3), pytest.approx(3 / 4))


def test_dtm_fusion_and_class_thresholds_change_the_outcome():
    "Per-sample checks that fail if the weak view alone, or one global threshold, were used."
    task = DTM(_logits_are_input(), 3)
    for thr, used in [([0.6, 0.9, 0.5], [1, 0, 2]), ([0.7, 0.7, 0.7], [0, 1, 0]), ([0.0, 0.0, 0.0], [1, 2, 2])]:
        task.thresholds.copy_(torch.tensor(thr))
        task(_hand_batch())
        log = task.after_epoch(0)
        assert [log[f'pl/count_{c}'] for c in range(3)] == used, thr
    # with τ = 0 every sample is used: Lu = mean CE of the strong view against the fused arg-max 0 1 2 2 1
    task.thresholds.zero_()
    want = -(np.log(0.6) + np.log(0.8) + np.log(0.5) + np.log(0.8) + np.log(0.4)) / 5
    assert task(_hand_batch())['loss_u'].item() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- sliding-window vote

def _vote_reference(preds, vids, frames, w):
    "The documented rule, one frame at a time: w//2 frames before, (w−1)//2 after, same video; own label wins ties."
    out = []
    for p, v, f in zip(preds, vids, frames):
        win = [q for q, u, g in zip(preds, vids, frames) if u == v and f - w // 2 <= g <= f + (w - 1) // 2]
        counts = np.bincount(win, minlength=max(preds) + 1)
        out.append(p if counts[p] == counts.max() else int(np.flatnonzero(counts == counts.max())[0]))
    return out


P8 = [0, 1, 0, 1, 1, 2, 1, 1]
HAND = {1: P8, 2: P8,  # w = 2 (own frame + the one before) can at most tie, and ties keep the own label
        3: [0, 0, 1, 1, 1, 1, 1, 1],
        4: [0, 0, 0, 1, 1, 1, 1, 1],  # frame 2 sees frames 0–3 (two before, one after): 0 1 0 1, keeps 0
        5: [0, 1, 1, 1, 1, 1, 1, 1],  # frame 1 sees frames 0–3 (0 1 0 1, keeps 1); frame 2 sees 0–4
        6: [0, 1, 1, 1, 1, 1, 1, 1],
        7: [0, 1, 1, 1, 1, 1, 1, 1]}


@pytest.mark.parametrize('w', sorted(HAND))
def test_vote_on_flipping_predictions_by_hand(w):
    assert sliding_window_vote(P8, ['a'] * 8, range(8), window=w).tolist() == HAND[w]
    assert _vote_reference(P8, ['a'] * 8, list(range(8)), w) == HAND[w]  # the reference agrees with the hand values


def test_vote_videos_missing_frames_and_ties_by_hand():
    # video b: frames 0..4 = 2 1 0 1 2; w = 5 at frame 2: 2 and 1 tie (twice each) without its own 0 -> smaller class 1
    # video c: frames 0, 1, 5, 6 = 1 1 0 0; frame 5's window (3..7 for w = 5) holds frames 5, 6 only: not 0's neighbours
    preds = [2, 1, 0, 1, 2, 1, 1, 0, 0]
    vids = ['b'] * 5 + ['c'] * 4
    frames = [0, 1, 2, 3, 4, 0, 1, 5, 6]
    want = [2, 1, 1, 1, 2, 1, 1, 0, 0]
    # frame b0 sees 2 1 0 (tie, own 2); b1 sees 2 1 0 1 (1); b3 sees 1 0 1 2 (1); b4 sees 0 1 2 (tie, own 2)
    perm = np.random.default_rng(0).permutation(9)
    got = sliding_window_vote(np.array(preds)[perm], np.array(vids)[perm], np.array(frames)[perm], window=5)
    assert got.tolist() == np.array(want)[perm].tolist()
    assert _vote_reference(preds, vids, frames, 5) == want


def test_vote_matches_the_documented_rule_on_random_videos():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 40))
        vids = rng.integers(0, 3, n)
        frames = np.concatenate([rng.choice(60, size=(vids == v).sum(), replace=False) for v in range(3)])
        frames = frames[np.argsort(np.argsort(vids, kind='stable'), kind='stable')]  # one distinct frame set per video
        preds = rng.integers(0, 4, n)
        for w in (1, 2, 3, 4, 5, 8, 11):
            got = sliding_window_vote(preds, vids, frames, window=w, num_classes=4).tolist()
            assert got == _vote_reference(preds.tolist(), vids.tolist(), frames.tolist(), w), (trial, w)


# ---------------------------------------------------------------- the vote through evaluate_models

class _PixelSaysClass(nn.Module):
    "Predicts the class written in the image's first pixel, so predictions vary frame by frame."
    def forward(self, x): return F.one_hot(x[:, 0, 0, 0].long(), 3).float()


def _video_dataset():
    # video a, frames 0-5: truth 0 0 0 1 1 1, predicted 0 1 0 1 2 1 -> w = 3: 0 0 1 1 1 1
    # video b, frames 10 11 12 14 (13 missing): truth 2 2 2 2, predicted 2 0 2 2 -> w = 3: 2 2 2 2
    rows = [('a', f, t, p) for f, t, p in zip(range(6), [0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 2, 1])]
    rows += [('b', f, 2, p) for f, p in zip([10, 11, 12, 14], [2, 0, 2, 2])]
    rows = [rows[i] for i in [7, 3, 0, 9, 5, 1, 6, 2, 4, 8]]  # videos interleaved, frames out of order
    samples = [Sample(f'{v}{f}', t, meta=dict(video=v, frame=f)) for v, f, t, _ in rows]
    images = np.stack([np.full((4, 4, 3), p, np.uint8) for *_, p in rows])
    return FERDataset(samples, None, dict(images=images, hw=np.full((len(rows), 2), 4)))


def test_evaluate_models_smooths_video_predictions_by_hand():
    ds = _video_dataset()
    r = evaluate_models({'m': _PixelSaysClass()}, DataLoader(ds, batch_size=3), 3, vote_window=3)['m']
    # raw: 7/10 right; F1 per class 2/3, 2/3, 3/4. smoothed: 0 0 1 1 1 1 | 2 2 2 2, F1 4/5, 6/7, 1
    assert r['acc'] == pytest.approx(0.7)
    assert r['macro_f1'] == pytest.approx(25 / 36)
    assert r['macro_f1_smoothed'] == pytest.approx(31 / 35)
    r1 = evaluate_models({'m': _PixelSaysClass()}, DataLoader(ds, batch_size=4), 3, vote_window=1)['m']
    assert r1['macro_f1_smoothed'] == pytest.approx(r1['macro_f1'])  # a one-frame window changes nothing
