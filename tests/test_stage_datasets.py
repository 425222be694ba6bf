"""Every stage reads its data through `stage_datasets`: each stage data function returns the samples of a direct call,
and a noise split's labels are flipped once, for exactly the requested fraction."""
import dataclasses
from pathlib import Path
import cv2
import numpy as np
import pytest
from ssfer_lib.datasets import stage_datasets
from ssfer_lib.finetune import FinetuneConfig, finetune_config, finetune_data
from ssfer_lib.mimic import mscl_config, mscl_data
from ssfer_lib.pretrain import pretrain_config, pretrain_data
from ssfer_lib.semi_train import semi_config, semi_data

VALUE = 'split_value'  # the config field holding the split's value


def rows(ds):
    "(path, label, box) of every item of a FERDataset, in order."
    return [(ds.samples[j].path, ds.samples[j].label, None if ds.boxes is None else tuple(ds.boxes[j])) for j in ds.indices]


def pixels(ds):
    "The cached images of a FERDataset's items, in order (None when decoded on the fly)."
    return None if ds.cache is None else ds.cache['images'][ds.indices]


def same(a, b):
    "Two FERDatasets show the same samples, labels, boxes and pixels in the same order."
    assert len(a) == len(b) and rows(a) == rows(b)
    np.testing.assert_array_equal(pixels(a), pixels(b))


def fake_rafdb(root: Path, n_train=28, n_test=14) -> Path:
    "The RAF-DB basic layout with random 40 x 30 images (as tests/test_data.py builds fakes)."
    rng = np.random.default_rng(0)
    lines = [f'train_{i:05d}.jpg {i % 7 + 1}' for i in range(1, n_train + 1)] + [f'test_{i:04d}.jpg {i % 7 + 1}' for i in range(1, n_test + 1)]
    (root/'EmoLabel').mkdir(parents=True); (root/'Image/aligned').mkdir(parents=True)
    (root/'EmoLabel/list_patition_label.txt').write_text('\n'.join(lines) + '\n')
    for l in lines: cv2.imwrite(str(root/'Image/aligned'/f'{Path(l.split()[0]).stem}_aligned.jpg'), rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    return root


@pytest.fixture
def raf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # decoded-image caches go to ./outputs/cache
    return fake_rafdb(tmp_path/'raf')


@pytest.mark.parametrize('data', ['synthfaces', 'rafdb'])
def test_finetune_data_is_stage_datasets(data, raf, tmp_path):
    cfg = finetune_config('test', data=data, data_root=str(raf) if data == 'rafdb' else None, box_root=str(tmp_path/'boxes'))
    d = finetune_data(cfg)
    s = stage_datasets(data, cfg.data_root, n_train=56, n_test=28, size=16, split_kind='ratio', split_value=0.5, pool=None,
                       crop_scale=(0.5, 1.0))  # the test preset's data
    assert [r[:2] for r in rows(d['labeled'])] == [r[:2] for r in rows(s['labeled'])] and len(d['labeled']) > 0
    np.testing.assert_array_equal(pixels(d['labeled']), pixels(s['labeled']))
    same(d['test'], s['test'])
    assert d['classes'] == list(s['classes']) and d['split'].equals(s['split'])
    if data == 'synthfaces':  # the gt provider gives the generator's boxes, the samples' own
        lab = s['labeled']
        np.testing.assert_allclose(d['labeled'].boxes[lab.indices], [lab.samples[j].box for j in lab.indices], atol=0.01)
    else: assert d['boxes']['n_fallback'] == len(d['labeled'].samples)  # a reader without boxes: the fallback box


@pytest.mark.parametrize('data', ['synthfaces', 'rafdb'])
def test_semi_data_is_stage_datasets(data, raf):
    cfg = semi_config('ema_teacher', 'test', data=data, data_root=str(raf) if data == 'rafdb' else None)
    d = semi_data(cfg)
    s = stage_datasets(data, cfg.data_root, n_train=140, n_test=70, size=16, split_kind='per_class', split_value=2, pool='two',
                       crop_scale=(0.5, 1.0))  # the test preset's data
    same(d['labeled'], s['labeled']); same(d['test'], s['test'])
    same(d['unlabeled'].weak, s['unlabeled'].weak); same(d['unlabeled'].strong, s['unlabeled'].strong)
    assert rows(d['labeled_eval']) == rows(s['labeled'])
    n_train = 140 if data == 'synthfaces' else 28
    assert len(d['unlabeled']) == n_train - len(d['labeled'])  # the training images outside the labeled split


def test_pretrain_data_is_stage_datasets(tmp_path):
    d = pretrain_data(pretrain_config('test', n_unlabeled=9), n_show=5)
    s = stage_datasets(n_train=56, n_test=5, n_unlabeled=9, size=16, use_labels=False, pool='one', crop_scale=(0.2, 1.0))
    same(d['train'], s['unlabeled'])
    assert [p for p, *_ in rows(d['train'])][55:57] == ['synthfaces/train/000055', 'synthfaces/unlabeled/000000']
    assert d['show'].shape == (5, 3, 16, 16)
    faces = tmp_path/'faces'
    for i in range(7):
        (faces/f'p{i % 2}').mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(faces/f'p{i % 2}/{i}.png'), np.full((20, 24, 3), 30 * i, np.uint8))
    (faces/'notes.txt').write_text('not an image')
    d = pretrain_data(pretrain_config('test', data='folder', data_root=str(faces)), n_show=3)
    s = stage_datasets('folder', faces, size=16, train_split='all', test_split=None, use_labels=False, pool='one', cache_root=None)
    same(d['train'], s['unlabeled'])
    assert len(d['train']) == 7 and d['show'].shape == (3, 3, 16, 16)


