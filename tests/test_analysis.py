"""Tests of the analysis layer (SSFER §4.6–4.9): params/FLOPs by hand, grey wolf optimization and its resume,
Grad-CAM regions and region-restricted FGSM, k-fold, label-noise tables."""
import json
import math
import pytest
import torch
from torch import nn
from ssfer_lib.complexity import linear_macs, model_complexity, param_counts, torch_flops
from ssfer_lib.gwo import gwo_minimize


# ---------------------------------------------------------------- params and FLOPs (Table 6)
def test_tiny_vit_flops_equal_hand_count():
    S, P, L, d, K = 16, 4, 2, 48, 7  # image side, patch, blocks, width, classes
    n = (S // P) ** 2; T = n + 1  # patches, tokens (+ class token)
    conv = n * d * 3 * P * P  # patch embedding: one d-vector per patch from 3·P² pixels
    block = T * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)  # qkv, proj, fc1, fc2 on every token
    attn = 2 * T * T * d  # QKᵀ and AV over all heads
    head = d * K  # class token only
    macs = conv + L * block + head
    c = model_complexity('vit_tiny_patch16_224', img_size=S, num_classes=K, patch_size=P, depth=L, embed_dim=d, num_heads=3)
    assert round(c['macs_g'] * 1e9) == macs
    assert round(c['flops_g'] * 1e9) == 2 * (macs + L * attn)  # torch: 2 FLOPs per multiply-add, attention included
    # parameters by hand: conv, cls + pos, blocks, final norm, head
    blk = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    params = (3 * P * P * d + d) + (d + T * d) + L * blk + 2 * d + (d * K + K)
    assert round(c['params_m'] * 1e6) == params and round(c['params_leaf_m'] * 1e6) == params - d - T * d


def test_attention_counted_on_cpu():
    "torch's flop counter has no formula for the CPU flash-attention kernel: ours must count it."
    q = torch.randn(2, 3, 7, 8)
    class A(nn.Module):
        def forward(self, q): return nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch_flops(A(), q) == 2 * 2 * (2 * 3 * 7 * 7 * 8)


def test_linear_macs_and_leaf_params():
    m = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 16, 5))  # 6×6 → 4×4 outputs
    assert linear_macs(m, torch.zeros(1, 4, 6, 6)) == 6 * 16 * 2 * 9 + 96 * 5  # a group sees 4/2 input channels
    n = 6 * 2 * 9 + 6 + 96 * 5 + 5
    assert param_counts(m) == dict(params=n, params_leaf=n)


# ---------------------------------------------------------------- GWO (Table 16)
SPHERE = lambda p: sum(v * v for v in p.values())
BOX = {k: (-10.0, 10.0) for k in 'abc'}


def test_gwo_finds_sphere_minimum():
    r = gwo_minimize(SPHERE, BOX, budget=300, n_wolves=10, seed=1)
    assert r['n_evals'] == 300 and r['best_value'] < 1e-4  # from values up to 300 at the start
    assert all(abs(v) < 1e-2 for v in r['best'].values())
    shifted = gwo_minimize(lambda p: (p['a'] - 3) ** 2 + (p['b'] + 2) ** 2 + (p['c'] - 5) ** 2, BOX, 400, 10, seed=1)
    assert abs(shifted['best']['a'] - 3) < 0.05 and abs(shifted['best']['b'] + 2) < 0.05 and abs(shifted['best']['c'] - 5) < 0.05


def test_gwo_resume_equals_uninterrupted(tmp_path):
    state, calls = tmp_path/'gwo.json', []
    def dies(p):
        if len(calls) == 11: raise KeyboardInterrupt  # interrupted in the middle of the third pack
        calls.append(p); return SPHERE(p)
    with pytest.raises(KeyboardInterrupt): gwo_minimize(dies, BOX, budget=25, n_wolves=4, seed=7, state_path=state)
    assert len(json.loads(state.read_text())['evaluations']) == 11
    again = []
    resumed = gwo_minimize(lambda p: again.append(p) or SPHERE(p), BOX, budget=25, n_wolves=4, seed=7, state_path=state)
    assert len(again) == 14  # only the missing evaluations
    assert resumed == gwo_minimize(SPHERE, BOX, budget=25, n_wolves=4, seed=7)
    assert resumed != gwo_minimize(SPHERE, BOX, budget=25, n_wolves=4, seed=8)  # the seed matters
    # a finished state file returns the same result without evaluating anything
    assert gwo_minimize(lambda p: 1 / 0, BOX, budget=25, n_wolves=4, seed=7, state_path=state) == resumed
    with pytest.raises(ValueError, match='budget: 25 → 26'):
        gwo_minimize(SPHERE, BOX, budget=26, n_wolves=4, seed=7, state_path=state)


