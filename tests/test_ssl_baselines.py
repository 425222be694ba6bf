"""The general semi-supervised baselines of SSFER's Table 3 (35a_ssl_baselines, 35b_ssl_matches): each loss against a
hand computation of its paper's equation on a tiny batch, gradients reaching the student (and its heads) but never a
teacher, the known traps (Mean Teacher against itself, VAT's search touching the model, ReMixMatch's alignment
without the model's running mean), the schedules, thresholds and weights as the papers define them, the recipes, and
every method end-to-end through `semi_train` at the 'test' size."""
import copy, inspect, json, math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from ssfer_lib.semi import EMA, SSL_ALGORITHMS, SemiTask, _views, gradient_report
from ssfer_lib.ssl_baselines import (DistributionAlignment, MeanTeacher, MixMatch, PiModel, PseudoLabel, UDA, VAT,
                                     frozen_mode, lee_weight, sigmoid_rampup, tsa_threshold, vat_perturbation)
from ssfer_lib.ssl_matches import (CCSSL, CoMatch, FlexMatch, FreeMatch, ReMixMatch, SoftMatch, class_aware_contrastive,
                                   flexmatch_thresholds, truncated_gaussian_weight)
from ssfer_lib.config import config_args
from ssfer_lib.semi_train import semi_config, semi_train
from ssfer_lib.train import build_optimizer, fit

torch.set_num_threads(1)

BASELINES = ['pi_model', 'pseudo_label', 'mean_teacher', 'vat', 'uda', 'mixmatch', 'remixmatch', 'flexmatch', 'comatch',
             'ccssl', 'freematch', 'softmatch']


def _batch(nl=6, nu=8, shape=(8,), c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xu = torch.randn(nu, *shape, generator=g); hid = torch.randint(-1, c, (nu,), generator=g); idx = torch.arange(nu)
    return dict(labeled=dict(image=torch.randn(nl, *shape, generator=g), label=torch.arange(nl) % c),
                unlabeled=dict(weak=dict(image=xu, label=hid, index=idx),
                               strong=dict(image=xu + torch.randn(nu, *shape, generator=g), label=hid, index=idx)))


def _lin(seed=0):
    torch.manual_seed(seed); return nn.Linear(8, 3)


def _net(seed=0, c=3):
    torch.manual_seed(seed); return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, c))


def _parts(b):
    return b['labeled'], b['unlabeled']['weak'], b['unlabeled']['strong']


def _ce(logits, y): return F.cross_entropy(logits, y)


# ---------------------------------------------------------------- every method: gradients, recipes, defaults

@pytest.mark.parametrize('name', BASELINES)
def test_gradients_reach_the_student_and_its_heads_never_a_teacher(name):
    extra = dict(num_unlabeled=8) if name == 'flexmatch' else {}
    low = dict(tau=0.0) if name in ('pseudo_label', 'uda', 'flexmatch', 'comatch', 'ccssl') else {}
    task = SSL_ALGORITHMS[name](_net(), 3, **extra, **low)
    r = gradient_report(task, _batch(shape=(3, 4, 4)))
    assert r['student_missing'] == [] and r['teacher_with_grad'] == [], r
    assert r['unlabeled_loss_reaches_student'] is True, r
    if hasattr(task, 'heads'):  # projection / rotation heads are trained: the optimizer of the stage takes them
        opt = build_optimizer(task.model, 1e-3, task=task)
        in_opt = {id(p) for g in opt.param_groups for p in g['params']}
        assert all(id(p) in in_opt for p in task.heads.parameters())


def test_every_baseline_is_registered_and_runs_by_name():
    assert set(BASELINES) <= set(SSL_ALGORITHMS)
    for name in BASELINES:
        assert semi_config(name).algorithm == name


