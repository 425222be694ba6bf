"""Build the documentation site from the notebooks with MkDocs Material, mkdocs-jupyter and mkdocstrings (nbdev's own
docs need Quarto, which cannot be installed on our machines).

    python tools/docs.py                      # = make docs: stage the pages in _proc/docs, build the site into _docs/
    python tools/docs.py --execute '3*'       # also run these notebooks' non-slow cells first, for their figures
    python tools/docs.py --serve              # = make docs-serve: build, then serve on http://127.0.0.1:8000
    python tools/docs.py --store-explore      # run nbs/explore/*.ipynb again and store them with their outputs

Pages: the README (nbs/index.ipynb) as home; every notebook of nbs/ (stored outputs, or executed ones: cached in
_proc/cache by the notebook's hash) and nbs/explore/ (stored, already executed); one API page per module of ssfer_lib
(mkdocstrings; the parameter tables come from the docments comments, tools/griffe_docments.py); "Reproduce the paper"
(presets/*.yaml, the rendered tables outputs/tables/<preset>/*.md when present, else the paper's numbers from
paper/tables.yaml); "Use your own data" (docs/own_data.md with the DATASETS registry's layouts).
"""
from __future__ import annotations
import argparse, fnmatch, hashlib, json, os, re, shutil, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)(.*)$')
_HIDE = {'hide', 'exporti'}  # nbdev hides these cells from its docs


def _src(cell: dict) -> str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else s


def directives(cell: dict) -> dict:
    "nbdev directives (`#| name args`) of a code cell."
    return {m.group(1): m.group(2).strip() for l in _src(cell).split('\n') if (m := _DIRECTIVE.match(l))}


def default_exp(nb: dict) -> str | None:
    for c in nb['cells']:
        if c['cell_type'] == 'code' and 'default_exp' in (d := directives(c)): return d['default_exp'].split()[0]
    return None


def page_notebook(nb: dict,  # a notebook (nbformat dict), its outputs as stored or executed
                  module: str | None = None,  # the module it exports (a link to its API page goes under the title)
                 ) -> dict:
    "The notebook as a docs page: hidden cells dropped, nbdev directive lines removed, a link to its API page."
    cells = []
    for c in nb['cells']:
        c = dict(c)
        if c['cell_type'] == 'code':
            d = directives(c)
            if d.keys() & _HIDE: continue
            c['source'] = '\n'.join(l for l in _src(c).split('\n') if not _DIRECTIVE.match(l)).strip('\n')
            if not c['source'] and not c.get('outputs'): continue
        cells.append(c)
    if module:
        i = next((k for k, c in enumerate(cells) if c['cell_type'] == 'markdown' and _src(c).lstrip().startswith('# ')), -1)
        link = dict(cell_type='markdown', metadata={}, source=f'API of this notebook: [`ssfer_lib.{module}`](../../api/{module}/) '
                    f'(every exported symbol with its parameter table).')
        cells.insert(i + 1, link)
    return dict(nb, cells=cells)


def error_outputs(nb: dict) -> list[str]:
    "One line per error output (or stderr traceback) of a notebook."
    out = []
    for i, c in enumerate(nb.get('cells', [])):
        for o in c.get('outputs', []):
            text = _src(dict(source=o.get('text', '')))
            if o.get('output_type') == 'error': out.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
            elif o.get('name') == 'stderr' and 'Traceback (most recent call last)' in text: out.append(f'cell {i}: traceback on stderr')
    return out


# ---- executing notebooks (nbdev_test's in-process shell, outputs kept) ----

def _exec_one(src: str, dst: str):
    "Run a notebook's cells except those nbdev_test skips (`#| slow`, `#| eval: false`) and save it with its outputs."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    os.environ.pop('MPLBACKEND', None)  # the inline backend captures figures
    nb, sh = read_nb(src), CaptureShell()
    sh.run_cell('%matplotlib inline')
    skip = lambda c: c.cell_type == 'code' and bool(re.search(r'^\s*#\|\s*(slow\b|eval:\s*false)', c.source, re.M))
    os.chdir(Path(src).parent)
    sh.run_all(nb, exc_stop=True, preproc=skip)
    write_nb(nb, dst)


