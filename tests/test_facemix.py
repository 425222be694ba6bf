"""FaceMix: κ metrics, the four losses against hand values, L_i/L_j on the original images, the mixing switch,
the benchmark and the fine-tuning stage end to end on the test-size preset."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssfer_lib.facemix import KAPPA_METRICS, FaceMixTask, MixupTask, facemix_batch, facemix_loss, pair_indices, soft_cross_entropy
from ssfer_lib.bench import bench_facemix
from ssfer_lib.finetune import MIX_TASKS, finetune, finetune_config
from ssfer_lib.vit import create_vit, vit_size

torch.set_num_threads(1)
LN2 = math.log(2)


# ---- κ ----

def test_kappa_iou_values():
    a = torch.tensor([[0., 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [2, 2, 6, 8]])
    b = torch.tensor([[0., 0, 10, 10], [10, 0, 20, 10], [5, 0, 15, 10], [4, 0, 10, 4]])
    # row 3: inter (4..6)x(2..4) = 2*2 = 4; areas 4*6 = 24 and 6*4 = 24; IoU 4/44
    torch.testing.assert_close(KAPPA_METRICS['iou'](a, b), torch.tensor([0., 1., 1 - 50 / 150, 1 - 4 / 44]))


@pytest.mark.parametrize('name', ['psnr', 'ssim', 'fsim'])
def test_pixel_kappas_in_unit_interval(name):
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    box = torch.zeros(4, 4)
    torch.testing.assert_close(KAPPA_METRICS[name](box, box, u, u), torch.zeros(4), atol=1e-4, rtol=0)
    k_far, k_near = KAPPA_METRICS[name](box, box, u, v), KAPPA_METRICS[name](box, box, u, (u + 0.05 * (v - u)))
    assert ((k_far > 0) & (k_far <= 1)).all() and (k_near < k_far).all(), (k_near, k_far)


# ---- losses ----

def test_losses_hand_values_pure():
    lv, li, lj, k = torch.tensor([1., 2]), torch.tensor([.5, 1.5]), torch.tensor([1.5, .5]), torch.tensor([.25, .5])
    for kind, want in dict(L1=2.875, L2=2.75, L3=2.625, L4=2.25).items():
        torch.testing.assert_close(facemix_loss(lv, li, lj, k, kind), torch.tensor(want))


def _fixed_logits_model(p=(.5, .25, .25)):
    lin = nn.Linear(3, 3); nn.init.zeros_(lin.weight)
    with torch.no_grad(): lin.bias.copy_(torch.tensor(p).log())
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_losses_hand_values_on_two_images(seed):
    """Two equal images, logits log(½,¼,¼), labels 0 and 1: CE ln2 and 2ln2; mean L_v = 1.5 ln2 for any λ (the two
    mixed targets sum to y0 + y1); boxes with IoU ¾ give κ = ¼ and L_i + L_j = 3 ln2 for both pairs."""
    batch = dict(image=torch.zeros(2, 3, 4, 4), label=torch.tensor([0, 1]), box=torch.tensor([[0., 0, 4, 1], [0, 0, 3, 1]]))
    want = dict(L1=.75 * 1.5 + 3, L2=1.5 + .75 * 3, L3=.25 * 1.5 + 3, L4=1.5 + .25 * 3)
    for kind, w in want.items():
        out = FaceMixTask(_fixed_logits_model(), 3, loss=kind, label_smoothing=0.0, seed=seed)(batch)
        torch.testing.assert_close(out['loss'], torch.tensor(w * LN2))
        torch.testing.assert_close(out['kappa'], torch.tensor(0.25))


# ---- the official code's bug: L_i and L_j computed on the mixed batch ----

class _Recorder(nn.Module):
    def __init__(self):
        super().__init__(); self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)); self.inputs = []
    def forward(self, x): self.inputs.append(x.detach().clone()); return self.net(x)


def test_li_lj_use_originals():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8); y = torch.tensor([0, 1, 2, 3, 0, 1])
    box = torch.tensor([[0., 0, 8, 8], [1, 1, 7, 7], [0, 0, 4, 4], [4, 4, 8, 8], [2, 0, 8, 6], [0, 2, 6, 8]])
    batch = dict(image=x, label=y, box=box); x0 = x.clone()
    task = FaceMixTask(_Recorder(), 4, label_smoothing=0.1, seed=3)
    m = facemix_batch(batch, task.generator(), 4, smoothing=0.1)  # the draw the task makes next
    out = task(batch)
    assert torch.equal(batch['image'], x0), 'FaceMix modified the batch in place'
    seen = task.model.inputs[-1]
    assert len(task.model.inputs) == 1 and seen.shape[0] == 12, 'expected one forward over [originals; mixed]'
    assert torch.equal(seen[:6], x0)
    with torch.no_grad():
        ce_orig = F.cross_entropy(task.model.net(x0), y, reduction='none')
        lv = soft_cross_entropy(task.model.net(m['image']), m['target'])
        ce_mixed = F.cross_entropy(task.model.net(m['image']), y, reduction='none')
    right = (lv + m['kappa'] * (ce_orig[m['i']] + ce_orig[m['j']])).mean()
    buggy = (lv + m['kappa'] * (ce_mixed[m['i']] + ce_mixed[m['j']])).mean()
    torch.testing.assert_close(out['loss'], right)
    assert not torch.isclose(out['loss'], buggy), 'L_i/L_j computed on the mixed images (the official bug)'
    # κ comes from the boxes of the two images being mixed
    torch.testing.assert_close(out['kappa'], m['kappa'].mean())


# ---- pairing, determinism, resume state, gradients ----

def test_pairing_odd_and_even():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 32):
        i, j = pair_indices(n, g)
        assert sorted(i.tolist()) == list(range(n)) and sorted(j.tolist()) == list(range(n))
        assert n == 1 or (i != j).all()


def test_facemix_deterministic_and_calls_saved():
    batch = dict(image=torch.randn(5, 3, 8, 8), label=torch.tensor([0, 1, 2, 3, 0]), box=torch.rand(5, 4) * 4 + torch.tensor([0, 0, 4, 4]))
    torch.manual_seed(0); a = FaceMixTask(_Recorder(), 4, seed=1)
    b = FaceMixTask(_Recorder(), 4, seed=1); b.load_state_dict(a.state_dict())
    for _ in range(3): torch.testing.assert_close(a(batch)['loss'], b(batch)['loss'])
    assert int(a.state_dict()['calls']) == 3
    c = FaceMixTask(_Recorder(), 4, seed=1); c.load_state_dict(a.state_dict())  # a resumed task continues the stream
    torch.testing.assert_close(c(batch)['loss'], a(batch)['loss'])


@pytest.mark.parametrize('mix', ['none', 'mixup', 'cutmix', 'facemix'])
def test_every_parameter_gets_a_gradient(mix):
    torch.manual_seed(0)
    vit = create_vit(**vit_size('test'), num_classes=7, drop_path_rate=0.0)
    task = MIX_TASKS[mix](vit, 7)
    batch = dict(image=torch.randn(5, 3, 16, 16), label=torch.tensor([0, 1, 2, 3, 4]),
                 box=torch.tensor([[0., 0, 16, 16], [2, 2, 14, 14], [0, 0, 8, 8], [4, 4, 16, 16], [1, 0, 15, 12]]))
    x0 = batch['image'].clone()
    task(batch)['loss'].backward()
    assert torch.equal(batch['image'], x0)
    assert [n for n, p in vit.named_parameters() if p.requires_grad and p.grad is None] == []



@pytest.mark.parametrize('mix', ['none', 'mixup', 'cutmix', 'facemix', 'mscl', 'facemix+mscl'])
def test_mix_factory_refuses_an_unknown_option(mix):
    "A misspelled option is an error naming it, not a silently kept default: each factory takes exactly its options."
    with pytest.raises(TypeError, match="unexpected keyword argument 'kapa'"):
        MIX_TASKS[mix](create_vit(**vit_size('test'), num_classes=7), 7, kapa='ssim')


@pytest.mark.parametrize('mix', ['mixup', 'cutmix', 'facemix'])
def test_stage_seed_reaches_the_mixing_stream(mix):
    "The run's seed picks the λ/mode/box stream of every mixing task (the old Mixup/CutMix factories dropped it)."
    from ssfer_lib.finetune import finetune_task
    task = finetune_task(finetune_config('test', mix=mix, seed=3), create_vit(**vit_size('test'), num_classes=7), 7)
    assert task.seed == 3

def test_mixup_task_odd_batch_keeps_last_unmixed():
    rec = _Recorder(); task = MixupTask(rec, 4, label_smoothing=0.0)
    x = torch.randn(5, 3, 8, 8); x0 = x.clone()
    task(dict(image=x, label=torch.tensor([0, 1, 2, 3, 0])))
    assert torch.equal(x, x0) and torch.equal(rec.inputs[-1][-1], x0[-1])


# ---- benchmark ----

def test_bench_writes_json(tmp_path):
    res = bench_facemix(tmp_path/'facemix.json', size='test', batch_size=4, steps=2, warmup=1)
    on_disk = json.loads((tmp_path/'facemix.json').read_text())
    assert set(on_disk['cpu_ms_per_step']) == {'facemix', 'plain_2b', 'mixup_b', 'detect_haar', 'live_haar'}
    assert set(on_disk['wall_ms_per_step']) == set(on_disk['cpu_ms_per_step'])
    assert on_disk['a_facemix_over_plain_2b'] == pytest.approx(res['a_facemix_over_plain_2b'])
    assert 'haar' in on_disk['c_live_over_cached'] and on_disk['setup']['batch_size'] == 4


# ---- the fine-tuning stage ----

@pytest.mark.slow
@pytest.mark.parametrize('mix', ['none', 'mixup', 'cutmix', 'facemix'])
def test_finetune_each_method(mix, tmp_path):
    cfg = finetune_config('test', mix=mix, box_root=str(tmp_path/'boxes'))
    m = finetune(cfg, tmp_path/'run', progress=False)
    assert m['epochs'] == 2 and 0 <= m['test/acc'] <= 1 and len(m['test/confusion']) == 7
    for f in ('best.pt', 'last.pt', 'history.json', 'confusion.png', 'metrics.json'): assert (tmp_path/'run'/f).exists(), f
    meta = json.loads((tmp_path/'run'/'metrics.json').read_text())
    assert meta['provenance']['config']['mix'] == mix and meta['provenance']['finished']
    with pytest.raises(FileExistsError, match='already holds a finished run'): finetune(cfg, tmp_path/'run', progress=False)


def test_finetune_haar_boxes_cached(tmp_path):
    cfg = finetune_config('test', box_provider='haar', box_root=str(tmp_path/'boxes'), epochs=2)
    from ssfer_lib.finetune import finetune_data
    d1 = finetune_data(cfg); d2 = finetune_data(cfg)
    assert not d1['boxes']['cached'] and d2['boxes']['cached'] and d1['boxes']['path'] == d2['boxes']['path']
    assert 0 <= d1['boxes']['n_fallback'] <= d1['boxes']['n']
