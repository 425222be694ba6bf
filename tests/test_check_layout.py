"""tools/check_layout.py finds each kind of layout violation in small fake repositories, and passes a clean one."""
import importlib.util, subprocess, sys
import nbformat
from conftest import REPO

_spec = importlib.util.spec_from_file_location('check_layout', REPO/'tools'/'check_layout.py')
cl = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(cl)


def notebook(path, module, *exported, plain=()):
    "A notebook exporting `module`: one `#| export` cell per source in `exported`, plus unexported cells `plain`."
    cells = [nbformat.v4.new_code_cell(f'#| default_exp {module}')]
    cells += [nbformat.v4.new_code_cell('#| export\n' + s) for s in exported]
    cells += [nbformat.v4.new_code_cell(s) for s in plain]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)


def clean_repo(root):
    "core <- config <- train (each imports only earlier notebooks' modules); modules short; no cycle."
    (root/'settings.ini').write_text('[DEFAULT]\nlib_path = fakelib\n')
    notebook(root/'nbs'/'00_core.ipynb', 'core', 'import os')
    notebook(root/'nbs'/'01_config.ipynb', 'config', 'from fakelib.core import x',
             plain=['from fakelib.train import fit'])  # an example cell may use anything
    notebook(root/'nbs'/'24a_train.ipynb', 'train', 'from .config import y\ndef f():\n    import fakelib.core')
    lib = root/'fakelib'; lib.mkdir()
    (lib/'__init__.py').write_text('')
    (lib/'core.py').write_text('import os\n')
    (lib/'config.py').write_text('from .core import x\n')
    (lib/'train.py').write_text('from .config import y\ndef f():\n    import fakelib.core\n' + '\n' * 397)  # 400 lines: at the limit
    (lib/'_modidx.py').write_text('d = {}\n' * 1000)  # nbdev's index is exempt
    return root


def test_clean_layout_passes(tmp_path):
    root = clean_repo(tmp_path)
    assert cl.check_layout(root) == []
    r = subprocess.run([sys.executable, str(REPO/'tools'/'check_layout.py'), str(root)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == 'layout OK', r.stdout + r.stderr


def test_import_of_a_later_notebook(tmp_path):
    root = clean_repo(tmp_path)
    notebook(root/'nbs'/'00_core.ipynb', 'core', 'import os',
             'def g():\n    from fakelib.train import fit  # inside a function: still a dependency')
    notebook(root/'nbs'/'01_config.ipynb', 'config', 'from .core import x\nimport fakelib.train')
    v = cl.later_imports(root/'nbs', 'fakelib')  # lines count from the cell's `#| export`
    assert v == ['nbs/00_core.ipynb: cell 2 line 3 imports fakelib.train from later notebook 24a_train.ipynb',
                 'nbs/01_config.ipynb: cell 1 line 3 imports fakelib.train from later notebook 24a_train.ipynb'], v


def test_numbering_with_letters(tmp_path):
    "24 < 24a < 24b < 30: a lettered notebook is later than its number and earlier than the next."
    root = clean_repo(tmp_path)
    notebook(root/'nbs'/'24_a.ipynb', 'a', 'from fakelib.b import z')
    notebook(root/'nbs'/'24b_b.ipynb', 'b', 'from fakelib.train import fit')  # 24a_train: earlier, fine
    v = cl.later_imports(root/'nbs', 'fakelib')
    assert v == ['nbs/24_a.ipynb: cell 1 line 2 imports fakelib.b from later notebook 24b_b.ipynb'], v


def test_long_module(tmp_path):
    root = clean_repo(tmp_path)
    (root/'fakelib'/'config.py').write_text('from .core import x\n' + 'y = 1\n' * 400)
    assert cl.long_modules(root/'fakelib') == ['fakelib/config.py: 401 lines (limit 400)']


def test_import_cycle(tmp_path):
    root = clean_repo(tmp_path)
    (root/'fakelib'/'core.py').write_text('import os\ndef late():\n    from fakelib import train  # function-level\n')
    assert cl.import_cycles(root/'fakelib', 'fakelib') == ['fakelib: import cycle config -> core -> train -> config',
                                                           'fakelib: import cycle core -> train -> core']
    r = subprocess.run([sys.executable, str(REPO/'tools'/'check_layout.py'), str(root)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout.strip().splitlines() == [
        'fakelib: import cycle config -> core -> train -> config', 'fakelib: import cycle core -> train -> core'], r.stdout


def test_imported_modules_forms():
    src = ('import os, fakelib.a\nfrom fakelib.b.sub import x\nfrom .c import y\nfrom . import d\nfrom fakelib import e\n'
           'from other.fakelib import f\nfrom fakelibx import g\ndef h():\n    from ..i import j\n')
    assert [m for m, _ in cl.imported_modules(src, 'fakelib')] == ['a', 'b', 'c', 'd', 'e', 'i']


def test_this_repository_reads_in_order():
    "The re-cut: no notebook imports a later one, no module over 400 lines, no import cycle (tools/check_layout.py)."
    r = subprocess.run([sys.executable, str(REPO/'tools'/'check_layout.py')], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == 'layout OK', r.stdout + r.stderr
