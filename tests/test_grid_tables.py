"""The analysis tables (SSFER Tables 1, 3, 5–8, 16) rendered from fake runs: a metrics.json in a run folder for each
cell the plan names; every number shown equals the metric of the run it links to."""
import json, math, re, subprocess
from pathlib import Path
import pytest


def _fake(cell) -> dict:
    "Distinct, recognisable metrics for a cell of each analysis notebook (the shapes their experiments write)."
    k, p = cell.kind, cell.params
    if k == 'kfold':  # 2 of 5 folds, as the demo runs them
        base = 0.6 if p['method'] == 'ssfer' else 0.5
        folds = [dict(fold=f, acc=base + f / 100, n_labeled=40 + f, selection='best_test') for f in (1, 2)]
        return dict(folds=folds, fold_acc=[r['acc'] for r in folds], mean_acc=base + 0.015)
    if k == 'label_noise': return {'test/acc': 0.9 - p['noise'] / 2, 'n_labeled': 70, 'selection': 'best_test'}
    if k == 'robustness':
        return dict(acc={r: {f'{e:g}': (0.8 if r == 'focused' else 0.85) - e for e in (0, 0.02, 0.04, 0.06, 0.08, 0.1)}
                         for r in ('focused', 'unfocused')})
    if k == 'complexity':
        names = ('mobilenetv2_100', 'mobilenetv3_large_100', 'resnet18', 'resnet50', 'vgg11', 'vgg13', 'vit_tiny_patch16_224',
                 'vit_small_patch16_224', 'vit_base_patch16_224', 'vit_large_patch16_224', 'ours')
        return dict(models={n: dict(params_m=i + 0.5, params_leaf_m=i + 0.25, macs_g=i / 10 + 0.01, flops_g=i / 5 + 0.03)
                            for i, n in enumerate(names)})
    if k == 'dataset_stats': return dict(n_train=1400, n_test=700, n_classes=7)
    if k == 'gwo': return {'preset/test/acc': 0.61, 'gwo/test/acc': 0.63, 'selection': 'best_test'}
    acc = 0.4 + (hash(cell.id) % 1000) / 10000  # finetune, semi, pretrain: any number
    return {'best_test/test/acc': acc, 'test/acc': acc, 'n_labeled': 140, 'selection': 'best_test'}


def _render(tmp_path, tables):
    "Plan the demo's tables, write a finished fake run for every cell, render; returns (plan, {table name: Markdown})."
    from ssfer_lib.reproduce import load_preset, plan_grid
    from ssfer_lib.render import render_all
    plan = plan_grid(load_preset('demo'), tmp_path, tables=tables)
    for cid, c in plan.grid.cells.items():
        f = plan.grid.path(cid); f.mkdir(parents=True)
        (f/'run.json').write_text(json.dumps(dict(grid=dict(key=c.key), params=c.params, started=0)))
        (f/'metrics.json').write_text(json.dumps(dict(metrics=_fake(c), provenance={})))
    paths = render_all(plan, tmp_path)
    return plan, {t.name: (paths['tables']/f'{t.name}.md').read_text() for t in plan.tables}


def _grid(md: str) -> tuple[list, dict]:
    "(header, {row name: cell texts}) of a rendered table, rows in order."
    lines = md.split('\n\n')[2].split('\n')
    split = lambda l: [c.strip() for c in l.strip().strip('|').split(' | ')]
    rows = [split(l) for l in lines[2:]]
    assert len({r[0] for r in rows}) == len(rows), 'row names are unique'
    return split(lines[0]), {r[0]: r[1:] for r in rows}


def _ours(text: str) -> tuple[float | None, list]:
    "Our number in a cell (before ' / paper') and the metrics.json files it links."
    files = re.findall(r'\[ⓟ\]\(([^)]+)\)', text)
    m = re.match(r'\[?(-?\d+(?:\.\d+)?)', text)
    return (float(m.group(1)) if m else None), files


