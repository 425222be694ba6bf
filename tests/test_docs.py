"""The documentation site builds with `mkdocs build --strict`, its pages hold what they promise, no rendered notebook
holds an error, the commands of "Use your own data" work as written, and the explore notebooks run at tiny scale."""
import importlib.util, json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
from conftest import REPO, BIN

pytestmark = pytest.mark.docs
_spec = importlib.util.spec_from_file_location('docs_tool', REPO/'tools'/'docs.py')
docs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(docs)
ENV = {**os.environ, 'PYTHONPATH': str(REPO), 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1', 'NO_MKDOCS_2_WARNING': '1'}


def _text(html: str) -> str:
    return re.sub(r'\s+', ' ', re.sub(r'<[^>]+>', ' ', html)).replace('&#39;', "'").replace('&quot;', '"')


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')
    r = subprocess.run([sys.executable, str(REPO/'tools'/'docs.py'), '--site-dir', str(out)], capture_output=True,
                       text=True, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_site_pages(site):
    from ssfer_lib.readers import DATASETS
    from ssfer_lib.tables import TABLES
    api = _text((site/'api'/'mae'/'index.html').read_text())
    # the docments comment of random_masking's mask_ratio, in the parameter table with its type
    assert re.search(r'mask_ratio float r: fraction of patches removed required', api), api[:2000]
    cfg = _text((site/'api'/'finetune'/'index.html').read_text())
    field = "box_provider str face boxes: 'gt', 'haar', 'yunet', 'yolo', 'fallback' (no detector: the fallback box for every face) 'gt'"
    assert field in cfg, cfg[:3000]  # a dataclass field with its docments comment and its default
    own = _text((site/'own_data'/'index.html').read_text())
    for name, spec in DATASETS.items(): assert name in own and ', '.join(spec.splits) in own, name
    rep = _text((site/'reproduce'/'index.html').read_text())
    for p in (REPO/'presets').glob('*.yaml'): assert f'ssfer reproduce --preset {p.stem} --dry-run' in rep
    for spec in TABLES.values(): assert f'{spec.name}: {spec.title}' in rep, spec.name
    for nb in (REPO/'nbs'/'explore').glob('*.ipynb'): assert (site/'explore'/nb.stem/'index.html').is_file()
    home = (site/'index.html').read_text()
    assert 'make demo' in home and 'make test' in home
    face = (site/'explore'/'01_facemix_playground'/'index.html').read_text()
    assert face.count('data:image/png;base64') >= 2  # the stored figures: the mixed pair, the κ histogram


def test_no_rendered_notebook_has_an_error(site):
    staged = sorted((REPO/'_proc'/'docs').rglob('*.ipynb'))
    assert len(staged) > 30
    bad = {p.name: e for p in staged if (e := docs.error_outputs(json.loads(p.read_text())))}
    assert not bad, bad
    for p in site.rglob('index.html'):
        assert 'Traceback (most recent call last)' not in p.read_text(), p


def test_error_outputs_found():
    nb = dict(cells=[dict(cell_type='code', outputs=[dict(output_type='error', ename='ValueError', evalue='x', traceback=[])]),
                     dict(cell_type='code', outputs=[dict(output_type='stream', name='stderr', text='Traceback (most recent call last):\n')])])
    assert docs.error_outputs(nb) == ['cell 0: ValueError: x', 'cell 1: traceback on stderr']


def test_strict_build_fails_on_a_broken_link(tmp_path):
    "The validation settings of mkdocs.yml make --strict fail on a link to a missing page (plugins left out: fast)."
    import yaml
    cfg = yaml.safe_load((REPO/'mkdocs.yml').read_text())
    cfg['plugins'] = ['search']
    (tmp_path/'docs').mkdir()
    (tmp_path/'docs'/'index.md').write_text('# t\n\nSee [the other page](missing.md).\n')
    cfg |= dict(docs_dir=str(tmp_path/'docs'), site_dir=str(tmp_path/'site'))
    (tmp_path/'mkdocs.yml').write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '-f', str(tmp_path/'mkdocs.yml')],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode != 0 and 'missing.md' in r.stderr, r.stderr
    (tmp_path/'docs'/'index.md').write_text('# t\n')
    r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '-f', str(tmp_path/'mkdocs.yml')],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr


