"""End to end: `ssfer reproduce --preset smoke` runs every implemented table's cells with papermill (the demo's grid at
toy sizes) and renders every table beside the paper's numbers."""
import json, re, subprocess
import pytest
from conftest import BIN
from ssfer_lib.tables import TABLES


def _numbers(md):
    "(number shown, metrics.json files its links name) of every number of ours in a rendered table."
    out = []
    for line in md.split('\n'):
        for cell in line.split(' | ')[1:]:
            files = re.findall(r'\[ⓟ\]\(([^)]+)\)', cell)
            if files: out.append((float(re.search(r'(\d+(?:\.\d+)?)', cell).group(1)), files))  # 2 decimals, or a count
    return out


@pytest.mark.slow
def test_reproduce_smoke_end_to_end(tmp_path):
    run = lambda *a: subprocess.run([str(BIN/'ssfer'), 'reproduce', '--preset', 'smoke', '--root', str(tmp_path/'out'), '--jobs', '2', *a],
                                    capture_output=True, text=True, cwd=tmp_path, timeout=3600)
    r = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'Kernel is running over TCP' not in r.stderr
    tdir, runs = tmp_path/'out'/'tables'/'smoke', tmp_path/'out'/'runs'
    for spec in TABLES.values():  # every declared table, as Markdown and LaTeX
        assert (tdir/f'{spec.name}.md').exists() and (tdir/f'{spec.name}.tex').exists(), spec.name
    report = (tmp_path/'out'/'smoke'/'REPORT.md').read_text()
    assert report.startswith('# Reproduction report, preset `smoke`') and 'reconstruction' in report and 'confusion' in report
    # every number of ours equals the metric of the runs it names (mean over seeds), read back from their metrics.json
    checked = 0
    for spec in TABLES.values():
        md = (tdir/f'{spec.name}.md').read_text()
        for shown, files in _numbers(md.split('\n\n')[2]):
            ms = [json.loads((tdir/f).read_text())['metrics'] for f in files]
            if spec.name == 'dtm_01': continue  # per-class F1 from the confusion matrix: checked in test_grid_engine
            if any(r.fields or r.metric for r in spec.rows): continue  # numbers at their rows' fields: test_grid_tables
            vals = [100 * m[spec.metric] for m in ms]
            assert shown == pytest.approx(round(sum(vals) / len(vals), 2), abs=0.006), (spec.name, shown, vals)
            checked += 1
    assert checked > 50
    for p in (p for p in runs.iterdir() if (p/'metrics.json').exists()):
        prov = json.loads((p/'metrics.json').read_text())['provenance']
        assert {'config', 'seed', 'git', 'packages', 'host', 'started', 'finished'} <= set(prov), p
        assert list(p.glob('*.ipynb')), f'{p}: executed notebook missing'
    # shared upstream work: one MAE for every cell that starts from it, stage 3 from stage 2's best epoch
    assert len(list(runs.glob('test-pretrain_mae-*'))) == 1
    ce = json.loads((runs/'test-mscl-synthfaces-ce-dense-mae-s0'/'metrics.json').read_text())['provenance']['config']
    assert ce['init'] == str(runs/'test-pretrain_mae-synthfaces'/'encoder.pt')
    semi = json.loads((runs/'test-semi-synthfaces-pc10-ema_teacher-from-facemix-iou-L4-mae-s0'/'run.json').read_text())
    assert semi['params']['init'] == str(runs/'test-finetune-synthfaces-pc10-facemix-iou-L4-mae-s0'/'best.pt')
    assert (tdir/'mimic_02-tsne.png').stat().st_size > 10_000
    t13 = (tdir/'table_13.md').read_text()
    assert '/ 84.35 (' in t13, 'ours beside the paper: SSFER Table 13, Mixup, RAF-DB 10 %'
    assert '[ⓟ]' in (tdir/'table_05.md').read_text(), 'the k-fold table has runs'
    # a second call reuses every finished cell and renders the same tables
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob('*/metrics.json')}
    tables = {p: p.read_text() for p in tdir.glob('*.md')}
    r2 = run()
    assert r2.returncode == 0 and ', 0 to run' in r2.stdout, r2.stdout[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p: p.read_text() for p in tdir.glob('*.md')} == tables
    # each call appended its record: the first ran every cell (its wall and CPU time are what the README quotes for the
    # demo), the second none; the first record is still there
    inv = [json.loads(l) for l in (tmp_path/'out'/'smoke'/'invocations.jsonl').read_text().splitlines()]
    n = inv[0]['cells']
    assert [(i['ran'], i['done'], i['failed'], i['exit_code']) for i in inv] == [(n, n, 0, 0), (0, n, 0, 0)]
    assert inv[0]['cells'] == len(stamps) and inv[0]['wall_s'] > inv[1]['wall_s'] > 0 and inv[0]['cpu_s'] > 0
