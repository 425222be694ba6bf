"""The reproduction grid on tiny fake experiment notebooks: failures, stale cells, interruption, Slurm (debug), rendering."""
import json, os, re, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

FAKE_NB = '''
import json, pathlib, time
if fail: raise ValueError("injected failure")
time.sleep(sleep)
acc = score + seed / 100
m = {"test/acc": acc, "best_test/test/acc": acc, "last/test/acc": acc - 0.1, "selection": "best_test", "seconds": sleep,
     "init": init}
pathlib.Path(out_dir, "metrics.json").write_text(json.dumps({"metrics": m, "provenance": {"seed": seed}}))
'''

HELPER = '''
"""Fake tables for the grid tests: registered in TABLES when imported."""
import sys
from pathlib import Path
from ssfer_lib.tables import TABLES, Row, Step, TableSpec

NB = str(Path(__file__).parent/'fake.ipynb')
S = lambda init=None, **p: Step(NB, p, init=init, split=False)
SPEC = TableSpec('fake', 'fake', 'A fake table', columns=(('', 'r1'),), rows=(
    Row('a', (S(score=0.6),), label='A', ours_only=True),
    Row('b', (S(score=0.7, fail=FAIL),), label='B', ours_only=True),
    Row('c', (S(score=0.7, fail=FAIL), S('prev', score=0.8)), label='C after B', ours_only=True),
    Row('d', (S(score=0.9, **({'sleep': SLEEP} if SLEEP else {})),), label='D', ours_only=True, multi_seed=True)))
TABLES.pop('fake', None); TABLES.register('fake')(SPEC)  # each test's own tmp notebook (a reload replaces the last test's)
'''


def make_fake(tmp, fail=False, sleep=0.0):
    "A fake notebook, a helper module registering a fake table, and a preset; returns the preset path."
    import nbformat
    params = 'preset = None\ndata = None\ndata_root = None\nseed = 0\ninit = None\nscore = 0.5\nfail = False\nsleep = 0.0\nout_dir = None'
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(params, metadata={'tags': ['parameters']}),
                                         nbformat.v4.new_code_cell(FAKE_NB)])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, tmp/'fake.ipynb')
    (tmp/'fakegrid.py').write_text(HELPER.replace('FAIL', repr(fail)).replace('SLEEP', repr(sleep)))
    (tmp/'fake.yaml').write_text(textwrap.dedent('''\
        description: fake grid
        stage_preset: x
        stand_in: synthfaces
        datasets: [rafdb]
        seeds: {default: [0, 1]}
        timing: {seconds: {fake: 1}}
        slurm: {partition: null, gpus: 0, timeout_min: 5}
        '''))
    return tmp/'fake.yaml'


def cli(tmp, *args, **kw):
    "`ssfer reproduce` with the fake table, in a child process (so it can be interrupted)."
    code = 'import sys, fakegrid; from ssfer_lib.cli import main; sys.exit(main(sys.argv[1:]))'
    import ssfer_lib  # the child imports the library under test
    env = os.environ | {'PYTHONPATH': os.pathsep.join([str(tmp), str(Path(ssfer_lib.__file__).resolve().parents[1]), os.environ.get('PYTHONPATH', '')])}
    argv = [sys.executable, '-c', code, 'reproduce', '--preset', str(tmp/'fake.yaml'), '--tables', 'fake', '--root', str(tmp/'out'), *args]
    # Ctrl-C's default action in the child even when the tests run in the background (a shell's `&` ignores SIGINT)
    reset = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    return subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=reset, **kw)


@pytest.fixture(autouse=True)
def _no_fake_table_after():
    "The fake table and its module leave the registry and sys.path after each test (later test files see only real tables)."
    path = list(sys.path)
    yield
    from ssfer_lib.tables import TABLES
    TABLES.pop('fake', None); sys.modules.pop('fakegrid', None); sys.path[:] = path


def run_cli(tmp, *args):
    p = cli(tmp, *args); out, err = p.communicate(timeout=600)
    return p.returncode, out, err