def test_gwo_log_scale_stays_in_bounds():
    seen = []
    gwo_minimize(lambda p: seen.append(p['lr']) or -math.log10(p['lr']), dict(lr=(1e-5, 1e-3)), 40, 5, log_scale=['lr'])
    assert all(1e-5 * (1 - 1e-9) <= v <= 1e-3 * (1 + 1e-9) for v in seen)
    assert min(seen) < 1.1e-5  # pushed to the lower bound (the objective decreases with lr)


# ---------------------------------------------------------------- Grad-CAM + FGSM (Table 7)
from torchvision import tv_tensors
from ssfer_lib.evaluate import evaluate
from ssfer_lib.robustness import (Normalized, attack_accuracy, fgsm, gradcam_maps, input_gradient, pixel_view,
                                  region_masks, vit_reshape_transform)
from ssfer_lib.transforms import eval_view


def tiny_vit(img_size=16, **kw):
    import timm
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=img_size, patch_size=4, depth=2,
                             embed_dim=48, num_heads=3, **kw).eval()


@pytest.mark.parametrize('img_size,reg_tokens', [(16, 0), (24, 2)])
def test_reshape_transform_matches_patch_grid(img_size, reg_tokens):
    vit = tiny_vit(img_size, reg_tokens=reg_tokens)
    g = img_size // 4
    tokens = vit.forward_features(torch.rand(2, 3, img_size, img_size))  # [B, prefix + g², C]
    assert tokens.shape[1] == 1 + reg_tokens + g * g
    m = vit_reshape_transform(Normalized(vit))(tokens)
    assert m.shape == (2, 48, g, g)
    assert torch.equal(m[:, :, 1, 2], tokens[:, 1 + reg_tokens + 1 * g + 2])  # row-major patch order
    assert gradcam_maps(Normalized(vit), torch.rand(2, 3, img_size, img_size)).shape == (2, img_size, img_size)


def test_masks_partition_the_image():
    cam = gradcam_maps(Normalized(tiny_vit()), torch.rand(4, 3, 16, 16))
    m = region_masks(cam, 0.3)
    assert m['focused'].shape == m['unfocused'].shape == (4, 1, 16, 16)
    assert ((m['focused'].int() + m['unfocused'].int()) == 1).all()  # each pixel in exactly one region
    assert torch.equal(m['focused'][:, 0], torch.as_tensor(cam) > 0.3)


def test_fgsm_changes_only_the_region():
    vit, x, y = Normalized(tiny_vit()), torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool); mask[0, :, 3:9, 2:7] = True; mask[1, :, 10:, :] = True
    g = input_gradient(vit, x, y)
    adv = fgsm(x, g, 0.04, mask)
    diff = adv != x
    assert not (diff & ~mask).any()  # outside the region: bit-identical
    free = mask.expand_as(x) & (g != 0) & (x > 0.04) & (x < 0.96)
    assert free.sum() > 100 and torch.allclose((adv - x)[free], 0.04 * g.sign()[free], atol=1e-6)
    assert torch.equal(fgsm(x, g, 0.0, mask), x)
    whole = fgsm(x, g, 0.04)  # no mask: every pixel moves (or is clipped)
    assert (whole != x).float().mean() > 0.9


def test_fgsm_eps0_keeps_accuracy():
    vit = tiny_vit()
    gen = torch.Generator().manual_seed(1)
    imgs = [tv_tensors.Image(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=gen)) for _ in range(10)]
    y = torch.arange(10) % 3
    pix = [dict(image=torch.stack([pixel_view(16)(i) for i in imgs]), label=y)]
    nrm = [dict(image=torch.stack([eval_view(16)(i) for i in imgs]), label=y)]
    r = attack_accuracy(Normalized(vit), pix, epsilons=(0.0, 0.5))
    clean = evaluate(vit, nrm, 3)['acc']
    assert r['acc']['focused'][0.0] == r['acc']['unfocused'][0.0] == clean