def own_data_blocks():
    "The fenced blocks of docs/own_data.md: ('python', source) and ('bash', command) in page order."
    md = (REPO/'docs'/'own_data.md').read_text()
    out = []
    for lang, body in re.findall(r'```(python|bash)\n(.*?)```', md, re.S):
        if lang == 'python': out.append(('python', body))
        else: out += [('bash', l) for l in body.strip().split('\n') if l.strip() and not l.startswith('#')]
    return out


@pytest.mark.parametrize('runs', [False, pytest.param(True, marks=pytest.mark.slow)], ids=['data', 'runs'])
def test_own_data_commands(tmp_path, runs):
    "Every command of 'Use your own data' works as written, in page order, in an empty folder."
    env = {**ENV, 'PATH': f'{BIN}{os.pathsep}{os.environ["PATH"]}', 'YOLO_OFFLINE': '1'}
    blocks = own_data_blocks()
    assert [k for k, _ in blocks].count('bash') >= 7
    for kind, src in blocks:
        if kind == 'bash' and src.startswith('ssfer run') and not runs: continue
        if kind == 'python': (tmp_path/'make_faces.py').write_text(src); cmd = [sys.executable, 'make_faces.py']
        else: cmd = ['bash', '-c', src]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert r.returncode == 0, f'{src}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}'
    assert len(list((tmp_path/'myfaces'/'train').iterdir())) == 7
    assert (tmp_path/'outputs'/'splits'/'imagefolder-per_class2-seed0.csv').is_file()
    assert list((tmp_path/'outputs'/'boxes').glob('imagefolder-haar-*.csv'))
    if runs:
        for name in ('my-facemix', 'my-semi', 'my-mae'): assert (tmp_path/'outputs'/'runs'/name/'metrics.json').is_file(), name


TINY = {  # each explore notebook at test size (its parameters cell; seconds on a CPU)
    '01_facemix_playground': dict(n_images=8, size=32, i=1, j=2),
    '02_mae_reconstruction': dict(epochs=2, n_train=32, n_show=2, mask_ratios=[0.5, 0.9]),
    '03_semi_dynamics': dict(algorithms=['dtm', 'flexmatch'], epochs=2, steps_per_epoch=2, labels_per_class=2),
    '04_error_analysis': dict(epochs=2, n_train=56, n_test=28, n_examples=2),
}


def test_every_explore_notebook_has_a_tiny_setting():
    assert sorted(p.stem for p in (REPO/'nbs'/'explore').glob('*.ipynb')) == sorted(TINY)


@pytest.mark.parametrize('name', sorted(TINY))
def test_explore_notebook_runs(name, tmp_path):
    "Executed at tiny scale with papermill, no cell fails and the static figures are drawn."
    src = REPO/'nbs'/'explore'/f'{name}.ipynb'
    nb = json.loads(src.read_text())
    params = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
    assert len(params) == 1  # the parameters cell papermill overrides
    for k in TINY[name]: assert re.search(rf'^{k} = ', ''.join(params[0]['source']), re.M), k
    os.environ.setdefault('PYTHONPATH', str(REPO))
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    try: out = docs.run_explore(src, tmp_path/f'{name}.ipynb', TINY[name], timeout=600)
    except (CellTimeoutError, DeadKernelError) as e:  # a kernel reply papermill never received (nteract/papermill#711):
        import warnings                               # once in CI the client waited forever on an idle kernel; run again
        warnings.warn(f'{name}: {type(e).__name__} ({str(e)[:200]}); running it again')
        out = docs.run_explore(src, tmp_path/f'{name}.ipynb', TINY[name], timeout=600)
    assert docs.error_outputs(out) == []
    assert sum('image/png' in o.get('data', {}) for c in out.cells for o in c.get('outputs', [])) >= 2
