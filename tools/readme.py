"""README.md is rendered from nbs/index.ipynb (nbdev's convention: the index notebook is the README and the docs'
home page). nbdev's own `nbdev_readme` renders through Quarto, which cannot be installed on our machines, so this
does the same for a notebook of Markdown cells (and, if any, code cells without `#| hide`, shown as code blocks).

    python tools/readme.py            # write README.md from nbs/index.ipynb (idempotent)
    python tools/readme.py --check    # exit 1, naming the first differing line, if README.md is out of date
    python tools/readme.py --import   # the other way: README.md -> nbs/index.ipynb (one Markdown cell per `## `
                                      # section), then README.md again from it; for a README edited by hand or merged
"""
from __future__ import annotations
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_DIRECTIVE = re.compile(r'^\s*#\|\s*(\S+)')


def _src(cell: dict) -> str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else s


def render(nb: dict) -> str:
    "The Markdown of a notebook: its Markdown cells as they are, its shown code cells (and text outputs) as code blocks."
    parts = []
    for c in nb['cells']:
        src = _src(c).strip('\n')
        if c['cell_type'] == 'markdown':
            if src.strip(): parts.append(src.rstrip())
        elif c['cell_type'] == 'code':
            lines = src.split('\n')
            if any((m := _DIRECTIVE.match(l)) and m.group(1) in ('hide', 'exporti', 'export', 'exports') for l in lines): continue
            code = '\n'.join(l for l in lines if not _DIRECTIVE.match(l)).strip('\n')
            if code: parts.append(f'```python\n{code}\n```')
            text = ''.join(_src(dict(source=o.get('text', '') or o.get('data', {}).get('text/plain', '')))
                           for o in c.get('outputs', []) if o.get('output_type') in ('stream', 'execute_result'))
            if text.strip(): parts.append(f'```\n{text.rstrip()}\n```')
    return '\n\n'.join(parts) + '\n'


def split_sections(md: str) -> list[str]:
    """Markdown cut before every `## ` heading outside code fences, each piece without its surrounding blank lines; a
    leading `# title` line is a cell of its own (nbdev reads a title cell's `- key: value` lines as front matter)."""
    cells, cur, fence = [], [], None
    for line in md.split('\n'):
        m = re.match(r'^\s*(```+|~~~+)', line)
        if m: fence = None if fence and m.group(1).startswith(fence) else (fence or m.group(1))
        after_title = not cells and len(cur) == 1 and cur[0].startswith('# ')
        if fence is None and (line.startswith('## ') or after_title) and cur: cells.append('\n'.join(cur)); cur = []
        cur.append(line)
    cells.append('\n'.join(cur))
    return [c.strip('\n') for c in cells if c.strip()]


def _lines(text: str) -> list[str]:
    lines = text.split('\n')
    return [l + '\n' for l in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def to_notebook(md: str) -> dict:
    "A notebook of one Markdown cell per section of `md` (nbformat 4, python3 kernel as the other notebooks)."
    cells = [dict(cell_type='markdown', id=f'sec{i:02d}', metadata={}, source=_lines(s)) for i, s in enumerate(split_sections(md))]
    return dict(cells=cells, metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')),
                nbformat=4, nbformat_minor=5)


def _write(path: Path, text: str):
    tmp = path.with_name(path.name + '.tmp'); tmp.write_text(text, encoding='utf-8'); tmp.replace(path)  # atomic


def main(argv: list[str], root: Path = ROOT) -> int:
    nb_path, readme = root/'nbs'/'index.ipynb', root/'README.md'
    if '--import' in argv:
        _write(nb_path, json.dumps(to_notebook(readme.read_text(encoding='utf-8')), indent=1, ensure_ascii=False) + '\n')
    want = render(json.loads(nb_path.read_text(encoding='utf-8')))
    if '--check' in argv:
        have = readme.read_text(encoding='utf-8') if readme.exists() else ''
        if have == want: print('README.md matches nbs/index.ipynb'); return 0
        a, b = have.split('\n'), want.split('\n')
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f'README.md differs from nbs/index.ipynb at line {n + 1}: run `python tools/readme.py` '
              f'(or `python tools/readme.py --import` to keep the README\'s text)', file=sys.stderr)
        return 1
    if not readme.exists() or readme.read_text(encoding='utf-8') != want: _write(readme, want)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
