"""`fit`'s options: gradient accumulation (one big batch, whole groups per epoch, the scheduler's step count), gradient
clipping, the non-finite-loss error."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssfer_lib.core import load_weights
from ssfer_lib.train import Supervised, Task, build_optimizer, build_scheduler, fit

torch.set_num_threads(1)


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.arange(n) % 3


def _batches(x, y, b):
    "Consecutive batches of `b` rows (the last one may be smaller)."
    return [dict(image=x[i:i + b], label=y[i:i + b]) for i in range(0, len(x), b)]


def _mlp():
    torch.manual_seed(0)  # no dropout, no BatchNorm: the loss is a plain mean over the batch
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


class Counting(Supervised):
    "Counts its training calls."
    def __init__(self, model):
        super().__init__(model); self.calls = 0
    def forward(self, batch):
        self.calls += 1; return super().forward(batch)


# ---- gradient accumulation ----

@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
@pytest.mark.parametrize('k', [2, 4])
def test_accumulation_equals_one_big_batch(opt, k):
    "k batches of b with accum_steps=k give the parameters of batches of k·b, step for step (two steps, optimizer state included)."
    b, n_steps = 3, 2
    x, y = _data(b * k * n_steps)
    def run(batches, accum):
        t = Supervised(_mlp()); o = build_optimizer(t.model, lr=0.05, weight_decay=0.05, opt=opt)
        h = fit(t, batches, optimizer=o, epochs=1, accum_steps=accum, device='cpu', progress=False)
        return _params(t.model), h[-1]['step']
    small, s_small = run(_batches(x, y, b), k)
    big, s_big = run(_batches(x, y, b * k), 1)
    assert s_small == s_big == n_steps
    torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(small, _params(_mlp())), 'nothing trained'
    # and it is not what k separate steps give
    sep, _ = run(_batches(x, y, b), 1)
    assert not torch.allclose(sep, big, rtol=1e-5, atol=1e-6)


def test_leftover_batches_of_an_epoch_are_skipped():
    """5 batches, accum_steps=2: two steps per epoch on batches 1-4; batch 5 is not loaded (no wasted forward/backward),
    the result equals training on the first 4 batches, and no stale gradient is left on the parameters."""
    x, y = _data(15); batches = _batches(x, y, 3)
    def run(bs, epochs=2):
        t = Counting(_mlp()); o = build_optimizer(t.model, lr=0.05, opt='adamw')
        h = fit(t, bs, optimizer=o, epochs=epochs, accum_steps=2, device='cpu', progress=False)
        return t, h
    t5, h5 = run(batches)
    t4, h4 = run(batches[:4])
    assert [h['step'] for h in h5] == [2, 4] and t5.calls == 8
    torch.testing.assert_close(_params(t5.model), _params(t4.model))
    assert [h['train/loss'] for h in h5] == [h['train/loss'] for h in h4]  # the log averages the batches that trained
    assert all(p.grad is None for p in t5.parameters()), 'gradients of an unfinished group left on the parameters'


class _NoLen:
    "An iterable without __len__ (a stream)."
    def __init__(self, batches): self.batches = batches
    def __iter__(self): return iter(self.batches)


def test_stream_without_len_drops_its_partial_group():
    x, y = _data(15); t = Counting(_mlp()); o = build_optimizer(t.model, lr=0.05)
    h = fit(t, _NoLen(_batches(x, y, 3)), optimizer=o, epochs=2, accum_steps=2, device='cpu', progress=False)
    assert [r['step'] for r in h] == [2, 4] and t.calls == 10  # a stream's length is unknown: the 5th batch runs
    assert all(p.grad is None for p in t.parameters())


@pytest.mark.parametrize('loader', ['list', 'stream'])
def test_accum_longer_than_an_epoch_is_an_error(loader):
    "Fewer batches per epoch than accum_steps would never step (the stages' schedulers count max(1, len // k) steps)."
    x, y = _data(9); bs = _batches(x, y, 3)
    t = Supervised(_mlp()); o = build_optimizer(t.model, lr=0.05); w0 = _params(t.model)
    with pytest.raises(ValueError, match='accum_steps=4 exceeds the 3 batches'):
        fit(t, bs if loader == 'list' else _NoLen(bs), optimizer=o, epochs=2, accum_steps=4, device='cpu', progress=False)
    if loader == 'list': torch.testing.assert_close(_params(t.model), w0)  # refused before any work


@pytest.mark.parametrize('k', [0, -1, 1.5])
def test_accum_steps_must_be_a_positive_integer(k):
    x, y = _data(6); t = Supervised(_mlp())
    with pytest.raises(ValueError, match='accum_steps must be an integer >= 1'):
        fit(t, _batches(x, y, 3), optimizer=build_optimizer(t.model, lr=0.05), epochs=1, accum_steps=k, device='cpu', progress=False)


@pytest.mark.parametrize('n_batches,k,cycle', [(5, 2, None), (6, 3, None), (7, 2, None), (4, 3, 7)])
def test_scheduler_steps_under_accumulation(n_batches, k, cycle):
    """scheduler.step_update is called once per optimizer step with steps 1..epochs·(batches // k); the final `step`
    is that count; the lr ends at the cosine floor of `build_scheduler(steps_per_epoch=batches // k)` as the stages build
    it. `cycle`: fit's own steps_per_epoch (batches per epoch, cycling the loader)."""
    epochs, min_lr = 3, 1e-4
    x, y = _data(3 * n_batches); bs = _batches(x, y, 3)
    per_epoch = (cycle or n_batches) // k
    t = Supervised(_mlp()); o = build_optimizer(t.model, lr=1e-2)
    s = build_scheduler(o, epochs, per_epoch, warmup_epochs=1, min_lr=min_lr, warmup_lr=1e-3)
    calls, orig = [], s.step_update
    s.step_update = lambda num_updates, *a, **kw: (calls.append(num_updates), orig(num_updates, *a, **kw))
    lrs = []
    t.after_step = lambda step: lrs.append(o.param_groups[0]['lr'])  # the lr the next step will use
    h = fit(t, bs, optimizer=o, scheduler=s, epochs=epochs, steps_per_epoch=cycle, accum_steps=k, device='cpu', progress=False)
    assert calls == list(range(1, epochs * per_epoch + 1))
    assert [r['step'] for r in h] == [per_epoch * (e + 1) for e in range(epochs)]
    assert h[-1]['lr'] == pytest.approx(min_lr, rel=1e-9)
    peak = lrs.index(max(lrs)) + 1  # warm-up ends after exactly one epoch of steps
    assert peak == per_epoch and max(lrs) == pytest.approx(1e-2)


def test_resume_with_accumulation_matches_an_uninterrupted_run(tmp_path):
    x, y = _data(15); bs = _batches(x, y, 3)
    def run(ckpt, crash_after=None):
        t = Supervised(_mlp()); o = build_optimizer(t.model, lr=1e-2)
        s = build_scheduler(o, 3, len(bs) // 2, warmup_epochs=1)
        def crash(e, log):
            if e + 1 == crash_after: raise RuntimeError('simulated crash')
        h = fit(t, bs, optimizer=o, scheduler=s, epochs=3, accum_steps=2, device='cpu', ckpt_dir=ckpt, on_epoch_end=crash,
                progress=False)
        return h, _params(t.model)
    hA, wA = run(tmp_path/'a')
    with pytest.raises(RuntimeError, match='simulated crash'): run(tmp_path/'b', crash_after=1)
    hB, wB = run(tmp_path/'b')
    torch.testing.assert_close(wA, wB)
    assert [r['step'] for r in hB] == [2, 4, 6] and [r['lr'] for r in hA] == [r['lr'] for r in hB]


# ---- gradient clipping ----

class Scaled(Supervised):
    def __init__(self, model, scale):
        super().__init__(model); self.scale = scale
    def forward(self, batch):
        out = super().forward(batch); return out | dict(loss=self.scale * out['loss'])


def _change(clip, scale=1e6, k=1):
    "Norm of the parameter change of one plain-SGD step at lr 1 (= the gradient norm the optimizer saw)."
    x, y = _data(6)
    t = Scaled(_mlp(), scale); w0 = _params(t.model)
    o = torch.optim.SGD(t.parameters(), lr=1.0)
    h = fit(t, _batches(x, y, 6 // k), optimizer=o, epochs=1, accum_steps=k, grad_clip=clip, device='cpu', progress=False)
    assert h[-1]['step'] == 1
    return (_params(t.model) - w0).norm().item()


@pytest.mark.parametrize('clip', [0.1, 2.0])
@pytest.mark.parametrize('k', [1, 2])
def test_grad_clip_bounds_the_step(clip, k):
    "With a huge loss the clipped gradient norm equals the clip value (after accumulation: the whole group's gradient)."
    unclipped = _change(None, k=k)
    assert unclipped > 1e3
    assert _change(clip, k=k) == pytest.approx(clip, rel=1e-4)


def test_grad_clip_leaves_small_gradients_alone():
    free = _change(None, scale=1.0)
    assert free < 10 and _change(10.0, scale=1.0) == pytest.approx(free, rel=1e-6)


# ---- non-finite losses ----

class NaNAt(Task):
    "A linear classifier whose loss becomes `value` at the `at`-th call."
    def __init__(self, at, value=float('nan')):
        super().__init__(); self.model, self.at, self.value, self.calls = nn.Linear(4, 3), at, value, 0
    def forward(self, batch):
        self.calls += 1
        loss = F.cross_entropy(self.model(batch['image']), batch['label'])
        return dict(loss=loss * self.value if self.calls == self.at else loss)


@pytest.mark.parametrize('value,shown', [(float('nan'), 'nan'), (float('inf'), 'inf'), (-float('inf'), '-inf')])
def test_non_finite_loss_names_epoch_and_batch(value, shown, tmp_path):
    """4 batches per epoch, the 7th call is epoch 2 batch 3 (both counted from 1 like the log); the run stops at once and
    the last checkpoint is the finished epoch 1."""
    x, y = _data(12); torch.manual_seed(0); t = NaNAt(at=7, value=value)
    with pytest.raises(FloatingPointError, match=rf'loss is {shown} at epoch 2/3, batch 3/4'):
        fit(t, _batches(x, y, 3), optimizer=build_optimizer(t.model, lr=0.05), epochs=3, device='cpu', ckpt_dir=tmp_path,
            progress=False)
    assert t.calls == 7 and load_weights(tmp_path/'last.pt')['epoch'] == 1
    assert [h['epoch'] for h in json.loads((tmp_path/'history.json').read_text())] == [1]
