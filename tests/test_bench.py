"""Speed work: `fit`'s `eval_every` and its once-per-epoch scalar sync, the per-run timing model, and every benchmark at
toy size (seconds)."""
import json
import math

import pytest
import torch
from torch import nn

from ssfer_lib.core import load_weights
from ssfer_lib.train import Supervised, build_optimizer, fit

torch.set_num_threads(1)


def _loader(n=48, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.arange(n) % 3
    return [dict(image=x[i:i + b], label=y[i:i + b]) for i in range(0, n, b)]


class Recording(Supervised):
    "Records every logged scalar the way the old `fit` summed it: `.float().item()` per step, Python float sums."
    def __init__(self, model):
        super().__init__(model); self.seen = []
    def forward(self, batch):
        out = super().forward(batch)
        if self.training: self.seen.append({k: v.detach().float().item() for k, v in out.items()})
        return out


def _task():
    torch.manual_seed(0)
    return Recording(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))


def test_logged_scalars_equal_per_step_item_sums():
    t = _task(); opt = build_optimizer(t.model, lr=0.05)
    hist = fit(t, _loader(), optimizer=opt, epochs=3, device='cpu', progress=False)
    per_epoch = len(_loader())
    for e, h in enumerate(hist):
        steps = t.seen[e * per_epoch:(e + 1) * per_epoch]
        for k in ('loss', 'acc'):
            ref = 0.0
            for s in steps: ref += s[k]  # the old accumulation, in this order
            assert h[f'train/{k}'] == ref / per_epoch  # bit-identical, not only close
            assert isinstance(h[f'train/{k}'], float)
    json.dumps(hist)  # plain floats: the history stays JSON


@pytest.mark.parametrize('epochs,every,expected', [(5, 2, [2, 4, 5]), (4, 2, [2, 4]), (3, 1, [1, 2, 3]), (3, 5, [3])])
def test_eval_every_epochs(epochs, every, expected):
    calls = []
    t = _task(); opt = build_optimizer(t.model, lr=0.05)
    hist = fit(t, _loader(), optimizer=opt, epochs=epochs, device='cpu', progress=False, eval_every=every,
               eval_fn=lambda task: calls.append(1) or {'test/acc': 0.5})
    assert [h['epoch'] for h in hist if 'test/acc' in h] == expected  # the last epoch is always evaluated
    assert len(calls) == len(expected)


def test_eval_every_best_selection_sees_evaluated_epochs_only(tmp_path):
    accs = iter([0.3, 0.8, 0.6])  # returned at epochs 2, 4, 5
    t = _task(); opt = build_optimizer(t.model, lr=0.05)
    hist = fit(t, _loader(), optimizer=opt, epochs=5, device='cpu', progress=False, eval_every=2, ckpt_dir=tmp_path,
               select='test/acc', eval_fn=lambda task: {'test/acc': next(accs)})
    assert load_weights(tmp_path/'best.pt')['epoch'] == 4
    assert json.loads((tmp_path/'history.json').read_text()) == hist


def test_eval_every_rejects_bad_values():
    t = _task(); opt = build_optimizer(t.model, lr=0.05)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match='eval_every'):
            fit(t, _loader(), optimizer=opt, epochs=1, device='cpu', progress=False, eval_every=bad)


def test_rule_metrics_skips_unevaluated_epochs():
    from ssfer_lib.finetune import rule_metrics
    hist = [dict(epoch=1, step=1), dict(epoch=2, step=2, **{'test/acc': 0.7}), dict(epoch=3, step=3, **{'test/acc': 0.6})]
    m = rule_metrics(hist, 'best_test')
    assert m['best_test/epoch'] == 2 and m['best_test/test/acc'] == 0.7
    assert rule_metrics(hist, 'last')['last/epoch'] == 3


@pytest.mark.parametrize('stage,cfg', [
    ('pretrain', dict(epochs=4, batch_size=8, n_train=40, n_unlabeled=40)),
    ('finetune', dict(epochs=4, batch_size=8, n_train=80, n_test=20, split_value=0.5, mix='facemix', small_set_epochs=None)),
    ('semi', dict(epochs=4, batch_size=8, uratio=2, n_train=80, n_unlabeled=80, n_test=20, split_value=0.5)),
    ('mscl', dict(epochs=4, batch_size=8, n_train=80, n_test=20)),
])
def test_timing_model_positive_and_monotone(stage, cfg):
    from ssfer_lib.timing import timing_model
    t = lambda **kw: timing_model(stage, cfg | kw, step_s=2e-3)
    assert 0 < t() < t(epochs=8) < t(epochs=16)  # more epochs: longer
    assert t() < t(n_train=160, n_unlabeled=160 if 'n_unlabeled' in cfg else 0)  # more images: longer
    assert t(batch_size=8) > 0 and timing_model(stage, cfg, step_s=4e-3) > t()  # a slower machine: longer


def test_timing_model_eval_every_saves_eval_time():
    from ssfer_lib.timing import image_steps
    cfg = dict(epochs=10, batch_size=8, n_train=80, n_test=20, split_value=0.5, mix='none', small_set_epochs=None)
    assert image_steps('finetune', cfg | dict(eval_every=5))['eval'] < image_steps('finetune', cfg)['eval']
    assert image_steps('finetune', cfg | dict(eval_every=5))['train'] == image_steps('finetune', cfg)['train']


TOY = {'mae': dict(preset='test', batch_size=4, steps=2), 'facemix': dict(size='test', batch_size=4, steps=1, warmup=1),
       'loader': dict(preset='test', batch_size=4, steps=2), 'semi': dict(size='test', batch_size=2, uratio=2, steps=2),
       'ddp': {}, 'demo': dict(size='test', batch_size=4, steps=2),
       'gpu_options': dict(size='test', cnn='resnet18', cnn_img=16, batch_size=2, steps=1, warmup=1, compile=False)}


@pytest.mark.parametrize('name', sorted(TOY))
def test_every_benchmark_runs_at_toy_size(name, tmp_path, monkeypatch):
    from ssfer_lib.bench import BENCHMARKS, bench_summary
    assert set(BENCHMARKS) == set(TOY)  # a new benchmark needs a toy size here
    monkeypatch.chdir(tmp_path)  # bench_demo reads outputs/runs of the working directory (absent: no runs)
    r = BENCHMARKS[name](out=tmp_path/f'{name}.json', **TOY[name])
    assert isinstance(r, dict) and json.loads((tmp_path/f'{name}.json').read_text())
    assert '| figure | ratio | target |' in bench_summary(tmp_path)
