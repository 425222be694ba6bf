"""Stage 2 and stage 3 read real datasets through the data layer (FERPlus from ../shared; skipped when absent)."""
import json
import pytest
from ssfer_lib.finetune import finetune, finetune_config
from ssfer_lib.semi_train import semi_config, semi_train


@pytest.mark.slow
def test_finetune_then_semi_on_real_ferplus(ferplus_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = finetune_config('test', data='ferplus', data_root=str(ferplus_root), split_kind='per_class', split_value=2,
                          epochs=2, mix='facemix', box_provider='gt')
    m = finetune(cfg, tmp_path/'ft', progress=False)
    # FERPlus majority mode, 8 classes, Valid+Test merged as the paper's test set; 2 labels per class
    assert m['n_test'] == 3191 + 3137 and m['n_labeled'] == 16 and len(m['classes']) == 8
    assert 0 <= m['test/acc'] <= 1 and (tmp_path/'ft'/'best.pt').exists()
    scfg = semi_config('ema_teacher', 'test', data='ferplus', data_root=str(ferplus_root), split_kind='per_class',
                       split_value=2, init=str(tmp_path/'ft'/'best.pt'), epochs=1, steps_per_epoch=3)
    s = semi_train(scfg, tmp_path/'semi', progress=False)
    assert s['n_labeled'] == 16 and s['n_unlabeled'] == 25045 - 16
    assert json.loads((tmp_path/'semi'/'metrics.json').read_text())['provenance']['config']['data'] == 'ferplus'


@pytest.mark.slow
def test_mscl_on_real_ferplus(ferplus_root, tmp_path, monkeypatch):
    import numpy as np
    from torch.utils.data import Subset
    from ssfer_lib.mimic import mscl_config
    from ssfer_lib.mimic import mscl_data, mscl_experiment
    monkeypatch.chdir(tmp_path)
    cfg = mscl_config('test', data='ferplus', data_root=str(ferplus_root), epochs=2)
    assert (cfg.num_classes, cfg.proj_dim) == (8, 512)  # MIMIC's FERPlus defaults win over the preset
    d = mscl_data(cfg)
    assert len(d['labels']) == 25045 and len(d['test']) == 3191 + 3137 and len(d['classes']) == 8
    assert d['train'][0]['image'].shape == (3, cfg.img_size, cfg.img_size)
    d |= dict(train=Subset(d['train'], range(48)), test=Subset(d['test'], range(40)))
    m = mscl_experiment(cfg, tmp_path/'run', d, progress=False)
    assert (m['n_labeled'], m['n_test'], len(m['test/confusion'])) == (48, 40, 8)
    assert m['last/train/mscl'] > 0 and np.load(tmp_path/'run'/'test_features.npz')['features'].shape[0] == 40
    d7 = mscl_data(mscl_config('test', data='ferplus', data_root=str(ferplus_root), num_classes=7))
    assert len(d7['labels']) == 24925 and len(d7['classes']) == 7
    with pytest.raises(ValueError, match='needs data_root'):
        mscl_data(mscl_config('test', data='ferplus'))
