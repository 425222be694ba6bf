"""MIMIC's mix-supervised contrastive loss (ssfer_lib.mscl): masks, loss values, gradients, and SupCon equivalence."""
import dataclasses
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ssfer_lib.facemix import mix_flip
from ssfer_lib.mscl import MSCLTask, MixedViews, contrastive_loss, mscl_loss, multiview_batch, positive_mask, projection_head, scl_loss, sscl_loss
from ssfer_lib.mimic import mscl_config, build_mscl_task
from ssfer_lib.vit import create_vit, vit_size

torch.set_num_threads(1)

# A hand-built batch of 4 samples, 2 classes. ∞-norm distance to one-hot(y_i) = 1 − soft[j, y_i]:
# anchors of class 0 see (0, .3, .6, 1); anchors of class 1 see (1, .7, .4, 0).
SOFT = torch.tensor([[1., 0.], [.7, .3], [.4, .6], [0., 1.]])
Y = torch.tensor([0, 0, 1, 1])
HAND = {0.0: [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]],
        0.5: [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]],
        1.0: [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]}


@pytest.mark.parametrize('t', [0.0, 0.5, 1.0])
def test_positive_mask_hand_derived(t):
    assert torch.equal(positive_mask(SOFT, Y, t=t), torch.tensor(HAND[t], dtype=torch.bool))


def test_infinity_norm_means_anchor_class_share():
    g = torch.Generator().manual_seed(0)
    soft = torch.distributions.Dirichlet(torch.ones(5)).sample((12,))
    y = torch.randint(5, (12,), generator=g)
    for t in (0.1, 0.3, 0.5, 0.8):
        share = soft[:, y].T >= 1 - t - 1e-6  # [anchor, candidate]: candidate's weight on the anchor class
        assert torch.equal(positive_mask(soft, y, t=t), share & ~torch.eye(12, dtype=torch.bool))


def numpy_loss(z, pos, tau):
    "Eq. 11 written out with loops (mean over anchors that have a positive)."
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    out = []
    for i in range(len(z)):
        P = [p for p in range(len(z)) if pos[i, p] and p != i]
        if not P: continue
        denom = sum(math.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
        out.append(-np.mean([math.log(math.exp(z[i] @ z[p] / tau) / denom) for p in P]))
    return float(np.mean(out)) if out else 0.0


@pytest.mark.parametrize('t', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('tau', [0.07, 0.5])
def test_loss_equals_numpy(t, tau):
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    got = mscl_loss(z, SOFT, Y, t=t, tau=tau)
    want = numpy_loss(z.double().numpy(), positive_mask(SOFT, Y, t=t).numpy(), tau)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_finite_when_an_anchor_has_no_positive():
    z = torch.randn(4, 6, requires_grad=True)
    loss = mscl_loss(z, SOFT, Y, t=0.0)  # anchors 0 and 3 have no positive
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad[[0, 3]].abs().sum() > 0  # still negatives/positives of the others
    empty = contrastive_loss(torch.randn(4, 6), torch.zeros(4, 4, dtype=torch.bool))
    assert empty.item() == 0.0


class KhoslaSupConLoss(torch.nn.Module):
    "Khosla et al.'s reference SupConLoss (HobbitLong/SupContrast losses.py, contrast_mode='all'), transcribed."
    def __init__(self, temperature=0.07, base_temperature=0.07):
        super().__init__(); self.temperature, self.base_temperature = temperature, base_temperature

    def forward(self, features, labels):  # features [bsz, n_views, dim], L2-normalized
        batch_size = features.shape[0]
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).float()
        contrast_count = features.shape[1]
        contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
        anchor_feature, anchor_count = contrast_feature, contrast_count
        anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), self.temperature)
        logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
        logits = anchor_dot_contrast - logits_max.detach()
        mask = mask.repeat(anchor_count, contrast_count)
        logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
        mask = mask * logits_mask
        exp_logits = torch.exp(logits) * logits_mask
        log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
        mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
        loss = -(self.temperature / self.base_temperature) * mean_log_prob_pos
        return loss.view(anchor_count, batch_size).mean()