PAPER_DEFAULTS = {  # the values each task must default to, with the source named in its notebook section
    'pi_model': dict(lambda_u=100.0, rampup=80 / 300),
    'pseudo_label': dict(tau=0.0, lambda_u=3.0, t1=0.4 / 6, t2=0.4),
    'mean_teacher': dict(lambda_u=100.0, rampup=40000 / 150000, ema_decay=0.999, ema_decay_rampup=0.99),
    'vat': dict(lambda_u=1.0, eps=8.0, xi=1e-6, power_iters=1, lambda_ent=1.0),
    'uda': dict(tau=0.8, T=0.4, lambda_u=1.0, tsa=None),
    'mixmatch': dict(T=0.5, alpha=0.75, lambda_u=100.0, rampup=16000 / 2 ** 20),
    'remixmatch': dict(T=0.5, alpha=0.75, lambda_u=1.5, lambda_u1=0.5, lambda_rot=0.5, da_batches=128, rampup=1 / 64),
    'flexmatch': dict(tau=0.95, lambda_u=1.0, warmup=True),
    'freematch': dict(lambda_u=1.0, lambda_f=0.001, thr_momentum=0.999),
    'softmatch': dict(lambda_u=1.0, thr_momentum=0.999, uniform_alignment=True, n_sigma=1.0),
    'comatch': dict(tau=0.95, lambda_u=1.0, lambda_c=1.0, alpha=0.9, graph_threshold=0.8, temperature=0.2, proj_dim=64,
                    memory_batches=5, da_batches=32),
    'ccssl': dict(tau=0.95, lambda_u=1.0, lambda_c=1.0, temperature=0.07, t_push=0.0, proj_dim=64),
}


@pytest.mark.parametrize('name', BASELINES)
def test_defaults_are_the_papers_and_the_recipe_only_sets_the_method(name):
    d = {k: p.default for k, p in inspect.signature(SSL_ALGORITHMS[name]).parameters.items()}
    assert {k: d[k] for k in PAPER_DEFAULTS[name]} == PAPER_DEFAULTS[name]
    cfg, base = semi_config(name), semi_config('ema_teacher')
    shared = ('lr', 'opt', 'sched', 'weight_decay', 'batch_size', 'uratio', 'epochs', 'steps_per_epoch', 'model', 'warmup_epochs')
    assert {k: getattr(cfg, k) for k in shared} == {k: getattr(base, k) for k in shared}  # only the algorithm differs
    kw = config_args(SSL_ALGORITHMS[name], cfg)
    assert kw == {k: d[k] for k in kw}, (name, kw)  # the config a run records = the task's own defaults


# ---------------------------------------------------------------- Π-model

def test_pi_model_loss_by_hand_and_both_views_get_gradients():
    b = _batch(); lab, weak, strong = _parts(b)
    weak['image'].requires_grad_(); strong['image'].requires_grad_()
    task = PiModel(_lin(), 3, total_steps=300)
    task.after_step(40)  # half of the 80/300 ramp-up
    out = task(b)
    z, z2 = task.model(weak['image']).softmax(1), task.model(strong['image']).softmax(1)
    torch.testing.assert_close(out['loss_u'], ((z - z2) ** 2).sum(1).mean() / 3)
    w = 100 * math.exp(-5 * 0.5 ** 2)
    torch.testing.assert_close(out['loss'], _ce(task.model(lab['image']), lab['label']) + w * out['loss_u'])
    out['loss_u'].backward()
    assert weak['image'].grad.abs().sum() > 0 and strong['image'].grad.abs().sum() > 0  # no stop-gradient on either view


# ---------------------------------------------------------------- Pseudo-Label

def test_pseudo_label_weight_follows_lees_schedule_in_fit():
    task = PseudoLabel(_lin(), 3, total_steps=100, t1=0.1, t2=0.5)
    seen = []
    for step in (0, 5, 10, 30, 50, 90):
        task.after_step(step); seen.append(task(_batch())['w_u'])
    assert seen == pytest.approx([0, 0, 0, 3 * 0.5, 3, 3])
    assert [lee_weight(p, 0.1, 0.5) for p in (0.0, 0.3, 0.5)] == pytest.approx([0, 0.5, 1])


def test_pseudo_label_loss_by_hand_with_threshold():
    b = _batch(); lab, weak, _ = _parts(b)
    task = PseudoLabel(_lin(), 3, tau=0.45)
    out = task(b)
    p = task.model(weak['image']).softmax(1).detach()
    m = p.max(1).values > 0.45
    assert 0 < m.sum() < len(m)  # the threshold matters on this batch
    hand = (F.cross_entropy(task.model(weak['image']), p.argmax(1), reduction='none') * m).sum() / len(m)
    torch.testing.assert_close(out['loss_u'], hand)
    torch.testing.assert_close(out['loss'], out['loss_l'] + 3.0 * hand)


# ---------------------------------------------------------------- Mean Teacher

def test_mean_teacher_loss_by_hand():
    b = _batch(); lab, weak, strong = _parts(b)
    task = MeanTeacher(_lin(), 3)
    with torch.no_grad(): task.teacher.module.weight.mul_(-1)
    out = task(b)
    hand = ((task.model(strong['image']).softmax(1) - task.teacher(weak['image']).softmax(1)) ** 2).mean()
    torch.testing.assert_close(out['loss_u'], hand)
    torch.testing.assert_close(out['loss'], _ce(task.model(lab['image']), lab['label']) + 100 * hand)


