"TensorBoard curves written by `fit` into the run folder: one point per epoch and logged scalar, equal to history.json."
import json
import numpy as np
import pytest
import torch
from torch import nn
from ssfer_lib.train import Supervised, build_optimizer, fit

EventAccumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator').EventAccumulator


def _batches(n=64, seed=0):
    g = torch.Generator().manual_seed(seed); x = torch.randn(n, 4, generator=g)
    return [dict(image=x[i:i + 16], label=(x[i:i + 16, 0] > 0).long()) for i in range(0, n, 16)]


def _curves(d) -> dict:
    "tag -> [(epoch, value)] of every scalar in the run folder's event files."
    ea = EventAccumulator(str(d)); ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}


def _f32(v): return float(np.float32(v))  # TensorBoard stores scalars as float32


def _fit(d, epochs=3, lr=0.05, **kw):
    torch.manual_seed(0); t = Supervised(nn.Linear(4, 2))
    return fit(t, _batches(), optimizer=build_optimizer(t.model, lr=lr, weight_decay=0), epochs=epochs, device='cpu',
               ckpt_dir=d, progress=False, **kw)


def test_curves_equal_history_json(tmp_path):
    h = _fit(tmp_path, eval_fn=lambda t: {'test/acc': 0.5})
    assert list(tmp_path.glob('events.out.tfevents.*')), 'no event file in the run folder'
    saved, c = json.loads((tmp_path/'history.json').read_text()), _curves(tmp_path)
    assert saved == h
    assert c['train/loss'] == [(e['epoch'], _f32(e['train/loss'])) for e in saved]
    for k in ('lr', 'step', 'train/acc', 'test/acc'):  # every scalar of the log, the epoch as the step
        assert c[k] == [(e['epoch'], _f32(e[k])) for e in saved], k


def test_curves_of_a_resumed_run_have_each_epoch_once(tmp_path):
    def crash(e, log):
        if e + 1 == 2: raise RuntimeError('simulated crash')
    with pytest.raises(RuntimeError, match='simulated crash'): _fit(tmp_path, epochs=4, on_epoch_end=crash)
    h = _fit(tmp_path, epochs=4)  # resumes from epoch 2
    assert [e['epoch'] for e in h] == [1, 2, 3, 4]
    assert _curves(tmp_path)['train/loss'] == [(e['epoch'], _f32(e['train/loss'])) for e in h]


def test_points_of_an_epoch_that_never_reached_its_checkpoint_are_hidden(tmp_path):
    "Epoch 1 is logged, then its checkpoint fails (select names no metric): the rerun's points replace it."
    with pytest.raises(KeyError, match='is not a logged metric'): _fit(tmp_path, epochs=2, lr=0.5, select='val/acc')
    assert not (tmp_path/'last.pt').exists()
    h = _fit(tmp_path, epochs=2)
    assert _curves(tmp_path)['train/loss'] == [(e['epoch'], _f32(e['train/loss'])) for e in h]


def test_class_thresholds_are_named_by_class(tmp_path):
    class WithThresholds(Supervised):
        def after_epoch(self, epoch): return {f'dtm/tau_{c}': 0.5 + 0.1 * c + 0.01 * epoch for c in range(2)}
    torch.manual_seed(0); t = WithThresholds(nn.Linear(4, 2))
    h = fit(t, _batches(), optimizer=build_optimizer(t.model, lr=0.05), epochs=2, device='cpu', ckpt_dir=tmp_path,
            progress=False, classes=['neutral', 'happy'])
    c = _curves(tmp_path)
    assert c['thr/happy'] == [(e['epoch'], _f32(e['dtm/tau_1'])) for e in h] and 'dtm/tau_1' not in c


def test_no_run_folder_no_curves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(None, epochs=1)
    assert not list(tmp_path.rglob('events.out.tfevents.*'))  # SummaryWriter's default folder would be ./runs
