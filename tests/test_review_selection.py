"""Model selection and reporting: every number names its selection rule (best epoch on test, last epoch,
validation-selected), a validation split can be held out of the labeled images, and DTM reports network A."""
import json
import numpy as np



def _ids(ds): return {ds.samples[j].path for j in ds.indices}


def test_finetune_select_val_holds_out_a_validation_split(tmp_path):
    "select='val': a stratified validation split leaves the labeled images (never test images) and picks the epoch."
    from ssfer_lib.finetune import finetune, finetune_config, finetune_data
    cfg = finetune_config('test', select='val', box_root=str(tmp_path/'boxes'), device='cpu')
    m = finetune(cfg, tmp_path/'run', progress=False)
    d = finetune_data(cfg)  # the labeled split before the hold-out
    split = json.loads((tmp_path/'run'/'val_split.json').read_text())
    val, train = set(split['val']), set(split['train'])
    assert val and not val & train, 'validation images must not be trained on'
    assert val | train == _ids(d['labeled']), 'the validation split is carved from the labeled split'
    assert not val & _ids(d['test']), 'the validation split never takes test images'
    labels = {s.path: s.label for s in d['labeled'].samples}
    assert {labels[i] for i in val} == set(d['labeled'].labels.tolist()), 'at least one validation image per class'
    assert (m['n_val'], m['n_labeled']) == (len(val), len(train))
    # the epoch is picked on validation accuracy and its test score is the headline
    hist = json.loads((tmp_path/'run'/'history.json').read_text())
    pick = max(hist, key=lambda h: h['val/acc'])
    assert m['selection'] == 'val_selected' and m['val_selected/epoch'] == pick['epoch']
    assert m['val_selected/test/acc'] == pick['test/acc'] and m['val_selected/val/acc'] == pick['val/acc']
    assert abs(m['test/acc'] - m['val_selected/test/acc']) < 1e-9
    assert m['best_test/test/acc'] >= m['last/test/acc'] and m['best_test/test/acc'] >= m['val_selected/test/acc']


def test_finetune_default_records_every_rule_with_the_paper_headline(tmp_path):
    from ssfer_lib.finetune import finetune, finetune_config
    m = finetune(finetune_config('test', box_root=str(tmp_path/'boxes'), device='cpu'), tmp_path/'run', progress=False)
    hist = json.loads((tmp_path/'run'/'history.json').read_text())
    for k in ('best_test/test/acc', 'best_test/test/macro_f1', 'best_test/epoch', 'last/test/acc', 'last/test/macro_f1', 'last/epoch'):
        assert k in m, k
    assert m['best_test/test/acc'] == max(h['test/acc'] for h in hist) >= m['last/test/acc'] == hist[-1]['test/acc']
    assert m['selection'] == 'best_test' and abs(m['test/acc'] - m['best_test/test/acc']) < 1e-9  # the paper's protocol
    assert 'val_selected/test/acc' not in m and m['n_val'] == 0


def _semi(alg, out):
    from ssfer_lib.semi_train import semi_config, semi_train
    return semi_train(semi_config(alg, 'test', device='cpu', **({'steps_per_epoch': 3} if alg == 'dtm' else {})), out, progress=False)


def test_semi_stage_tracks_the_best_epoch_on_test(tmp_path):
    "Stage 3 keeps best.pt and records best-on-test and last-epoch numbers of every network (the EMA teacher's headline: teacher)."
    m = _semi('ema_teacher', tmp_path)
    hist = json.loads((tmp_path/'history.json').read_text())
    assert (tmp_path/'best.pt').exists(), 'stage 3 keeps the best epoch on test'
    assert m['reported_model'] == 'teacher' and m['selection'] == 'best_test'
    best = max(hist, key=lambda h: h['test/teacher/acc'])
    assert m['best_test/test/acc'] == best['test/teacher/acc'] >= m['last/test/acc'] == hist[-1]['test/teacher/acc']
    assert m['best_test/epoch'] == best['epoch'] and m['last/epoch'] == hist[-1]['epoch']
    assert m['best_test/test/student/acc'] == best['test/student/acc']  # the other network at the same epoch
    assert m['last/test/student/acc'] == hist[-1]['test/student/acc']