class _SelfConsistentMeanTeacher(MeanTeacher):
    "The published bug: the 'student' prediction of the consistency term is the teacher's own output."
    def forward(self, batch):
        lab, weak, strong = _views(batch)
        with torch.no_grad(): p_t = self.teacher(weak['image']).softmax(1); p_s = self.teacher(weak['image']).softmax(1)
        loss_l = F.cross_entropy(self.model(lab['image']), lab['label'])
        loss_u = ((p_s - p_t) ** 2).mean()
        return dict(loss=loss_l + 100 * loss_u, loss_l=loss_l, loss_u=loss_u)


def test_mean_teacher_trap_teacher_against_itself_trains_nothing():
    bad = gradient_report(_SelfConsistentMeanTeacher(_lin(), 3), _batch())
    good = gradient_report(MeanTeacher(_lin(), 3), _batch())
    assert bad['unlabeled_loss_reaches_student'] is False
    assert good['unlabeled_loss_reaches_student'] is True and good['teacher_with_grad'] == []


def test_mean_teacher_is_the_ema_of_the_student_with_ramp_up_decays_in_fit():
    task = MeanTeacher(_lin(), 3, total_steps=6, rampup=0.5)
    snaps = []
    class Rec(list):
        def __iter__(self):
            for b in list.__iter__(self): snaps.append(task.model.weight.detach().clone()); yield b
    fit(task, Rec([_batch(seed=s) for s in range(6)]), optimizer=build_optimizer(task.model, 0.1, 0.0), epochs=1,
        device='cpu', progress=False)
    traj = snaps + [task.model.weight.detach()]
    t = traj[0]
    for k, s in enumerate(traj[1:], start=1):  # α = 0.99 while step/6 < 0.5, then 0.999
        a = 0.99 if k / 6 < 0.5 else 0.999
        t = a * t + (1 - a) * s
    torch.testing.assert_close(task.teacher.module.weight, t)
    assert not torch.equal(task.teacher.module.weight, traj[0])


# ---------------------------------------------------------------- VAT

def _bn_dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))


def test_vat_search_leaves_the_model_untouched_and_is_deterministic():
    net = _bn_dropout_net().train()
    net[2].eval()  # a mixed state must come back as it was
    state = copy.deepcopy(net.state_dict()); modes = [m.training for m in net.modules()]
    x = _batch()['unlabeled']['weak']['image']
    with frozen_mode(net), torch.no_grad(): p = net(x).softmax(1)
    r1 = vat_perturbation(net, x, p, generator=torch.Generator().manual_seed(3))
    r2 = vat_perturbation(net, x, p, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2)  # no dropout noise in the search
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # BN running stats and counter untouched
    assert [m.training for m in net.modules()] == modes
    assert all(q.grad is None for q in net.parameters())
    torch.testing.assert_close(r1.norm(dim=1), torch.full((8,), 8.0), rtol=1e-4, atol=1e-4)


def test_vat_power_iteration_finds_the_dominant_direction():
    "For a linear softmax model the KL's Hessian in x is Wᵀ(diag p − ppᵀ)W: power iteration converges to its top eigenvector."
    torch.manual_seed(0)
    lin = nn.Linear(8, 3); x = torch.randn(5, 8)
    with torch.no_grad(): p = lin(x).softmax(1)
    r = vat_perturbation(lin, x, p, xi=1e-2, eps=1.0, iters=30, generator=torch.Generator().manual_seed(0))
    W = lin.weight.detach()
    for i in range(5):
        H = W.t() @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ W
        top = torch.linalg.eigh(H.double()).eigenvectors[:, -1].float()
        assert abs(float(r[i] @ top)) > 0.99