@pytest.mark.parametrize('tau', [0.07, 0.2])
def test_scl_without_mixing_is_supcon(tau):
    g = torch.Generator().manual_seed(2)
    B, C = 8, 3
    y = torch.randint(C, (B,), generator=g)
    f = F.normalize(torch.randn(B, 2, 16, generator=g), dim=2)  # [bsz, n_views, dim]
    z, labels = torch.cat([f[:, 0], f[:, 1]]), y.repeat(2)  # our [v1; v2] order
    ref = KhoslaSupConLoss(tau, tau)(f, y)
    assert scl_loss(z, labels, tau).item() == pytest.approx(ref.item(), rel=1e-5)
    # Khosla eq. 2 (L_out^sup) is the sum over the 2B anchors
    assert scl_loss(z, labels, tau, reduction='sum').item() == pytest.approx(2 * B * ref.item(), rel=1e-5)
    # MSCL with nothing mixed (mix_flip mode 'none') and t < 1/2 is the same loss
    _, soft, lam = mix_flip(torch.zeros(2 * B, 3, 4, 4), labels, C, 1.0, 'none')
    assert lam == 1.0
    assert mscl_loss(z, soft, labels, t=0.0, tau=tau).item() == pytest.approx(ref.item(), rel=1e-5)
    # self-supervised InfoNCE: SupCon with every image its own class
    ref_ss = KhoslaSupConLoss(tau, tau)(f, torch.arange(B))
    assert sscl_loss(z, tau).item() == pytest.approx(ref_ss.item(), rel=1e-5)


