"""End to end: `ssfer reproduce --preset smoke` runs every table's notebooks with papermill and renders the tables."""
import json, subprocess
import pytest
from conftest import BIN


@pytest.mark.slow
def test_reproduce_smoke_end_to_end(tmp_path):
    run = lambda *a: subprocess.run([str(BIN/'ssfer'), 'reproduce', '--preset', 'smoke', '--root', str(tmp_path/'out'), *a],
                                    capture_output=True, text=True, cwd=tmp_path, timeout=3600)
    r = run()
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path/'out'/'tables'/'smoke.md').read_text()
    assert table.startswith('# Tables, preset `smoke`')
    runs = sorted(p for p in (tmp_path/'out'/'runs').iterdir() if (p/'metrics.json').exists())
    assert runs, 'no finished runs'
    for p in runs:
        m = json.loads((p/'metrics.json').read_text())
        prov = m['provenance']
        assert {'config', 'seed', 'git', 'packages', 'host', 'started', 'finished'} <= set(prov), p
        assert list(p.glob('*.ipynb')), f'{p}: executed notebook missing'
    # every table row's numbers come from those runs: the demo table shows the two label ratios
    assert '| 10% |' in table and '| 100% |' in table
    # the MIMIC table: every method row, from runs that started at the smoke MAE encoder, and its t-SNE figure
    assert '| facemix+mscl | dense |' in table and '| mscl | linear |' in table
    assert (tmp_path/'out'/'tables'/'smoke'/'mscl-tsne.png').stat().st_size > 10_000
    ce = json.loads((tmp_path/'out'/'runs'/'smoke-mscl-ce-dense'/'metrics.json').read_text())['provenance']['config']
    assert ce['init'].endswith('smoke-pretrain-mae/encoder.pt')
    # a second call reuses finished runs (nothing re-executed) and renders the same tables
    stamps = {p: (p/'metrics.json').stat().st_mtime_ns for p in runs}
    r2 = run()
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert {p: (p/'metrics.json').stat().st_mtime_ns for p in runs} == stamps
    assert (tmp_path/'out'/'tables'/'smoke.md').read_text() == table