def test_vat_loss_by_hand():
    b = _batch(); lab, weak, _ = _parts(b)
    net = _bn_dropout_net()
    task = VAT(net, 3, seed=4, lambda_ent=0.5)
    state = copy.deepcopy(net.state_dict())
    with frozen_mode(net), torch.no_grad(): p = net(weak['image']).softmax(1)
    r = vat_perturbation(net, weak['image'], p, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(9); out = task.train()(b)
    torch.manual_seed(9); logits = net.train()(torch.cat([lab['image'], weak['image'], weak['image'] + r]))  # same dropout
    net.load_state_dict(state)
    q, lw = logits[14:].softmax(1), logits[6:14]
    torch.testing.assert_close(out['loss_u'], (p * (p.log() - q.log())).sum(1).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out['loss_ent'], -(lw.softmax(1) * lw.log_softmax(1)).sum(1).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out['loss'], _ce(logits[:6], lab['label']) + out['loss_u'] + 0.5 * out['loss_ent'], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- UDA

def test_uda_loss_by_hand_with_tsa():
    b = _batch(); lab, weak, strong = _parts(b)
    task = UDA(_lin(), 3, tau=0.4, T=0.4, tsa='log', total_steps=10)
    with torch.no_grad(): task.model.weight.mul_(3)  # confident on some labeled samples: TSA drops those
    task.after_step(2)
    out = task(b)
    zw, zs, zl = task.model(weak['image']).detach(), task.model(strong['image']), task.model(lab['image'])
    q, m = (zw / 0.4).softmax(1), zw.softmax(1).max(1).values > 0.4
    kl = (q * (q.log() - zs.log_softmax(1))).sum(1)
    torch.testing.assert_close(out['loss_u'], (kl * m).mean())
    eta = (1 - math.exp(-5 * 0.2)) * (2 / 3) + 1 / 3
    assert tsa_threshold(0.2, 3, 'log') == pytest.approx(eta)
    keep = (zl.softmax(1).gather(1, lab['label'][:, None]).squeeze(1) < eta).float()
    assert 0 < keep.sum() < len(keep)
    ce = F.cross_entropy(zl, lab['label'], reduction='none')
    torch.testing.assert_close(out['loss_l'], (ce * keep).sum() / keep.sum())
    torch.testing.assert_close(out['loss'], out['loss_l'] + out['loss_u'])


# ---------------------------------------------------------------- MixMatch and ReMixMatch

def test_mixmatch_loss_by_hand():
    b = _batch(); lab, weak, strong = _parts(b)
    task = MixMatch(_lin(), 3, seed=11, total_steps=1000)
    task.after_step(8)
    out = task(b)
    g = np.random.default_rng(11); lam = g.beta(0.75, 0.75); lam = max(lam, 1 - lam); perm = torch.from_numpy(g.permutation(22))
    m = task.model
    pbar = (m(weak['image']).softmax(1) + m(strong['image']).softmax(1)) / 2
    q = pbar ** 2 / (pbar ** 2).sum(1, keepdim=True)
    X = torch.cat([lab['image'], weak['image'], strong['image']]); Y = torch.cat([F.one_hot(lab['label'], 3).float(), q, q])
    Xm, Ym = lam * X + (1 - lam) * X[perm], lam * Y + (1 - lam) * Y[perm]
    o = m(Xm)
    lx = -(Ym[:6] * o[:6].log_softmax(1)).sum(1).mean()
    lu = ((o[6:].softmax(1) - Ym[6:]) ** 2).sum(1).mean() / 3
    w = 100 * min(1.0, (8 / 1000) / (16000 / 2 ** 20))
    torch.testing.assert_close(out['loss_l'], lx); torch.testing.assert_close(out['loss_u'], lu)
    torch.testing.assert_close(out['loss'], lx + w * lu)


def test_remixmatch_alignment_uses_the_models_running_mean_not_the_prior_alone():
    da = DistributionAlignment(3, batches=3)  # uniform prior
    batches = [torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]), torch.tensor([[0.6, 0.3, 0.1]]),
               torch.tensor([[0.2, 0.2, 0.6]]), torch.tensor([[0.9, 0.05, 0.05]])]
    for x in batches: da.update(x)
    ptilde = torch.stack([x.mean(0) for x in batches[1:]]).mean(0)  # the last 3 batch means
    torch.testing.assert_close(da.p_model, ptilde)
    p = torch.tensor([[0.5, 0.3, 0.2]])
    aligned = da(p)
    hand = p / ptilde; hand = hand / hand.sum()
    torch.testing.assert_close(aligned, hand)
    assert not torch.allclose(aligned, p)  # a uniform prior alone would leave p unchanged


