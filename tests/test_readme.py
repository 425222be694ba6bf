"""README.md is rendered from nbs/index.ipynb by tools/readme.py (nbdev's convention without Quarto)."""
import importlib.util, json, subprocess, sys
from conftest import REPO

_spec = importlib.util.spec_from_file_location('readme_tool', REPO/'tools'/'readme.py')
rt = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(rt)


def test_readme_is_the_index_notebook():
    "README.md is exactly what nbs/index.ipynb renders to: edit the notebook, then `python tools/readme.py`."
    r = subprocess.run([sys.executable, str(REPO/'tools'/'readme.py'), '--check'], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_readme_starts_with_the_two_commands():
    head = '\n'.join((REPO/'README.md').read_text(encoding='utf-8').split('\n')[:40])
    assert 'make demo' in head and 'make test' in head


def test_import_then_render_is_idempotent(tmp_path):
    "--import keeps the README's text (up to blank lines around headings) and a second run changes nothing."
    (tmp_path/'nbs').mkdir()
    md = ('# t\n\nintro\n\n## A\n\n```bash\n## not a heading: inside a fence\nmake x\n```\n\n\n## B\n\ntext\n'
          '  ## indented: not a section\n')
    (tmp_path/'README.md').write_text(md)
    assert rt.main(['--import'], tmp_path) == 0
    nb = json.loads((tmp_path/'nbs'/'index.ipynb').read_text())
    assert [''.join(c['source']).split('\n')[0] for c in nb['cells']] == ['# t', 'intro', '## A', '## B']
    first = (tmp_path/'README.md').read_text()
    assert first == md.replace('```\n\n\n## B', '```\n\n## B')  # only the doubled blank line went
    assert rt.main(['--import'], tmp_path) == 0 and (tmp_path/'README.md').read_text() == first
    assert rt.main(['--check'], tmp_path) == 0
    (tmp_path/'README.md').write_text(first + 'edited by hand\n')
    assert rt.main(['--check'], tmp_path) == 1


def test_render_code_cells():
    "Shown code cells become code blocks with their text output; hidden and exported ones are left out."
    cell = lambda t, s, **k: dict(cell_type=t, source=s, metadata={}, **k)
    nb = dict(cells=[cell('markdown', '# t'), cell('code', '#| hide\nimport os', outputs=[]),
                     cell('code', '1 + 1', outputs=[dict(output_type='execute_result', data={'text/plain': '2'})]),
                     cell('code', '#| export\ndef f(): pass', outputs=[])])
    assert rt.render(nb) == '# t\n\n```python\n1 + 1\n```\n\n```\n2\n```\n'