def test_analysis_tables_render_the_numbers_of_the_runs_they_name(tmp_path):
    from ssfer_lib.tables import read_path
    plan, md = _render(tmp_path, ['table_05', 'table_06', 'table_07', 'table_08', 'table_01', 'table_16'])
    # Table 5: each fold's accuracy, the mean over the folds run, the first fold's labeled images
    head, rows = _grid(md['table_05'])
    assert head[1:] == ['Labels', 'Fold 1', 'Fold 2', 'Fold 3', 'Fold 4', 'Fold 5', 'Average'], head
    ssfer = rows['SSFER-10% [rafdb-ssfer-10pct]']
    assert [_ours(c)[0] for c in ssfer] == [41, 61.0, 62.0, None, None, None, 61.5], ssfer
    assert ssfer[1].endswith(' / 84.13 (-23.13)') and ssfer[6].endswith(' / 84.20 (-22.70)'), ssfer
    assert ssfer[3].startswith('—⁽') and md['table_05'].count('not recorded by its run') == 1
    assert [_ours(c)[0] for c in rows['ViT-Base [rafdb-vit-base]'][1:3]] == [51.0, 52.0]
    assert rows['ViT-Large [rafdb-vit-large]'][1].startswith('—⁽')  # not in the demo's rows
    # Table 7: the ε columns of one attack run, each region its own row
    head, rows = _grid(md['table_07'])
    assert head[1:] == ['Eps=0', 'Eps=0.02', 'Eps=0.04', 'Eps=0.06', 'Eps=0.08', 'Eps=0.10'], head
    assert [_ours(c)[0] for c in rows['SSFER-10% [focused-ssfer-10pct-affectnet7]']] == [80.0, 78.0, 76.0, 74.0, 72.0, 70.0]
    assert [_ours(c)[0] for c in rows['SSFER-10% [unfocused-ssfer-10pct-affectnet8]']] == [85.0, 83.0, 81.0, 79.0, 77.0, 75.0]
    assert rows['SSFER-10% [unfocused-ssfer-10pct-affectnet8]'][1].endswith(' / 47.23 (+35.77)')
    # Table 8: one run per noise rate; the decline is ours at 0 % minus ours at 30 %
    head, rows = _grid(md['table_08'])
    assert head[1:] == ['Labels', 'Label Noise Ratio 0', 'Label Noise Ratio 10', 'Label Noise Ratio 20', 'Label Noise Ratio 30', 'Decline ↓']
    r = rows['SSFER-10% [ferplus-ssfer-10pct]']
    assert [_ours(c)[0] for c in r] == [70, 90.0, None, None, 75.0, 15.0], r
    assert r[5] == '15.00 / 4.14 (+10.86)', r  # derived: no run of its own
    assert '0.0-mae' in _ours(r[1])[1][0] and '0.3-mae' in _ours(r[4])[1][0], r
    assert rows['Progressive Teacher [rafdb-progressive-teacher] (reported)'] == ['12271', '89.57', '87.28', '86.25', '84.32', '5.25']
    # Table 6: params and FLOPs from the complexity run (the paper's counts, and torch's beside), accuracy from SSFER
    head, rows = _grid(md['table_06'])
    assert head[1:] == ['Labels', 'Params (M)', 'FLOPs (G)', 'FLOPs, torch (G)', 'RAF-DB'], head
    assert [_ours(c)[0] for c in rows['ResNet-50'][1:4]] == [3.25, 0.31, 0.63], rows['ResNet-50']  # resnet50: the 4th model
    assert rows['ResNet-50'][1].endswith(' / 23.50 (-20.25)') and rows['ResNet-50'][4].startswith('—⁽')
    assert [_ours(c)[0] for c in rows['SSFER-10%'][1:4]] == [10.25, 1.01, 2.03]  # our ViT: the complexity run's 'ours'
    assert 'demo-semi-synthfaces-r0.1-ema_teacher' in _ours(rows['SSFER-10%'][4])[1][0]
    assert "torch's counter" in md['table_06']
    # Table 16: both rows from one GWO run
    head, rows = _grid(md['table_16'])
    assert [_ours(c)[0] for c in rows["SSFER's stage 2, the preset's learning rates"]] == [61.0] * 4
    assert [_ours(c)[0] for c in rows["SSFER's stage 2, GWO-tuned learning rates"]] == [63.0] * 4
    # every number of ours equals the value of the run it links to, at the field (or metric) of its row and column
    checked = 0
    for t in plan.tables:
        head, rows = _grid(md[t.name])
        cols = plan.columns[t.name]
        for row, cells in zip(plan.rows[t.name], rows.values()):
            for col, text in zip(cols, cells):
                shown, files = _ours(text)
                if not files: continue
                m = json.loads((plan.grid.path(Path(files[0]).parent.name)/'metrics.json').read_text())['metrics']
                f = row.fields.get(col.key) if col.field else None
                v = read_path(m, f.path)[0] * f.scale if f else 100 * m[row.metric or t.metric]
                assert shown == pytest.approx(round(v, f.decimals if f else 2)), (t.name, row.key, col.key, shown, v)
                checked += 1
    assert checked > 60, checked