def test_dtm_reports_network_a_with_network_b_beside(tmp_path):
    "DTM's headline is network A (its `student`, the trained network); B, the EMA that sets thresholds, is shown beside."
    from ssfer_lib.reproduce import load_preset, plan_grid
    from ssfer_lib.render import render_table
    dtm = _semi('dtm', tmp_path/'dtm')
    assert dtm['reported_model'] == 'student', 'DTM trains network A (its `student`); B is the EMA that sets thresholds'
    assert dtm['network_names'] == {'student': 'network A', 'teacher': 'network B (EMA)'}
    assert abs(dtm['test/acc'] - dtm['test/student/acc']) < 1e-9 and dtm['best_test/test/acc'] == dtm['best_test/test/student/acc']
    # in Table 12, DTM's row is network A, and network B's accuracy at the same epoch is listed under the table
    plan = plan_grid(load_preset('smoke'), tmp_path/'o', tables=['table_12'])
    cell = next(s.cell for s in plan.slots if s.row == 'dtm' and s.cell)
    md, _ = render_table(plan, plan.tables[0], {c: _fake(i % 10) for i, c in enumerate(plan.grid.cells)} | {cell: dtm}, {}, tmp_path)
    row = next(l for l in md.split('\n') if l.startswith('| DTM (ours only) |'))
    assert f"[{100 * dtm['best_test/test/student/acc']:.2f}]" in row, row
    net = next(l for l in md.split('\n') if l.startswith('- DTM'))
    assert f"network A (reported) {100 * dtm['best_test/test/student/acc']:.2f}ᵇ" in net, net
    assert f"network B (EMA) {100 * dtm['best_test/test/teacher/acc']:.2f}ᵇ" in net, net


def _fake(i, **kw):
    "Made-up metrics whose best-on-test, last-epoch and validation-selected numbers are told apart by their range."
    return {'n_labeled': 70, 'best_test/test/acc': 0.90 + i / 100, 'best_test/test/macro_f1': 0.80 + i / 100,
            'last/test/acc': 0.50 + i / 100, 'last/test/macro_f1': 0.40 + i / 100,
            'test/acc': 0.10 + i / 100, 'test/macro_f1': 0.10 + i / 100} | kw  # the bare headline must never be shown


def test_tables_label_every_number_by_its_selection_rule(tmp_path):
    "Tables 10 and 12: stage-2 and stage-3 rows are compared on one rule; every number carries its mark, never the bare headline."
    import re
    from ssfer_lib.reproduce import load_preset, plan_grid
    from ssfer_lib.render import render_table
    plan = plan_grid(load_preset('smoke'), tmp_path, tables=['table_10', 'table_12'])
    two = dict(reported_model='teacher', network_names={'teacher': 'teacher (EMA)', 'student': 'student'})
    res = {c: _fake(i % 10, **(two if '-semi-' in c else {})) for i, c in enumerate(plan.grid.cells)}
    for spec in plan.tables:
        md, _ = render_table(plan, spec, res, {}, tmp_path)
        rows = [l for l in md.split('\n') if l.startswith('| ') and '[ⓟ]' in l]
        nums = [re.findall(r'\[(\d+\.\d+)\]\([^)]*\) \[ⓟ\]\([^)]*\)(\S)', l) for l in rows]
        assert all(n for n in nums) and len(rows) >= 2, md  # stage-2 and stage-3 rows both have numbers
        for v, mark in sum(nums, []):
            assert mark == 'ᵇ' and 90 <= float(v) <= 100, (spec.name, v, mark)  # best epoch on test, never 'test/acc'


def test_mimic_runs_record_last_epoch_and_best_on_test_under_explicit_keys(tmp_path):
    "MIMIC's runs report the last epoch (no selection); the best test epoch is kept beside under its rule's key."
    from ssfer_lib.mimic import mscl_config
    from ssfer_lib.mimic import mscl_experiment
    m = mscl_experiment(mscl_config('test', device='cpu'), tmp_path, progress=False)
    hist = json.loads((tmp_path/'history.json').read_text())
    assert m['selection'] == 'last' and abs(m['test/acc'] - m['last/test/acc']) < 1e-9
    assert m['last/test/acc'] == hist[-1]['test/acc'] and m['last/test/macro_f1'] == hist[-1]['test/macro_f1']
    assert m['best_test/test/acc'] == max(h['test/acc'] for h in hist) >= m['last/test/acc']
    assert 'best/test/acc' not in m, 'the ambiguous old key is gone'