# ---------------------------------------------------------------- k-fold, Adience, label noise, GWO of stage 2 (Tables 5, 8, 9, 16)
from ssfer_lib.analysis import (GWOConfig, KFoldConfig, NoiseConfig, RobustnessConfig, analysis_config, gwo_finetune_lrs,
                                kfold_experiment, label_noise_experiment, label_noise_summary, robustness_experiment)
from ssfer_lib.config import update_config
from ssfer_lib.core import read_metrics


def test_kfold_one_number_per_fold(tmp_path):
    "A baseline (timm's tiny test_resnet) on all 5 folds: one accuracy per fold, each fold held out exactly once."
    m = kfold_experiment(analysis_config(KFoldConfig, 'test', method='test_resnet', box_root=str(tmp_path/'boxes')), tmp_path/'run')
    assert len(m['fold_acc']) == 5 == len(m['folds'])
    assert m['fold_acc'] == [read_metrics(tmp_path/'run'/f'fold{f}')['metrics']['test/acc'] for f in range(1, 6)]
    assert m['mean_acc'] == pytest.approx(sum(m['fold_acc']) / 5)
    assert sum(r['n_eval'] for r in m['folds']) == 70 and all(r['n_train'] + r['n_eval'] == 70 for r in m['folds'])
    assert all(r['n_labeled'] == r['n_train'] == 56 for r in m['folds'])  # 100 % of the training part
    assert read_metrics(tmp_path/'run'/'fold2')['metrics']['n_test'] == 14
    with pytest.raises(KeyError, match='timm model'):
        kfold_experiment(analysis_config(KFoldConfig, 'test', method='resnet5O'), tmp_path/'bad')
    assert not (tmp_path/'bad').exists()


@pytest.mark.slow
def test_kfold_ssfer_one_number_per_fold(tmp_path):
    m = kfold_experiment(analysis_config(KFoldConfig, 'test', split_value=0.25, box_root=str(tmp_path/'boxes')), tmp_path/'run')
    assert len(m['fold_acc']) == 5 and m['method'] == 'SSFER-25%'
    assert m['fold_acc'] == [read_metrics(tmp_path/'run'/f'fold{f}'/'semi')['metrics']['test/acc'] for f in range(1, 6)]
    for f, r in enumerate(m['folds'], 1):  # stage 2 trained on the labeled part only; stage 3 also saw the rest
        s2, s3 = (read_metrics(tmp_path/'run'/f'fold{f}'/s)['metrics'] for s in ('finetune', 'semi'))
        assert s2['n_labeled'] == s3['n_labeled'] == r['n_labeled'] < r['n_train'] / 2
        assert s3['n_labeled'] + s3['n_unlabeled'] == r['n_train'] and s3['n_test'] == r['n_eval']


def test_kfold_resumes_finished_folds(tmp_path):
    cfg = analysis_config(KFoldConfig, 'test', method='test_resnet', folds=(1, 3), box_root=str(tmp_path/'boxes'))
    first = kfold_experiment(cfg, tmp_path/'a')
    assert list((tmp_path/'a').rglob('*.pt')) == []  # finished folds drop their checkpoints by default
    (tmp_path/'a'/'metrics.json').unlink()  # as if interrupted after both folds finished
    mtime = (tmp_path/'a'/'fold1'/'metrics.json').stat().st_mtime_ns
    again = kfold_experiment(cfg, tmp_path/'a')
    assert again['fold_acc'] == first['fold_acc'] and (tmp_path/'a'/'fold1'/'metrics.json').stat().st_mtime_ns == mtime
    kept = kfold_experiment(update_config(cfg, dict(folds=(2,), keep_checkpoints=True)), tmp_path/'b')
    assert (tmp_path/'b'/'fold2'/'last.pt').exists() and len(kept['fold_acc']) == 1


def test_kfold_adience_folds(tmp_path, monkeypatch):
    from test_data import fake_adience
    (tmp_path/'adience').mkdir(); root = fake_adience(tmp_path/'adience')
    monkeypatch.chdir(tmp_path)  # the image cache goes to ./outputs/cache
    m = kfold_experiment(analysis_config(KFoldConfig, 'test', data='adience', data_root=str(root), task='age', method='test_resnet'),
                         tmp_path/'age')
    assert len(m['fold_acc']) == 5 and m['task'] == 'age' and len(m['classes']) == 8
    assert [r['n_eval'] for r in m['folds']] == [8] * 5 and [r['n_train'] for r in m['folds']] == [32] * 5  # Adience's own folds
    g = kfold_experiment(analysis_config(KFoldConfig, 'test', data='adience', data_root=str(root), task='gender', folds=(4,),
                                         split_value=0.5), tmp_path/'gender')
    assert g['classes'] == ['female', 'male'] and g['folds'][0]['n_eval'] == 9 and g['folds'][0]['n_labeled'] == 18
    with pytest.raises(ValueError, match='5 folds'):
        kfold_experiment(analysis_config(KFoldConfig, 'test', data='adience', data_root=str(root), k=4, method='test_resnet'), tmp_path/'k4')


