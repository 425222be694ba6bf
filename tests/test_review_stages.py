"""The stage functions end to end at their 'test' presets: each method leaves its own trace in the history and the
metrics, so a stage that ignored `cfg.mix`, `cfg.kappa` or `cfg.algorithm` (or a recipe) fails here; the stages'
schedulers agree with `fit`'s step count under gradient accumulation. About 20 s on one core."""
import json

import pytest
import torch

from ssfer_lib.finetune import finetune, finetune_config
from ssfer_lib.pretrain import pretrain, pretrain_config
from ssfer_lib.semi_train import semi_config, semi_train

torch.set_num_threads(1)


def _history(run):
    return json.loads((run/'history.json').read_text())


def _config(run):
    return json.loads((run/'metrics.json').read_text())['provenance']['config']


def _train_keys(h):
    return {k for k in h if k.startswith('train/')}


# ---- stage 2: fine-tuning ----

FT_RUNS = {  # name -> overrides of finetune_config('test')
    'none': dict(mix='none'), 'mixup': dict(mix='mixup'), 'cutmix': dict(mix='cutmix'),
    'facemix-iou': dict(mix='facemix', kappa='iou'), 'facemix-psnr': dict(mix='facemix', kappa='psnr'),
    'mscl': dict(mix='mscl'),
    'facemix+mscl-iou': dict(mix='facemix+mscl', kappa='iou'), 'facemix+mscl-psnr': dict(mix='facemix+mscl', kappa='psnr'),
}


@pytest.fixture(scope='module')
def ft(tmp_path_factory):
    "name -> (metrics, history, run folder) of every fine-tuning run above (one box cache for all)."
    root = tmp_path_factory.mktemp('finetune'); out = {}
    for name, kw in FT_RUNS.items():
        cfg = finetune_config('test', box_root=str(root/'boxes'), **kw)
        m = finetune(cfg, root/name, progress=False)
        out[name] = (m, _history(root/name), root/name)
    return out


# scalars each method must log ('has') and must not log ('lacks'), every epoch
MIX_TRACES = {
    'none': (dict(has={'train/loss', 'train/acc'}, lacks={'train/kappa', 'train/lam', 'train/mscl', 'train/mix_lam'})),
    'mixup': (dict(has={'train/loss'}, lacks={'train/acc', 'train/kappa', 'train/lam', 'train/mscl', 'train/mix_lam'})),
    'cutmix': (dict(has={'train/loss'}, lacks={'train/acc', 'train/kappa', 'train/lam', 'train/mscl', 'train/mix_lam'})),
    'facemix-iou': (dict(has={'train/kappa', 'train/lam', 'train/loss_v', 'train/loss_real'}, lacks={'train/mscl', 'train/mix_lam'})),
    'mscl': (dict(has={'train/mscl', 'train/cls', 'train/mix_lam'}, lacks={'train/kappa', 'train/lam'})),
    'facemix+mscl-iou': (dict(has={'train/mscl', 'train/cls', 'train/kappa', 'train/lam'}, lacks={'train/mix_lam'})),
}


@pytest.mark.parametrize('name', sorted(MIX_TRACES))
def test_finetune_logs_what_its_mix_method_computes(ft, name):
    m, hist, run = ft[name]
    has, lacks = MIX_TRACES[name]['has'], MIX_TRACES[name]['lacks']
    for h in hist:
        assert has <= _train_keys(h), (name, h['epoch'], sorted(_train_keys(h)))
        assert not lacks & _train_keys(h), (name, h['epoch'], sorted(lacks & _train_keys(h)))
    assert {f'last/{k}' for k in has} <= set(m) and not {f'last/{k}' for k in lacks} & set(m)
    assert _config(run)['mix'] == FT_RUNS[name]['mix']


def test_finetune_mix_methods_train_differently(ft):
    "Same data, seed and initial model: 'none', 'mixup' and 'cutmix' give different first-epoch losses."
    losses = {n: ft[n][1][0]['train/loss'] for n in ('none', 'mixup', 'cutmix')}
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


@pytest.mark.parametrize('mix', ['facemix', 'facemix+mscl'])
def test_finetune_kappa_metric_reaches_facemix(ft, mix):
    """κ = 'iou' (face boxes) and 'psnr' (pixels) on the same pairs and λ draws give different mean κ (and κ weighs
    the loss); the pairing and λ stream are the same in both runs."""
    (mi, hi, ri), (mp, hp, rp) = ft[f'{mix}-iou'], ft[f'{mix}-psnr']
    assert _config(ri)['kappa'] == 'iou' and _config(rp)['kappa'] == 'psnr'
    for a, b in zip(hi, hp):
        assert 0 < a['train/kappa'] <= 1 and 0 < b['train/kappa'] <= 1
        assert abs(a['train/kappa'] - b['train/kappa']) > 0.05, (a['train/kappa'], b['train/kappa'])
        assert a['train/lam'] == pytest.approx(b['train/lam'], abs=1e-6)  # same λ draws: only κ differs
    assert mi['last/train/kappa'] != pytest.approx(mp['last/train/kappa'], abs=0.05)


def test_finetune_schedule_ends_at_min_lr(ft):
    for name, (m, hist, run) in ft.items():
        cfg = _config(run)
        assert hist[-1]['lr'] == pytest.approx(cfg['min_lr'], rel=1e-6), name