def fake_plan(tmp, **preset):
    sys.path.insert(0, str(tmp))
    import importlib, fakegrid; importlib.reload(fakegrid)
    from ssfer_lib.reproduce import load_preset, plan_grid
    p = load_preset(str(tmp/'fake.yaml')) | preset
    return plan_grid(p, tmp/'out', tables=['fake'])


def test_failed_cell_is_recorded_dependants_skipped_the_rest_completes(tmp_path):
    make_fake(tmp_path, fail=True)
    rc, out, err = run_cli(tmp_path)
    assert rc == 1, err
    runs = tmp_path/'out'/'runs'
    b, c = 'x-fake-synthfaces-0.7-True-s0', 'x-fake-synthfaces-0.8-from-0.7-True-s0'
    failed = json.loads((runs/b/'failed.json').read_text())
    assert failed['error'].startswith('fake.ipynb failed in cell') and 'ValueError: injected failure' in failed['error']
    assert failed['notebook'] == str(runs/b/'fake.ipynb') and (runs/b/'fake.ipynb').exists()
    assert not (runs/c).exists(), 'the dependant never started'
    for done in ('x-fake-synthfaces-0.6-s0', 'x-fake-synthfaces-0.9-s0', 'x-fake-synthfaces-0.9-s1'):
        assert (runs/done/'metrics.json').exists(), done
    assert f'failed:  {b}: fake.ipynb failed in cell' in out and f'traceback in {runs/b/"fake.ipynb"}' in out, out
    assert f'skipped: {c} (after {b}, which failed)' in out, out
    assert f'FAILED  {b}' in err and 'done    x-fake-synthfaces-0.6-s0  acc 60.00%' in err, err
    assert 'Kernel is running over TCP' not in err + out
    table = (tmp_path/'out'/'tables'/'fake'/'fake.md').read_text()
    assert '| B | failed |' in table and '| C after B | —' not in table, table


def _numbers(md, metric='best_test/test/acc'):
    "Every number of ours in a rendered table, with the metrics.json files its links name."
    cells = []
    for line in md.split('\n'):
        for cell in line.split(' | ')[1:]:
            ms = re.findall(r'\[ⓟ\]\(([^)]+)\)', cell)
            if ms: cells.append((float(re.search(r'(\d+\.\d+)', cell).group(1)), ms))
    return cells


def test_rendered_numbers_equal_the_metrics_of_the_runs_they_name_and_rerun_changes_nothing(tmp_path):
    make_fake(tmp_path)
    rc, out, err = run_cli(tmp_path)
    assert rc == 0, err
    tdir = tmp_path/'out'/'tables'/'fake'
    md = (tdir/'fake.md').read_text()
    cells = _numbers(md)
    assert len(cells) == 4, md
    for shown, files in cells:  # mean over the seeds it links
        vals = [100 * json.loads((tdir/f).read_text())['metrics']['best_test/test/acc'] for f in files]
        assert shown == pytest.approx(round(sum(vals) / len(vals), 2)), (shown, vals)
    assert '90.50 ± 0.71ᵇ ([s0](' in md, md  # two seeds: mean ± sample s.d.
    assert (tmp_path/'out'/'fake'/'REPORT.md').read_text().count('| A |') == 1
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path/'out'/'runs').glob('*/metrics.json')}
    rc, out, err = run_cli(tmp_path)
    assert rc == 0 and '0 to run' in out, out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (tdir/'fake.md').read_text() == md