def test_label_noise_summary_on_fake_metrics():
    runs = {0.2: {'test/acc': 0.70}, 0.0: {'test/acc': 0.80}, 0.3: {'test/acc': 0.65}, 0.1: {'test/acc': 0.78}}
    s = label_noise_summary(runs)
    assert s['rates'] == [0.0, 0.1, 0.2, 0.3]
    assert s['drop'] == pytest.approx({0.0: 0, 0.1: 0.02, 0.2: 0.10, 0.3: 0.15}) and s['decline'] == pytest.approx(0.15)
    assert label_noise_summary({0: {'best_test/test/acc': 0.9}, 0.1: {'best_test/test/acc': 0.5}}, 'best_test/test/acc')['decline'] == pytest.approx(0.4)
    with pytest.raises(KeyError, match='noise-free'): label_noise_summary({0.1: {'test/acc': 0.5}})


@pytest.mark.slow
def test_label_noise_experiment_trains_on_flipped_labels(tmp_path):
    m = label_noise_experiment(analysis_config(NoiseConfig, 'test', noise=0.3, split_value=0.5, box_root=str(tmp_path/'b')), tmp_path/'r')
    assert m['noise'] == 0.3 and 0 < m['n_wrong_labels'] < m['n_labeled']
    stage2 = read_metrics(tmp_path/'r'/'ssfer'/'finetune')['metrics']
    assert stage2['n_labeled'] == m['n_labeled'] and m['test/acc'] == read_metrics(tmp_path/'r'/'ssfer'/'semi')['metrics']['test/acc']


@pytest.mark.slow
def test_gwo_search_never_reads_the_test_set(tmp_path):
    m = gwo_finetune_lrs(analysis_config(GWOConfig, 'test', split_value=0.5, budget=4, n_wolves=2, box_root=str(tmp_path/'b')),
                         tmp_path/'g')
    state = json.loads((tmp_path/'g'/'gwo_state.json').read_text())
    runs = sorted((tmp_path/'g'/'search').iterdir())
    assert len(runs) == m['n_evals'] == 4
    by_lrs = {}
    for r in runs:
        mm = read_metrics(r)['metrics']
        assert mm['selection'] == 'val_selected' and mm['n_val'] > 0
        cfg = read_metrics(r)['provenance']['config']
        by_lrs[(cfg['lr'], cfg['min_lr'], cfg['warmup_lr'])] = mm['val_selected/val/acc']
    # every objective value is the validation accuracy of its run (not a test number)
    for e in state['evaluations']:
        assert e['value'] == by_lrs[(e['params']['lr'], e['params']['min_lr'], e['params']['warmup_lr'])]
    final = read_metrics(tmp_path/'g'/'final')
    assert {k: final['provenance']['config'][k] for k in ('lr', 'min_lr', 'warmup_lr')} == m['best_lrs']
    assert m['gwo/test/acc'] == final['metrics']['test/acc'] and 'preset/test/acc' in m


@pytest.mark.slow
def test_robustness_experiment_eps0_is_clean(tmp_path):
    m = robustness_experiment(analysis_config(RobustnessConfig, 'test', box_root=str(tmp_path/'b')), tmp_path/'r')
    assert m['acc']['focused']['0'] == m['acc']['unfocused']['0'] == m['clean_acc']
    assert (tmp_path/'r'/'attack.png').exists() and (tmp_path/'r'/'accuracy_vs_eps.png').exists()
    # the same model attacked again from its checkpoint gives the same numbers
    ck = tmp_path/'r'/'model'/'best.pt'
    again = robustness_experiment(analysis_config(RobustnessConfig, 'test', checkpoint=str(ck), box_root=str(tmp_path/'b')), tmp_path/'r2')
    assert again['acc'] == m['acc'] and again['network'] == 'model'