def test_finetune_accumulation_steps_match_its_schedule(tmp_path):
    """28 labeled images in batches of 8 (drop_last): 3 batches per epoch, 1 step of 2 batches; the stage's scheduler
    (built for len(loader) // accum_steps steps per epoch) ends at min_lr after exactly epochs × 1 steps."""
    cfg = finetune_config('test', mix='none', accum_steps=2, box_root=str(tmp_path/'boxes'))
    m = finetune(cfg, tmp_path/'run', progress=False)
    hist = _history(tmp_path/'run')
    assert m['n_labeled'] == 28 and [h['step'] for h in hist] == [1, 2]
    assert hist[-1]['lr'] == pytest.approx(cfg.min_lr, rel=1e-6)
    # an accumulation group longer than an epoch would never step: an error, not a run that trains nothing
    with pytest.raises(ValueError, match='accum_steps=4 exceeds the 3 batches'):
        finetune(finetune_config('test', mix='none', accum_steps=4, box_root=str(tmp_path/'boxes')), tmp_path/'run4', progress=False)


# ---- stage 1: MAE, the same contract ----

def test_pretrain_accumulation_steps_match_its_schedule(tmp_path):
    cfg = pretrain_config('test', accum_steps=2)
    m = pretrain(cfg, tmp_path/'mae', progress=False)
    hist = _history(tmp_path/'mae')
    per_epoch = (m['n_images'] // cfg.batch_size) // 2
    assert per_epoch >= 1 and m['steps'] == cfg.epochs * per_epoch
    assert [h['step'] for h in hist] == [per_epoch * (e + 1) for e in range(cfg.epochs)]
    assert hist[-1]['lr'] == pytest.approx(cfg.min_lr, abs=1e-12)


# ---- stage 3: semi-supervised ----

SEMI = ['supervised', 'ema_teacher', 'fixmatch', 'dtm']


@pytest.fixture(scope='module')
def semi(tmp_path_factory):
    "algorithm -> (metrics, history, run folder, config) of the 'test' preset from scratch."
    root = tmp_path_factory.mktemp('semi'); out = {}
    for alg in SEMI:
        cfg = semi_config(alg, 'test')
        m = semi_train(cfg, root/alg, progress=False)
        out[alg] = (m, _history(root/alg), root/alg, cfg)
    return out


# (logs a mask rate, logs DTM thresholds, the models evaluated) per algorithm
SEMI_TRACES = {'supervised': (False, False, {'model'}), 'ema_teacher': (True, False, {'student', 'teacher'}),
               'fixmatch': (True, False, {'model'}), 'dtm': (True, True, {'student', 'teacher'})}


@pytest.mark.parametrize('alg', SEMI)
def test_semi_logs_what_its_algorithm_computes(semi, alg):
    m, hist, run, cfg = semi[alg]
    masks, thresholds, models = SEMI_TRACES[alg]
    assert m['algorithm'] == alg and _config(run)['algorithm'] == alg
    for h in hist:
        assert ('train/mask_rate' in h) is masks and ('train/loss_u' in h) is masks, (alg, sorted(h))
        assert any(k.startswith('pl/') for k in h) is masks
        if masks: assert 0 <= h['train/mask_rate'] <= 1
        taus = sorted(k for k in h if k.startswith('dtm/tau_'))
        assert bool(taus) is thresholds, (alg, taus)
        assert {k.split('/')[1] for k in h if k.startswith('test/') and k.endswith('/acc')} == models
    assert ('last/train/mask_rate' in m) is masks
    # DTM reports network A (the trained student); the EMA teacher is SSFER's headline
    assert m['reported_model'] == ('student' if alg == 'dtm' else 'teacher' if 'teacher' in models else 'model')
    assert (run/'thresholds.png').exists() is thresholds and (run/'pseudo_labels.png').exists() is masks


def test_dtm_thresholds_are_per_class_and_updated(semi):
    "One threshold per class, initialised at tau_init and moved by network B's confidence on the labeled set (Eqs. 7-8)."
    m, hist, run, cfg = semi['dtm']
    K = len(m['classes'])
    for h in hist:
        taus = [h[f'dtm/tau_{c}'] for c in range(K)]
        assert len([k for k in h if k.startswith('dtm/tau_')]) == K and all(0 < t <= 1 for t in taus)
    assert any(abs(h[f'dtm/tau_{c}'] - cfg.tau_init) > 1e-6 for h in hist for c in range(K)), 'thresholds never updated'


def test_semi_recipes_reach_the_run(semi):
    "DTM's recipe trains at a fixed lr; SSFER's cosine schedule ends at min_lr; each step count is epochs × batches."
    for alg, (m, hist, run, cfg) in semi.items():
        if cfg.sched == 'fixed': assert {h['lr'] for h in hist} == {cfg.lr}, alg
        else: assert hist[-1]['lr'] == pytest.approx(cfg.min_lr, rel=1e-6), alg
        assert m['steps'] == hist[-1]['step'] and hist[-1]['step'] % cfg.epochs == 0
    assert semi['dtm'][3].sched == 'fixed' and semi['ema_teacher'][3].sched == 'cosine'
    assert semi['dtm'][0]['task_kwargs']['lambda_u'] == 0.8 and semi['fixmatch'][0]['task_kwargs']['tau'] == 0.95