def test_table_1_counts_the_stand_in_and_table_9_waits_for_adience(tmp_path):
    plan, md = _render(tmp_path, ['table_01', 'table_09'])
    head, rows = _grid(md['table_01'])
    assert [_ours(c)[0] for c in rows['FERPlus']] == [1400, 700, 7], rows  # SynthFaces at the demo's sizes
    assert rows['FERPlus'][2].endswith(' / 8 (-1)')
    assert 'a stand-in: its own sizes' in md['table_01']
    head, rows = _grid(md['table_09'])
    assert all(c.startswith('—⁽1⁾') for r in rows.values() for c in r), rows
    assert '⁽1⁾ not run yet — needs data: adience (add its datasets to --datasets, give --data-root adience=FOLDER)' in md['table_09']
    assert not [c for c in plan.grid.cells if 'kfold' in c], 'no Adience cell without its data'


def test_analysis_cells_share_the_grids_upstream_runs():
    "K-fold SSFER and label noise start from the grid's MAE; the attack from the SSFER run Table 2 has; Table 3 after stage 2."
    from ssfer_lib.reproduce import load_preset, plan_grid
    plan = plan_grid(load_preset('demo'), '/tmp/nowhere', tables=['table_02', 'table_03', 'table_05', 'table_07', 'table_08'])
    cells = plan.grid.cells
    assert [c for c in cells if 'pretrain_mae' in c] == ['demo-pretrain_mae-synthfaces']
    mae = str(plan.grid.path('demo-pretrain_mae-synthfaces')/'encoder.pt')
    for cid, c in cells.items():
        if c.kind in ('kfold', 'label_noise') and c.params['method' if c.kind == 'kfold' else 'noise'] in ('ssfer', 0.0, 0.3):
            assert c.params['init'] == mae and c.deps == ('demo-pretrain_mae-synthfaces',), cid
    att = next(c for c in cells.values() if c.kind == 'robustness')
    t2 = next(s.cell for s in plan.slots if s.table == 'table_02' and s.cell)
    assert att.deps == (t2,) and att.params['checkpoint'] == str(plan.grid.path(t2)/'best.pt')
    semi = {c.params['algorithm'] for c in cells.values() if c.kind == 'semi' and c.params['split_kind'] == 'per_class'}
    assert semi == {'pi_model', 'pseudo_label', 'mean_teacher', 'vat', 'uda', 'mixmatch', 'remixmatch', 'flexmatch', 'comatch',
                    'ccssl', 'fixmatch', 'ema_teacher', 'supervised', 'freematch', 'softmatch'}
    assert len({c.deps for c in cells.values() if c.kind == 'semi' and c.params['split_kind'] == 'per_class'}) == 1, 'one stage 2'


def test_a_notebook_parameter_the_notebook_lacks_is_one_line():
    from ssfer_lib.reproduce import load_preset, plan_grid
    p = load_preset('demo', [('notebook_params.kfold.fold', '[1]')])
    with pytest.raises(KeyError, match="notebook_params: 'fold' is not a parameter of kfold \\(did you mean 'folds'\\?\\)"):
        plan_grid(p, '/tmp/nowhere', tables=['table_05'])


@pytest.mark.slow
def test_smoke_grid_renders_tables_3_5_7_8_with_finite_numbers(tmp_path):
    from conftest import BIN
    r = subprocess.run([str(BIN/'ssfer'), 'reproduce', '--preset', 'smoke', '--tables', 'table_03', 'table_05', 'table_07', 'table_08',
                        '--root', str(tmp_path/'out'), '-p', 'max_steps', '2'], capture_output=True, text=True, cwd=tmp_path, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tdir = tmp_path/'out'/'tables'/'smoke'
    # linked numbers: Table 3 15 rows (the paper's 12, labeled-only, FreeMatch, SoftMatch) x 2 columns (RAF-DB, AffectNet-7 at 10 per class); Table 5 4 rows x (labels, folds 1-2,
    # average); Table 7 4 rows (two regions, AffectNet-7/8 at 10 %) x 6 ε; Table 8 2 rows x (labels, noise 0 and 30 %)
    for name, n in (('table_03', 30), ('table_05', 16), ('table_07', 24), ('table_08', 6)):
        md = (tdir/f'{name}.md').read_text()
        nums = [_ours(c)[0] for l in md.split('\n') for c in l.strip('|').split(' | ')[1:] if '[ⓟ]' in c]
        assert len(nums) == n and all(v is not None and math.isfinite(v) for v in nums), (name, nums, md)
    assert 'Decline' in md and re.search(r'\| -?\d+\.\d\d / 5\.60', md), md  # ours, beside the paper's decline