def test_remixmatch_loss_by_hand():
    b = _batch(shape=(3, 4, 4)); lab, weak, strong = _parts(b)
    prior = [0.2, 0.3, 0.5]
    task = ReMixMatch(_net(), 3, seed=2, label_prior=prior, da_batches=2)
    task(_batch(shape=(3, 4, 4), seed=1))  # one earlier batch in the running mean
    earlier = task.model(_batch(shape=(3, 4, 4), seed=1)['unlabeled']['weak']['image']).softmax(1).mean(0)
    task.rng = np.random.default_rng(2)
    out = task(b)
    m = task.model
    pw = m(weak['image']).softmax(1)
    ptilde = (earlier + pw.mean(0)) / 2
    a = pw * torch.tensor(prior) / ptilde; a = a / a.sum(1, keepdim=True)
    q = a ** 2 / (a ** 2).sum(1, keepdim=True)
    g = np.random.default_rng(2); lam = g.beta(0.75, 0.75); lam = max(lam, 1 - lam)
    perm = torch.from_numpy(g.permutation(22)); rot = torch.from_numpy(g.integers(0, 4, 8))
    X = torch.cat([lab['image'], strong['image'], weak['image']]); Y = torch.cat([F.one_hot(lab['label'], 3).float(), q, q])
    o = m(lam * X + (1 - lam) * X[perm]); Ym = lam * Y + (1 - lam) * Y[perm]
    lx = -(Ym[:6] * o[:6].log_softmax(1)).sum(1).mean(); lu = -(Ym[6:] * o[6:].log_softmax(1)).sum(1).mean()
    lu1 = -(q * m(strong['image']).log_softmax(1)).sum(1).mean()
    xr = torch.stack([torch.rot90(i, int(k), (1, 2)) for i, k in zip(strong['image'], rot)])
    lrot = F.cross_entropy(task.heads['rot'](m[:-1](xr)), rot)
    for k, v in dict(loss_l=lx, loss_u=lu, loss_u1=lu1, loss_rot=lrot).items():
        torch.testing.assert_close(out[k], v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out['loss'], lx + 1.5 * lu + 0.5 * lu1 + 0.5 * lrot, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- FlexMatch

def test_flexmatch_normalized_learning_effect_with_warmup():
    N, C, tau = 20, 3, 0.9
    state = torch.full((N,), -1)
    assert torch.equal(flexmatch_thresholds(state, C, tau), torch.zeros(C))  # nothing learned yet: all thresholds 0
    state[:6] = torch.tensor([0, 0, 0, 0, 1, 1])  # σ = (4, 2, 0), 14 samples unused
    beta = torch.tensor([4., 2., 0.]) / 14  # warm-up: the unused count dominates the normalisation
    torch.testing.assert_close(flexmatch_thresholds(state, C, tau), beta / (2 - beta) * tau)
    beta_nw = torch.tensor([4., 2., 0.]) / 4
    torch.testing.assert_close(flexmatch_thresholds(state, C, tau, warmup=False), beta_nw / (2 - beta_nw) * tau)
    state[6:] = torch.tensor([2] * 10 + [1] * 4)  # σ = (4, 6, 10), none unused: normalised by max σ
    beta = torch.tensor([4., 6., 10.]) / 10
    torch.testing.assert_close(flexmatch_thresholds(state, C, tau), beta / (2 - beta) * tau)
    assert flexmatch_thresholds(state, C, tau)[2] == pytest.approx(tau)  # the best-learned class gets τ itself


def test_flexmatch_updates_its_state_and_thresholds_every_step():
    b = _batch(); lab, weak, strong = _parts(b)
    task = FlexMatch(_lin(), 3, tau=0.45, num_unlabeled=12)
    task.state[8:] = torch.tensor([0, 0, 1, -1])
    thr = flexmatch_thresholds(task.state.clone(), 3, 0.45)
    out = task(b)
    p = task.model(weak['image']).softmax(1).detach(); c, y = p.max(1)
    m = c > thr[y]
    torch.testing.assert_close(out['loss_u'], (F.cross_entropy(task.model(strong['image']), y, reduction='none') * m).mean())
    assert torch.equal(task.state[:8], torch.where(c > 0.45, y, torch.full_like(y, -1)))  # latest prediction above τ, else unused
    assert torch.equal(task.state[8:], torch.tensor([0, 0, 1, -1]))  # samples outside the batch keep theirs
    log = task.after_epoch(0)
    assert [log[f'ssl/tau_{k}'] for k in range(3)] == pytest.approx(flexmatch_thresholds(task.state, 3, 0.45).tolist())
    assert log['ssl/unused'] == pytest.approx((task.state < 0).float().mean().item())
    with pytest.raises(KeyError, match='index'):
        b2 = _batch(); del b2['unlabeled']['weak']['index']; task(b2)


# ---------------------------------------------------------------- FreeMatch

def test_freematch_ema_of_confidence_global_and_per_class_over_two_steps():
    task = FreeMatch(_lin(), 3, thr_momentum=0.8)
    tg, pt, ht = torch.tensor(1 / 3), torch.full((3,), 1 / 3), torch.full((3,), 1 / 3)
    for seed in (0, 1):
        b = _batch(seed=seed); lab, weak, strong = _parts(b)
        out = task(b)
        q = task.model(weak['image']).softmax(1).detach()
        tg = 0.8 * tg + 0.2 * q.max(1).values.mean()
        pt = 0.8 * pt + 0.2 * q.mean(0)
        ht = 0.8 * ht + 0.2 * torch.bincount(q.argmax(1), minlength=3).float() / 8
        torch.testing.assert_close(task.tau_global, tg); torch.testing.assert_close(task.p_tilde, pt)
        torch.testing.assert_close(task.h_tilde, ht)
        thr = pt / pt.max() * tg  # MaxNorm(p̃)·τ_t
        m = q.max(1).values > thr[q.argmax(1)]
        torch.testing.assert_close(out['loss_u'], (F.cross_entropy(task.model(strong['image']), q.argmax(1), reduction='none') * m).mean())
    log = task.after_epoch(0)
    assert [log[f'ssl/tau_{k}'] for k in range(3)] == pytest.approx(thr.tolist()) and log['ssl/tau_global'] == pytest.approx(tg.item())


def test_freematch_fairness_loss_by_hand():
    task = FreeMatch(_lin(), 3)
    task.p_tilde.copy_(torch.tensor([0.5, 0.3, 0.2])); task.h_tilde.copy_(torch.tensor([0.6, 0.3, 0.1]))
    Q = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    mask = torch.tensor([True, True, True, False])
    pbar = Q[:3].mean(0); hbar = torch.tensor([2., 0., 1.]) / 3  # class 1 never the arg-max: its ratio is 0
    ratio = torch.tensor([pbar[0] / hbar[0], 0., pbar[2] / hbar[2]])
    a = torch.tensor([0.5 / 0.6, 1.0, 2.0]); a = a / a.sum()
    hand = (a * torch.log(ratio / ratio.sum() + 1e-12)).sum()  # −H(a, b) = Σ a log b
    torch.testing.assert_close(task.fairness(Q, mask), hand)
    assert task.fairness(Q, torch.zeros(4, dtype=torch.bool)) == 0


# ---------------------------------------------------------------- SoftMatch

def test_softmatch_truncated_gaussian_from_ema_mean_and_variance():
    m = 0.2  # a fast EMA, so that μ_t sits inside this batch's confidences
    task = SoftMatch(_lin(), 3, thr_momentum=m)
    mu, var, pm = torch.tensor(1 / 3), torch.tensor(1.0), torch.full((3,), 1 / 3)
    for seed in (0, 1):
        b = _batch(seed=seed); lab, weak, strong = _parts(b)
        out = task(b)
        q = task.model(weak['image']).softmax(1).detach()
        pm = m * pm + (1 - m) * q.mean(0)
        ua = q / 3 / pm; ua = ua / ua.sum(1, keepdim=True)  # uniform alignment
        c, y = ua.max(1)
        mu = m * mu + (1 - m) * c.mean()
        var = m * var + (1 - m) * c.var(unbiased=True)
        torch.testing.assert_close(task.mu, mu); torch.testing.assert_close(task.var, var); torch.testing.assert_close(task.p_mean, pm)
        w = torch.where(c < mu, torch.exp(-(c - mu) ** 2 / (2 * var)), torch.ones_like(c))
        assert (w < 1).any() and (w == 1).any()  # both branches of the truncated Gaussian occur
        torch.testing.assert_close(out['loss_u'], (F.cross_entropy(task.model(strong['image']), y, reduction='none') * w).mean())
        torch.testing.assert_close(out['weight_mean'], w.mean())
    assert task.after_epoch(0)['ssl/sigma'] == pytest.approx(var.sqrt().item())


def test_truncated_gaussian_weight_shape():
    conf = torch.linspace(0, 1, 11)
    w = truncated_gaussian_weight(conf, 0.6, 0.01)
    assert torch.all(w[conf >= 0.6] == 1) and torch.all(torch.diff(w) >= 0)  # non-decreasing, full weight from μ
    assert w[0] == pytest.approx(math.exp(-0.36 / 0.02))
    assert truncated_gaussian_weight(torch.tensor([0.5]), 0.6, 0.01, lambda_max=2.0).item() == pytest.approx(2 * math.exp(-0.5))


# ---------------------------------------------------------------- CoMatch

def test_comatch_loss_by_hand_over_two_steps_and_memory_ring():
    b = _batch(shape=(3, 4, 4)); lab, weak, strong = _parts(b)
    task = CoMatch(_net(), 3, tau=0.5, alpha=0.7, temperature=0.3, graph_threshold=0.5, batch_size=6, uratio=1, memory_batches=1)
    K = len(task.mem_z); assert K == 12  # 1 step of 6 labeled + 6 unlabeled
    emb = lambda x: F.normalize(task.heads['proj'](task.model[:-1](x)), dim=1)
    out1 = task(b)
    p = task.model(weak['image']).softmax(1).detach()
    a1 = p / p.mean(0); a1 = a1 / a1.sum(1, keepdim=True)
    ls = task.model(strong['image'])
    m1 = a1.max(1).values >= 0.5
    torch.testing.assert_close(out1['loss_u'], (-(a1 * ls.log_softmax(1)).sum(1) * m1).mean(), rtol=1e-4, atol=1e-6)
    wq = a1 @ a1.t(); wq.fill_diagonal_(1); wq = wq * (wq >= 0.5); wq = wq / wq.sum(1, keepdim=True)
    wz = (emb(weak['image']) @ emb(strong['image']).t() / 0.3).log_softmax(1)
    torch.testing.assert_close(out1['loss_c'], -(wq * wz).sum(1).mean(), rtol=1e-4, atol=1e-6)
    # the memory (12 rows) received 8 weak + 6 labeled rows: it wrapped, the first labeled rows overwrote two weak ones
    zw, zl = emb(weak['image']).detach(), emb(lab['image']).detach()
    rows_z = torch.cat([zw, zl]); rows_q = torch.cat([a1, F.one_hot(lab['label'], 3).float()])
    mem_z, mem_q = torch.zeros(12, 64), torch.zeros(12, 3)
    for i in range(14): mem_z[i % 12], mem_q[i % 12] = rows_z[i], rows_q[i]  # a ring: later rows overwrite
    torch.testing.assert_close(task.mem_z, mem_z, rtol=1e-4, atol=1e-6); torch.testing.assert_close(task.mem_q, mem_q)
    out2 = task(b)
    a2 = p / p.mean(0); a2 = a2 / a2.sum(1, keepdim=True)  # same batch twice: p̃ unchanged
    q2 = 0.7 * a2 + 0.3 * (zw @ mem_z.t() / 0.3).softmax(1) @ mem_q
    m2 = q2.max(1).values >= 0.5
    torch.testing.assert_close(out2['loss_u'], (-(q2 * ls.log_softmax(1)).sum(1) * m2).mean(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- CCSSL

def _ccssl_by_hand(z1, z2, y, c, t, t_push):
    z, y, c, N = torch.cat([z1, z2]), y.repeat(2), c.repeat(2), len(z1)
    total = 0.
    for i in range(2 * N):
        den = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(2 * N) if a != i)
        num = wsum = 0.
        for j in range(2 * N):
            if j == i or y[i] != y[j]: continue
            if not (j % N == i % N or (c[i] >= t_push and c[j] >= t_push)): continue
            w = float(c[i] * c[j]); num += w * (float(z[i] @ z[j]) / t - math.log(den)); wsum += w
        total += -num / wsum
    return total / (2 * N)


@pytest.mark.parametrize('t_push', [0.0, 0.6])
def test_ccssl_class_aware_contrastive_by_hand(t_push):
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    y, c = torch.tensor([0, 0, 1, 1, 0, 2]), torch.tensor([0.9, 0.5, 0.8, 0.7, 0.95, 0.4])
    assert class_aware_contrastive(z1, z2, y, c, 0.1, t_push).item() == pytest.approx(_ccssl_by_hand(z1, z2, y, c, 0.1, t_push), rel=1e-5)


def test_ccssl_loss_by_hand():
    b = _batch(shape=(3, 4, 4)); lab, weak, strong = _parts(b)
    task = CCSSL(_net(), 3, tau=0.4, t_push=0.5)
    out = task(b)
    emb = lambda x: F.normalize(task.heads['proj'](task.model[:-1](x)), dim=1).detach()
    p = task.model(weak['image']).softmax(1).detach(); c, y = p.max(1)
    assert out['loss_c'].item() == pytest.approx(_ccssl_by_hand(emb(weak['image']), emb(strong['image']), y, c, 0.07, 0.5), rel=1e-4)
    torch.testing.assert_close(out['loss_u'], (F.cross_entropy(task.model(strong['image']), y, reduction='none') * (c > 0.4)).mean())
    torch.testing.assert_close(out['loss'], out['loss_l'] + out['loss_u'] + out['loss_c'])


# ---------------------------------------------------------------- end to end through semi_train

DIAGNOSTICS = {'flexmatch': ['ssl/tau_0', 'ssl/tau_6', 'ssl/unused'], 'freematch': ['ssl/tau_0', 'ssl/tau_6', 'ssl/tau_global'],
               'softmatch': ['ssl/mu', 'ssl/sigma', 'train/weight_mean'], 'remixmatch': ['ssl/p_model_0', 'train/loss_rot'],
               'comatch': ['ssl/p_model_0', 'train/loss_c'], 'ccssl': ['train/loss_c'], 'mean_teacher': ['test/teacher/acc'],
               'pi_model': ['train/w_u'], 'pseudo_label': ['train/w_u'], 'mixmatch': ['train/w_u', 'train/mix_lambda'],
               'vat': ['train/loss_ent'], 'uda': ['train/tsa_kept']}


@pytest.mark.slow
@pytest.mark.parametrize('name', BASELINES)
def test_semi_train_runs_every_baseline_and_logs_its_diagnostics(name, tmp_path):
    cfg = semi_config(name, 'test', device='cpu')
    m = semi_train(cfg, tmp_path/name, progress=False)
    hist = json.loads((tmp_path/name/'history.json').read_text())
    assert m['algorithm'] == name and len(hist) == cfg.epochs and m['steps'] == hist[-1]['step'] > 0
    assert m['task_kwargs'].get('total_steps', m['steps']) == m['steps']  # ramp-ups see the run's real length
    for h in hist:
        assert math.isfinite(h['train/loss']) and 0 <= h['train/mask_rate'] <= 1
        assert 'pl/acc_all' in h and 0 <= h['pl/acc_all'] <= 1  # pseudo-label accuracy on the hidden labels
        for k in DIAGNOSTICS[name]: assert k in h, (name, k, sorted(h))
    assert m['reported_model'] == ('teacher' if name == 'mean_teacher' else 'model')
    assert (tmp_path/name/'pseudo_labels.png').exists()
    assert (tmp_path/name/'thresholds.png').exists() is (name in ('flexmatch', 'freematch'))
    ck = torch.load(tmp_path/name/'last.pt', weights_only=True)
    n_opt = sum(len(g['params']) for g in ck['optimizer']['param_groups'])
    n_train = sum(1 for k in ck['model'] if k.startswith('model.')) - 0  # every student tensor is a parameter (timm ViT: no buffers)
    n_heads = sum(1 for k in ck['model'] if k.startswith('heads.'))
    assert n_opt == n_train + n_heads  # the projection / rotation heads are trained too


# ---------------------------------------------------------------- eight classes (FERPlus)

@pytest.mark.parametrize('name', BASELINES + ['fixmatch', 'ema_teacher', 'dtm'])
def test_every_method_takes_eight_classes(name):
    "FERPlus has 8 classes: every method trains a step on them, counts its guesses per class, and its thresholds are 8."
    C = 8
    net = _net(c=C)
    task = SSL_ALGORITHMS[name](net, C, **(dict(num_unlabeled=16) if name == 'flexmatch' else {}))
    out = task(_batch(nl=16, nu=16, shape=(3, 4, 4), c=C))
    assert torch.isfinite(out['loss']); out['loss'].backward()
    assert net[-1].weight.grad is not None and net[-1].weight.grad.abs().sum() > 0
    rec = task.after_epoch(0)
    assert {f'pl/count_{c}' for c in range(C)} <= set(rec)
    assert len([k for k in rec if k.startswith('ssl/tau_') and k[8:].isdigit()]) in (0, C)


def test_flexmatch_learns_the_eighth_class():
    "A model confident in class 7 on every unlabeled face: FlexMatch records it, and only class 7's threshold rises (to τ)."
    C, tau = 8, 0.95
    lin = nn.Linear(8, C); nn.init.zeros_(lin.weight); nn.init.zeros_(lin.bias)
    with torch.no_grad(): lin.bias[7] = 10.0  # p(7) ≈ 0.9994 > τ everywhere
    task = FlexMatch(lin, C, tau=tau, num_unlabeled=8)
    assert torch.equal(task.thresholds(), torch.zeros(C))  # nothing learned: every threshold 0
    task(_batch(c=C))
    assert torch.equal(task.state, torch.full((8,), 7))
    torch.testing.assert_close(task.thresholds(), torch.tensor([0.0] * 7 + [tau]))  # β(7) = 8/max(8, 0) = 1: M(1)·τ = τ