def executed(path: Path, cache: Path) -> Path:
    "The notebook run once per content (cached as `<stem>-<sha>.ipynb`)."
    key = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    dst = cache/f'{path.stem}-{key}.ipynb'
    if not dst.exists():
        cache.mkdir(parents=True, exist_ok=True)
        for old in cache.glob(f'{path.stem}-*.ipynb'): old.unlink()
        tmp = dst.with_suffix('.tmp')
        r = subprocess.run([sys.executable, __file__, '--exec-one', str(path), str(tmp)], capture_output=True, text=True,
                           env={**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'})
        if r.returncode: raise RuntimeError(f'{path.name} failed while executing for the docs:\n{r.stderr[-3000:]}')
        tmp.replace(dst)
    return dst


def run_explore(path: Path, out: Path | None = None, parameters: dict | None = None, timeout: float | None = None) -> dict:
    """Execute an explore notebook with papermill (in its folder), keep it without papermill's and widgets' metadata:
    the cell after each widget draws the default choice, so the stored page shows every figure without a kernel.
    `timeout`: seconds a cell may take (None: no limit) — a lost kernel reply then fails instead of waiting forever."""
    import papermill as pm
    env_backend = os.environ.pop('MPLBACKEND', None)  # the kernel's inline backend captures the figures
    try:
        nb = pm.execute_notebook(str(path), str(out or path), parameters=parameters or {}, kernel_name='python3',
                                 language='python', cwd=str(path.parent), progress_bar=False, execution_timeout=timeout)
    finally:
        if env_backend is not None: os.environ['MPLBACKEND'] = env_backend
    nb.metadata.pop('papermill', None); nb.metadata.pop('widgets', None)
    for c in nb.cells:
        for k in ('papermill', 'execution'): c.metadata.pop(k, None)
        if 'tags' in c.metadata and c.metadata['tags'] == ['injected-parameters']: continue
        c['outputs'] = [o for o in c.get('outputs', []) if 'application/vnd.jupyter.widget-view+json' not in o.get('data', {})]
    import nbformat
    nbformat.write(nb, str(out or path))
    return nb


# ---- generated pages ----

def datasets_table() -> str:
    "The DATASETS registry (nbs/11a_readers) as a Markdown table: name, splits, expected layout."
    from ssfer_lib.readers import DATASETS
    esc = lambda s: str(s).replace('|', '\\|').replace('<', '&lt;').replace('>', '&gt;')
    rows = [f'| `{n}` | {", ".join(s.splits)} | {esc(s.layout)} |' for n, s in sorted(DATASETS.items())]
    return '\n'.join(['| name | splits | layout |', '|---|---|---|', *rows])


def _unlink(md: str, stage: Path, src_dir: Path, dst_dir: Path) -> str:
    "Relative links of a rendered table: images copied beside the page, other targets (run folders) made plain text."
    def fix(m):
        bang, text, target = m.group(1), m.group(2), m.group(3)
        if re.match(r'[a-z]+://|#', target): return m.group(0)
        p = (src_dir/target).resolve()
        if bang and p.is_file():
            dst_dir.mkdir(parents=True, exist_ok=True); shutil.copy2(p, dst_dir/p.name)
            return f'![{text}]({(dst_dir/p.name).relative_to(stage).as_posix()})'
        return text
    return re.sub(r'(!?)\[([^\]]*)\]\(([^)\s]+)\)', fix, md)


def reproduce_page(stage: Path) -> str:
    "Presets, and per table the rendered Markdown of each preset that has it, else the paper's numbers as printed."
    import yaml
    from ssfer_lib.tables import TABLES, paper_tables
    from ssfer_lib.render import md_table, _paper_as_printed
    presets = sorted((ROOT/'presets').glob('*.yaml'))
    out = ['# Reproduce the paper', '',
           '`ssfer reproduce --preset NAME` runs the grid of a preset (`presets/NAME.yaml`) and renders every table into '
           '`outputs/tables/NAME/` (Markdown and LaTeX) and `outputs/NAME/REPORT.md`; `make demo` is '
           '`ssfer reproduce --preset demo`. `--dry-run` prints the plan and its cost without running anything. '
           'The numbers below are the tables rendered on this checkout (each cell: ours / the paper\'s (difference)); '
           'a table no preset has rendered yet shows the paper\'s numbers (`paper/tables.yaml`).', '', '## Presets', '']
    for p in presets:
        y = yaml.safe_load(p.read_text())
        desc = ' '.join(str(y.get('description', '')).split())
        out += [f'### `{p.stem}`', '', desc, '', f'```bash\nssfer reproduce --preset {p.stem} --dry-run\n```', '',
                f'??? note "presets/{p.name}"', '', '    ```yaml', *[f'    {l}' for l in p.read_text().rstrip().split('\n')], '    ```', '']
    out += ['## Tables', '']
    papers = paper_tables()
    for spec in TABLES.values():
        rendered = [(p.stem, f) for p in presets if (f := ROOT/'outputs'/'tables'/p.stem/f'{spec.name}.md').is_file()]
        if rendered:
            for preset, f in rendered:
                md = _unlink(f.read_text(encoding='utf-8'), stage, f.parent, stage/'reproduce'/preset)
                md = re.sub(r'^(#+) ', r'#\1 ', md, flags=re.M)  # its headings one level down, under Tables
                out += [md.rstrip(), '', f'*(preset `{preset}`, `outputs/tables/{preset}/{spec.name}.md`)*', '']
        else:
            t = papers.get(spec.id)
            cap = f"{t['paper'].upper()} Table {t['number']} (§{t['section']}): {t['caption']} — {t['metric']}" if t else spec.title
            out += [f'### {spec.name}: {spec.title}', '', cap, '']
            head, rows = _paper_as_printed(spec)
            out += ['*Not rendered on this checkout yet (`ssfer reproduce --preset demo --tables ' + spec.name + '`). '
                    + ("The paper's numbers:*" if rows else 'A table of ours: no published numbers.*'), '']
            if rows: out += [md_table(head, rows), '']
    return '\n'.join(out) + '\n'


def stage_pages(stage: Path, execute: list[str]) -> dict:
    "Write every page under `stage`; return the navigation."
    sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'tools'))
    from readme import render
    if stage.exists(): shutil.rmtree(stage)
    (stage/'nbs').mkdir(parents=True); (stage/'explore').mkdir(); (stage/'api').mkdir()
    (stage/'index.md').write_text(render(json.loads((ROOT/'nbs'/'index.ipynb').read_text(encoding='utf-8'))), encoding='utf-8')
    nav = [{'Home': 'index.md'}, {'Reproduce the paper': 'reproduce.md'}, {'Use your own data': 'own_data.md'}]
    (stage/'reproduce.md').write_text(reproduce_page(stage), encoding='utf-8')
    own = (ROOT/'docs'/'own_data.md').read_text(encoding='utf-8').replace('{{ datasets_table }}', datasets_table())
    (stage/'own_data.md').write_text(own, encoding='utf-8')
    nbs = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if p.stem != 'index')
    run = [p for p in nbs if any(fnmatch.fnmatch(p.stem, pat) for pat in execute)]
    with ThreadPoolExecutor(2) as ex: done = dict(zip(run, ex.map(lambda p: executed(p, ROOT/'_proc'/'cache'), run)))  # 2 cores
    modules, pages = [], []
    for p in nbs:
        nb = json.loads((done.get(p, p)).read_text(encoding='utf-8'))
        mod = default_exp(nb)
        (stage/'nbs'/p.name).write_text(json.dumps(page_notebook(nb, mod), indent=1), encoding='utf-8')
        pages.append({p.stem: f'nbs/{p.name}'})
        if mod:
            modules.append(mod)
            (stage/'api'/f'{mod}.md').write_text(f'# ssfer_lib.{mod}\n\nFrom [`nbs/{p.name}`](../nbs/{p.name}).\n\n'
                                                 f'::: ssfer_lib.{mod}\n', encoding='utf-8')
    explore = []
    for p in sorted((ROOT/'nbs'/'explore').glob('*.ipynb')):
        shutil.copy2(p, stage/'explore'/p.name); explore.append({p.stem.replace('_', ' '): f'explore/{p.name}'})
    nav += [{'Explore': explore}, {'Notebooks': pages}, {'API': [{m: f'api/{m}.md'} for m in modules]}]
    return nav