def _views(B=4, size=16, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(C, (B,), generator=g)
    return dict(weak=dict(image=torch.randn(B, 3, size, size, generator=g), label=y, index=torch.arange(B)),
                strong=dict(image=torch.randn(B, 3, size, size, generator=g), label=y, index=torch.arange(B)))


@pytest.mark.parametrize('proj', ['none', 'linear', 'dense'])
@pytest.mark.parametrize('pool', ['avg', 'token'])
def test_gradients_reach_encoder(proj, pool):
    torch.manual_seed(0)
    model = create_vit(num_classes=3, global_pool=pool, **vit_size('test'))
    task = MSCLTask(MixedViews(model, 3, seed=0), projection_head(proj, model.num_features, 16), lam=0.1)
    out = task(_views())
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_contrastive_term_alone_reaches_encoder():
    "The contrastive gradient on its own (not only through the classifier) reaches the patch embedding."
    torch.manual_seed(0)
    model = create_vit(num_classes=3, global_pool='avg', **vit_size('test'))
    base, proj = MixedViews(model, 3, seed=0), projection_head('dense', model.num_features, 16)
    out = base(_views())
    mscl_loss(proj(out['features']), out['soft_labels'], out['anchor_labels']).backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None  # the classifier is not part of L_mscl


def test_task_is_deterministic_and_resumable():
    cfg = mscl_config('test', num_classes=3, proj_dim=16, drop_path_rate=0.0)
    torch.manual_seed(0); a = build_mscl_task(cfg)
    torch.manual_seed(0); b = build_mscl_task(cfg)
    batch = _views()
    la = [a(batch)['loss'].item() for _ in range(3)]
    b.load_state_dict(a.state_dict())  # includes the call counter
    b.base.calls.fill_(2)
    assert b(batch)['loss'].item() == pytest.approx(la[2], rel=1e-6)


def test_multiview_batch_rejects_mismatched_views():
    v = _views()
    bad = dict(v['strong'], index=torch.arange(4).flip(0))
    with pytest.raises(ValueError, match='same images'):
        multiview_batch(v['weak'], bad)


def test_align_faces_moves_the_box_with_the_crop():
    from ssfer_lib.datasets import stage_datasets
    from ssfer_lib.mimic import align_faces
    d = stage_datasets(size=64, n_train=40, n_test=4, pool=None)
    a = align_faces(d['train'], 32, scale=(1.4, 1.4), shift=0.0)
    for j in range(5):
        b = a.boxes[j]
        side = max(b[2] - b[0], b[3] - b[1])
        assert side == pytest.approx(32 / 1.4, abs=0.6)  # the face box is 1/1.4 of the crop side ...
        assert ((b[:2] + b[2:]) / 2).tolist() == pytest.approx([16, 16], abs=0.6)  # ... and centred without shift


def test_facemix_views_keeps_facemix_loss():
    from ssfer_lib.facemix import FaceMixTask
    from ssfer_lib.mscl import FaceMixViews
    torch.manual_seed(0)
    m = create_vit(num_classes=3, global_pool='avg', **vit_size('test')).eval()
    b = dict(image=torch.randn(6, 3, 16, 16), label=torch.tensor([0, 1, 2, 0, 1, 2]),
             box=torch.tensor([[0., 0, 8, 8], [2, 2, 10, 10], [4, 4, 16, 16], [0, 0, 16, 16], [1, 1, 9, 9], [3, 0, 12, 12]]))
    ours, theirs = FaceMixViews(m, 3, seed=4).eval()(b), FaceMixTask(m, 3, seed=4).eval()(b)
    assert ours['loss'].item() == pytest.approx(theirs['loss'].item(), rel=1e-6)
    assert ours['features'].shape == (12, m.num_features)
    assert torch.allclose(ours['soft_labels'].sum(1), torch.ones(12))



def test_mimic_and_stage2_share_one_facemix_mscl(monkeypatch):
    "MIMIC's `facemix+mscl` and stage 2's menu entry are one factory (34_mscl), which MIMIC gives its config's values."
    from ssfer_lib import mimic
    from ssfer_lib.finetune import MIX_TASKS
    from ssfer_lib.mscl import facemix_mscl_task
    assert MIX_TASKS['facemix+mscl'] is facemix_mscl_task
    calls = []
    monkeypatch.setattr(mimic, 'facemix_mscl_task', lambda model, num_classes, **kw: calls.append(kw) or 'built by the factory')
    cfg = mscl_config('test', method='facemix+mscl', mscl_lam=0.3, facemix_loss='L2', mscl_norm=1.0, facemix_alpha=0.5)
    assert build_mscl_task(cfg, torch.nn.Identity()) == 'built by the factory'
    assert {k: calls[0][k] for k in ('alpha', 'facemix_loss', 'mscl_lam', 'mscl_norm', 'proj_dim')} == dict(
        alpha=0.5, facemix_loss='L2', mscl_lam=0.3, mscl_norm=1.0, proj_dim=16)


def test_stage2_options_reach_the_mscl_tasks():
    "Every MSCL option of the fine-tuning config reaches its task (the factories take them by the config's names)."
    from ssfer_lib.finetune import finetune_config, finetune_task
    cfg = finetune_config('test', mscl_lam=0.3, mscl_t=0.2, mscl_tau=0.5, proj='linear', proj_dim=8, facemix_loss='L1', kappa='psnr')
    for mix in ('mscl', 'facemix+mscl'):
        task = finetune_task(dataclasses.replace(cfg, mix=mix), create_vit(num_classes=7, **vit_size('test')), 7)
        assert (task.lam, task.t, task.tau, task.proj.out_features) == (0.3, 0.2, 0.5, 8), mix
    assert (task.base.loss, task.base.kappa) == ('L1', 'psnr')

@pytest.mark.slow
def test_ddp_finetune_facemix_mscl_two_cpu_processes(tmp_path):
    """SSFER stage 2 with the MSCL term under torchrun: each process trains on its shard, rank 0 alone writes."""
    import json, os, signal, subprocess, sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(root))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(root/'tests'/'ddp_finetune.py'), str(tmp_path)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         start_new_session=True)
    try: _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.communicate(); pytest.fail('torchrun timed out')
    assert p.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in range(2))
    assert r0['world'] == r1['world'] == 2 and 'test/acc' in r0['keys'] and r1['keys'] == []
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())['metrics']
    hist = json.loads((tmp_path/'run'/'history.json').read_text())
    # each process saw its half of the labeled set: steps per epoch = ⌊(n/2) / batch⌋, not ⌊n / batch⌋
    assert hist[0]['step'] == (m['n_labeled'] // 2) // 8 and hist[0]['train/mscl'] > 0