def test_rendering_fake_metrics_gives_the_expected_markdown(tmp_path):
    from ssfer_lib.render import render_table
    make_fake(tmp_path)
    plan = fake_plan(tmp_path)
    metrics = {c: {'best_test/test/acc': 0.5 + i / 10, 'selection': 'best_test'} for i, c in enumerate(plan.grid.cells)}
    states = {c: ('failed', 'boom') for c in plan.grid.cells}
    del metrics['x-fake-synthfaces-0.7-False-s0']
    md, tex = render_table(plan, plan.tables[0], metrics, states, tmp_path/'out'/'tables'/'fake')
    r = '../../runs/x-fake-synthfaces-'
    assert md.split('\n\n')[2] == '\n'.join([
        '|  | synthfaces all labels |', '|---|---|',
        f'| A | [50.00]({r}0.6-s0) [ⓟ]({r}0.6-s0/metrics.json)ᵇ |',
        '| B | failed |',
        f'| C after B | [70.00]({r}0.8-from-0.7-False-s0) [ⓟ]({r}0.8-from-0.7-False-s0/metrics.json)ᵇ |',
        f'| D | 85.00 ± 7.07ᵇ ([s0]({r}0.9-s0) [ⓟ]({r}0.9-s0/metrics.json), [s1]({r}0.9-s1) [ⓟ]({r}0.9-s1/metrics.json)) |']), md
    assert 'A & 50.00\\textsuperscript{b} \\\\' in tex, tex


@pytest.mark.slow
def test_a_changed_parameter_marks_the_cell_and_its_dependants_stale(tmp_path):
    from ssfer_lib.reproduce import grid_status
    make_fake(tmp_path)
    assert run_cli(tmp_path)[0] == 0
    nb = tmp_path/'fake.ipynb'  # a default of the notebook changes: every cell's full config changes
    time.sleep(0.01); nb.write_text(nb.read_text().replace('sleep = 0.0', 'sleep = 0.01'))
    st = grid_status(fake_plan(tmp_path).grid)
    assert st['x-fake-synthfaces-0.6-s0'] == ('stale', 'started with another config (sleep: 0.0 → 0.01)'), st
    assert st['x-fake-synthfaces-0.8-from-0.7-False-s0'][0] == 'stale'
    before = (tmp_path/'out'/'runs'/'x-fake-synthfaces-0.6-s0'/'metrics.json').read_text()
    rc, out, err = run_cli(tmp_path)
    assert rc == 1 and 'stale:   x-fake-synthfaces-0.6-s0 (started with another config; --force runs it again)' in out, out
    assert (tmp_path/'out'/'runs'/'x-fake-synthfaces-0.6-s0'/'metrics.json').read_text() == before, 'a stale cell is never run silently'
    assert 'stale' in (tmp_path/'out'/'tables'/'fake'/'fake.md').read_text()
    rc, out, err = run_cli(tmp_path, '--force')
    assert rc == 0, out + err
    assert (tmp_path/'out'/'runs'/'x-fake-synthfaces-0.6-s0'/'metrics.previous.json').read_text() == before
    assert all(s == 'done' for s, _ in grid_status(fake_plan(tmp_path).grid).values())


@pytest.mark.slow
def test_interrupted_grid_finishes_on_rerun_without_rerunning_finished_cells(tmp_path):
    make_fake(tmp_path, sleep=6.0)  # D's cells take a while: the grid is interrupted inside the first of them
    p = cli(tmp_path, start_new_session=True)
    runs, deadline = tmp_path/'out'/'runs', time.time() + 300
    while not (runs/'x-fake-synthfaces-0.9-6.0-s0'/'running.json').exists():
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    finished = {f: f.stat().st_mtime_ns for f in runs.glob('*/metrics.json')}
    assert finished, 'cells before D finished'
    os.kill(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)  # a loaded machine takes a while to stop the kernels
    assert p.returncode == 130 and 'interrupted' in out, out + err
    assert not (runs/'x-fake-synthfaces-0.9-6.0-s0'/'metrics.json').exists()
    rc, out, err = run_cli(tmp_path)
    assert rc == 0, out + err
    assert '2 to run' in out, out  # D at seeds 0 (interrupted) and 1 (not started): only what was missing
    assert all(f.stat().st_mtime_ns == t for f, t in finished.items())
    table = (tmp_path/'out'/'tables'/'fake'/'fake.md').read_text()
    (tmp_path/'again').mkdir(); make_fake(tmp_path/'again', sleep=6.0)
    assert run_cli(tmp_path/'again')[0] == 0
    assert (tmp_path/'again'/'out'/'tables'/'fake'/'fake.md').read_text() == table, 'the same tables as an uninterrupted grid'