def build(site_dir: Path = ROOT/'_docs', execute: list[str] = (), strict: bool = True, serve: str | None = None) -> int:
    import yaml
    stage = ROOT/'_proc'/'docs'
    nav = stage_pages(stage, list(execute))
    cfg = yaml.safe_load((ROOT/'mkdocs.yml').read_text())
    cfg |= dict(docs_dir=str(stage), site_dir=str(Path(site_dir).resolve()), nav=nav)
    for p in cfg.get('plugins', []):  # the handler's paths, relative to the repository
        if isinstance(p, dict) and 'mkdocstrings' in p:
            py = p['mkdocstrings']['handlers']['python']
            py['paths'] = [str(ROOT)]
            py['options']['extensions'] = [str(ROOT/e) if e.endswith('.py') else e for e in py['options'].get('extensions', [])]
    conf = ROOT/'_proc'/'mkdocs.yml'
    conf.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding='utf-8')
    env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1', 'PYTHONPATH': str(ROOT)}
    mk = [sys.executable, '-m', 'mkdocs']
    if serve: return subprocess.call(mk + ['serve', '-f', str(conf), '-a', serve], env=env, cwd=ROOT)
    return subprocess.call(mk + ['build', '-f', str(conf)] + (['--strict'] if strict else []), env=env, cwd=ROOT)


if __name__ == '__main__':
    if sys.argv[1:2] == ['--exec-one']: _exec_one(*sys.argv[2:4]); sys.exit(0)
    if sys.argv[1:2] == ['--store-explore']:  # re-execute nbs/explore/*.ipynb at their own parameters and store them
        for p in sorted((ROOT/'nbs'/'explore').glob('*.ipynb')): print(p.name); run_explore(p)
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--execute', nargs='*', default=[], metavar='GLOB', help="run these notebooks of nbs/ first ('3*', 'all')")
    ap.add_argument('--site-dir', default=str(ROOT/'_docs'))
    ap.add_argument('--no-strict', action='store_true', help='do not fail on warnings (broken links)')
    ap.add_argument('--serve', nargs='?', const='127.0.0.1:8000', help='serve instead of build (ADDRESS:PORT)')
    a = ap.parse_args()
    pats = [x for arg in a.execute for x in re.split(r'[,\s]+', arg) if x and x != 'none']  # 'all' = every notebook
    pats = ['*'] if 'all' in pats else pats
    sys.exit(build(Path(a.site_dir), pats, not a.no_strict, a.serve))