@pytest.mark.parametrize('data', ['synthfaces', 'rafdb'])
def test_mscl_data_is_stage_datasets(data, raf):
    cfg = mscl_config('test', data=data, data_root=str(raf) if data == 'rafdb' else None, align=False)
    d = mscl_data(cfg)
    s = stage_datasets(data, cfg.data_root, n_train=140, n_test=70, size=16, pool=None, crop_scale=(0.5, 1.0))
    same(d['train'], s['train']); same(d['test'], s['test'])
    np.testing.assert_array_equal(d['labels'], s['train'].labels); assert d['classes'] == list(s['classes'])
    a = mscl_data(dataclasses.replace(cfg, align=True))  # SynthFaces rendered at twice the side, then cropped around the face
    assert rows(a['train'])[0][:2] == rows(s['train'])[0][:2] and a['train'].cache['images'].shape[1:3] == (16, 16)


def flipped(ds, split):
    "Number of labeled items whose label differs from the true one in the split."
    return int(sum(ds.samples[j].label != t for j, t in zip(ds.indices, split.label.values[ds.indices])))


@pytest.mark.parametrize('data', ['synthfaces', 'rafdb'])
def test_noise_flips_exactly_the_fraction_once(data, raf, tmp_path):
    n = 140 if data == 'synthfaces' else 28
    s = stage_datasets(data, str(raf) if data == 'rafdb' else None, n_train=n, n_test=7, size=16, split_kind='noise',
                       split_value=0.25, split_seed=3, pool='two')
    split, lab = s['split'], s['labeled']
    assert len(lab) == n and flipped(lab, split) == round(0.25 * n)  # every image labeled, a quarter of them to another class
    np.testing.assert_array_equal(lab.labels, split.train_label.values)
    truth = [x.meta['true_label'] for x in s['train'].samples] if data == 'synthfaces' else split.label.tolist()
    assert int((lab.labels != np.array(truth)).sum()) == round(0.25 * n)  # flipped once, from the truth
    assert len(s['unlabeled']) == 0
    # the stages train with the same flipped labels
    ft = finetune_data(finetune_config('test', data=data, data_root=str(raf) if data == 'rafdb' else None, n_train=n, n_test=7,
                                       split_kind='noise', split_seed=3, box_root=str(tmp_path/'boxes'), **{VALUE: 0.25}))
    se = semi_data(semi_config('ema_teacher', 'test', data=data, data_root=str(raf) if data == 'rafdb' else None, n_train=n,
                               n_test=7, split_kind='noise', split_seed=3, **{VALUE: 0.25}))
    for d in (ft, se): np.testing.assert_array_equal(d['labeled'].labels, lab.labels); assert flipped(d['labeled'], d['split']) == round(0.25 * n)


def test_synthfaces_are_drawn_once_across_runs(tmp_path, monkeypatch):
    "A second stage (another process in the grid) reads the first one's drawn images instead of drawing them again."
    import numpy as np
    from ssfer_lib import synthfaces
    from ssfer_lib.datasets import stage_datasets
    kw = dict(n_train=28, n_test=14, n_unlabeled=7, size=16, split_kind='per_class', split_value=2, synth_cache=tmp_path)
    a = stage_datasets('synthfaces', None, **kw)
    assert len(list(tmp_path.glob('*.npz'))) == 3  # train, test, unlabeled
    monkeypatch.setattr(synthfaces, 'synth_face', lambda *a, **k: 1 / 0)  # drawing now fails: only the files can serve
    b = stage_datasets('synthfaces', None, **kw)
    for part in ('labeled', 'test', 'unlabeled'):
        x, y = a[part], b[part]
        assert len(x) == len(y)
    assert np.array_equal(a['train'].cache['images'], b['train'].cache['images'])
    assert [s.label for s in a['train'].samples] == [s.label for s in b['train'].samples]
