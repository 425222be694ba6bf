"""Check the layout rules of STYLE.md on a notebook-first (nbdev) repository; print every violation, exit 1 if any.

    python tools/check_layout.py [ROOT]   # ROOT: the repository (default: this file's parent's parent)

(a) reading order = dependency order: no notebook in nbs/ imports, in an exported cell (function bodies included), the
    module of a later-numbered notebook (`21_mae` < `24_mscl` < `24a_mscl_runs` < `30_train`);
(b) no library module over 400 lines (`_modidx.py` excluded);
(c) no import cycle among the library's modules (imports inside functions count too).
"""
from __future__ import annotations
import ast, configparser, json, re, sys
from pathlib import Path

MAX_LINES = 400  # STYLE.md: a module under ~400 lines


def lib_name(root: Path) -> str:
    "The package name nbdev exports to (`lib_path` in settings.ini; 'ssfer_lib' without one)."
    ini = Path(root)/'settings.ini'
    if not ini.exists(): return 'ssfer_lib'
    cp = configparser.ConfigParser(interpolation=None); cp.read(ini)
    return cp['DEFAULT'].get('lib_path', 'ssfer_lib')


def imported_modules(source: str,  # Python source (a module or a notebook cell)
                     lib: str,  # package name, e.g. 'ssfer_lib'
                    ) -> list[tuple[str, int]]:
    "(module, line) for every import of a module of `lib`, at any depth: `from .x import`, `from lib.x import`, `import lib.x`, `from lib import x`."
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name.split('.')[1], node.lineno) for a in node.names if a.name.startswith(lib + '.')]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 0 and mod != lib and not mod.startswith(lib + '.'): continue  # another package
            parts = mod.split('.')[1:] if node.level == 0 else (mod.split('.') if mod else [])
            if parts: out.append((parts[0], node.lineno))
            else: out += [(a.name, node.lineno) for a in node.names]  # `from . import x`, `from lib import x`: maybe modules
    return out


def _order(stem: str) -> tuple:
    "Sort key of a notebook name: '24a_mscl_runs' -> (24, 'a')."
    m = re.match(r'(\d+)([a-z]*)_', stem)
    return (int(m.group(1)), m.group(2)) if m else (10**9, stem)


def _cells(path: Path) -> list[tuple[int, dict]]:
    "(index among all cells, cell) of a notebook's code cells."
    cells = json.loads(path.read_text(encoding='utf-8')).get('cells', [])
    return [(i, c) for i, c in enumerate(cells) if c.get('cell_type') == 'code']


def _src(cell: dict) -> str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else s


def notebook_modules(nbs: Path) -> dict[str, Path]:
    "module name -> the notebook that exports it (`#| default_exp name`)."
    out = {}
    for p in sorted(Path(nbs).glob('*.ipynb')):
        for _, c in _cells(p):
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', _src(c), re.M)
            if m: out[m.group(1)] = p; break
    return out


def later_imports(nbs: Path,  # the notebooks folder
                  lib: str = 'ssfer_lib',
                 ) -> list[str]:
    "(a) One line per import, in an exported cell, of a later-numbered notebook's module."
    mods = notebook_modules(nbs)
    out = []
    for mod, p in mods.items():
        name = p.relative_to(Path(nbs).parent)
        for i, c in _cells(p):
            src = _src(c)
            if not re.search(r'^#\|\s*export', src, re.M): continue
            src = '\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in src.split('\n'))  # magics are not Python
            try: imports = imported_modules(src, lib)
            except SyntaxError as e:
                out.append(f'{name}: exported cell {i} does not parse ({e.msg}, line {e.lineno})'); continue
            for other, line in imports:
                q = mods.get(other)
                if q is not None and _order(q.stem) > _order(p.stem):
                    out.append(f'{name}: cell {i} line {line} imports {lib}.{other} from later notebook {q.name}')
    return out


def lib_modules(lib_dir: Path) -> dict[str, Path]:
    "module name -> file, for the package's top-level modules (`_modidx.py` excluded)."
    return {p.stem: p for p in sorted(Path(lib_dir).glob('*.py')) if p.name != '_modidx.py'}


def long_modules(lib_dir: Path, max_lines: int = MAX_LINES) -> list[str]:
    "(b) One line per module (any depth, `_modidx.py` excluded) longer than `max_lines`."
    out = []
    for p in sorted(Path(lib_dir).rglob('*.py')):
        n = len(p.read_text(encoding='utf-8').splitlines())
        if p.name != '_modidx.py' and n > max_lines: out.append(f'{p.relative_to(Path(lib_dir).parent)}: {n} lines (limit {max_lines})')
    return out


def import_graph(lib_dir: Path, lib: str) -> dict[str, set[str]]:
    "module -> the package's modules it imports (module level and inside functions)."
    mods = lib_modules(lib_dir)
    return {m: {o for o, _ in imported_modules(p.read_text(encoding='utf-8'), lib) if o in mods and o != m}
            for m, p in mods.items()}


def import_cycles(lib_dir: Path, lib: str = 'ssfer_lib', limit: int = 100) -> list[str]:
    "(c) One line per elementary import cycle ('a -> b -> a'), each listed once from its smallest module."
    g = import_graph(lib_dir, lib)
    cycles = []
    def walk(start, node, path, seen):
        for nxt in sorted(g[node]):
            if len(cycles) >= limit: return
            if nxt == start: cycles.append(path + [start])
            elif nxt > start and nxt not in seen: walk(start, nxt, path + [nxt], seen | {nxt})
    for s in sorted(g): walk(s, s, [s], {s})
    return [f'{Path(lib_dir).name}: import cycle ' + ' -> '.join(c) for c in cycles]


def check_layout(root: str | Path = Path(__file__).resolve().parents[1],  # the repository
                 lib: str | None = None,  # package name (default: settings.ini's lib_path)
                ) -> list[str]:
    "Every violation of (a), (b) and (c), one line each."
    root = Path(root); lib = lib or lib_name(root)
    return later_imports(root/'nbs', lib) + long_modules(root/lib) + import_cycles(root/lib, lib)


if __name__ == '__main__':
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    problems = check_layout(root)
    print('\n'.join(problems) if problems else 'layout OK')
    sys.exit(1 if problems else 0)