def test_submitit_debug_executor_runs_a_two_cell_grid(tmp_path):
    from ssfer_lib.launch import grid_summary, run_grid
    from ssfer_lib.reproduce import grid_status
    make_fake(tmp_path)
    plan = fake_plan(tmp_path, tables=['fake'])
    cells = ['x-fake-synthfaces-0.7-False-s0', 'x-fake-synthfaces-0.8-from-0.7-False-s0']  # B, then C from B's best.pt
    plan.grid.cells = {c: plan.grid.cells[c] for c in cells}
    r = run_grid(plan, grid_status(plan.grid), launcher='slurm', cluster='debug', progress=False)
    assert r['done'] == sorted(cells) and grid_summary(plan, r)[1] == 0, r
    m = json.loads((plan.grid.path(cells[1])/'metrics.json').read_text())['metrics']
    assert m['init'] == str(plan.grid.path(cells[0])/'best.pt')  # the upstream cell's checkpoint path
    assert list((plan.grid.path(cells[0])/'submitit').glob('*')), 'submitit kept its job files in the run folder'


def test_dry_run_of_the_paper_preset_plans_the_full_grid_with_gpu_hours(tmp_path):
    from ssfer_lib.cli import main
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()) as f:
        assert main(['reproduce', '--preset', 'paper', '--dry-run', '--root', str(tmp_path)]) == 0
    out = f.getvalue()
    n = int(re.search(r'(\d+) cell\(s\) in', out).group(1))
    assert n > 300, out[:2000]  # every dataset and label setting of the paper's columns
    assert re.search(r'to run: \d+ cell\(s\), estimated .* = [\d.]+ GPU-hours', out), out[-3000:]
    assert 'paper-pretrain_mae-affectnet' in out and 'paper-pretrain_mae-affectnet8' not in out  # AffectNet-7 and -8 share one MAE
    assert 'paper-kfold-rafdb-r0.05-ssfer-mae-s0' in out and 'paper-gwo-affectnet8-r0.01-mae-s0' in out  # the analysis tables
    assert not (tmp_path/'runs').exists(), 'a dry run writes nothing'


def test_a_multi_process_cell_runs_under_torchrun_with_rank_0_keeping_the_books(tmp_path):
    "What a multi-GPU Slurm job does, on 2 CPU processes: torchrun starts the cell twice; rank 0 records, rank 1 follows."
    import nbformat
    from ssfer_lib.core import atomic_write_json
    from ssfer_lib.launch import slurm_cell
    code = ('import json, os, pathlib\nrank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))\n'
            'pathlib.Path(out_dir, f"seen{rank}").write_text(str(world))\n'
            'if rank == 0: pathlib.Path(out_dir, "metrics.json").write_text(json.dumps({"metrics": {"test/acc": 0.5}, "provenance": {}}))')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('out_dir = None', metadata={'tags': ['parameters']}),
                                         nbformat.v4.new_code_cell(code)])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, tmp_path/'ddp.ipynb')
    cell = tmp_path/'runs'/'c'; cell.mkdir(parents=True)
    atomic_write_json(cell/'cell.json', dict(notebook=str(tmp_path/'ddp.ipynb'), params={}, key='k', canonical={}, deps=[],
                                             force=False, cwd=str(tmp_path)))
    r = slurm_cell(str(cell), gpus=2)
    assert r['ok'], (cell/'cell.log').read_text()[-3000:]
    assert (cell/'seen0').read_text() == (cell/'seen1').read_text() == '2', 'both ranks ran the notebook in one group of 2'
    assert (cell/'rank1.ipynb').exists() and (cell/'ddp.ipynb').exists() and json.loads((cell/'run.json').read_text())['grid']['key'] == 'k'
