"""Convert notebooks to and from a plain-text "percent" form, for editing notebooks outside JupyterLab.

    python tools/nbtext.py to-nb  nbs/00_core.pct.py   # -> nbs/00_core.ipynb (outputs dropped)
    python tools/nbtext.py to-txt nbs/00_core.ipynb    # -> nbs/00_core.pct.py

The .ipynb files are the source of truth and the only ones committed; the text form is a scratch copy.
Cells are separated by lines `# %%` (code) or `# %% [markdown]` (markdown; each line starts with `# `).
"""
import hashlib, re, sys
from pathlib import Path
import nbformat

MD, CODE = '# %% [markdown]', '# %%'

def text_to_nb(text: str) -> nbformat.NotebookNode:
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        src = '\n'.join(buf).strip('\n')
        if kind == 'md':
            src = '\n'.join(re.sub(r'^# ?', '', l) for l in src.split('\n'))
            cells.append(nbformat.v4.new_markdown_cell(src))
        else: cells.append(nbformat.v4.new_code_cell(src))
    for line in text.split('\n'):
        if line.strip() == MD: flush(); kind, buf = 'md', []
        elif line.strip() == CODE: flush(); kind, buf = 'code', []
        else: buf.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'},
                   'language_info': {'name': 'python'}}
    for i, c in enumerate(nb.cells):  # stable ids: nbdev writes them into the exported module
        c['id'] = hashlib.sha1(f'{i}:{c.source}'.encode()).hexdigest()[:8]
    return nb

def nb_to_text(nb) -> str:
    out = []
    for c in nb.cells:
        if c.cell_type == 'markdown':
            out.append(MD); out += ['# ' + l if l else '#' for l in c.source.split('\n')]
        else: out.append(CODE); out.append(c.source)
        out.append('')
    return '\n'.join(out)

if __name__ == '__main__':
    cmd, path = sys.argv[1], Path(sys.argv[2])
    if cmd == 'to-nb':
        dest = Path(str(path).replace('.pct.py', '.ipynb'))
        nbformat.write(text_to_nb(path.read_text()), dest); print(dest)
    elif cmd == 'to-txt':
        dest = path.with_suffix('.pct.py')
        dest.write_text(nb_to_text(nbformat.read(path, as_version=4))); print(dest)
    else: sys.exit(f'unknown command {cmd!r}: use to-nb or to-txt')
