"""A griffe extension for mkdocstrings: the trailing per-parameter comments of our signatures (nbdev's docments,
`mask_ratio: float = 0.75,  # fraction of patches removed`) become the docstring's parameter section, so the API pages
show them as a table with each parameter's type and default. Read with fastcore's `docments` from the imported object,
the same parser nbdev's `show_doc` uses; an object that cannot be imported keeps its docstring as is.
"""
from __future__ import annotations
import dataclasses, importlib, inspect
import griffe


def _runtime(obj: griffe.Object):
    "The live Python object of a griffe object (None when it cannot be imported)."
    try:
        mod = importlib.import_module(obj.module.path)
        for part in obj.path[len(obj.module.path) + 1:].split('.'): mod = getattr(mod, part)
        return mod
    except Exception: return None


def _section(live, names: list[str]) -> str:
    "Google-style `Args:` and `Returns:` from the docments comments of `names` (and of the return annotation)."
    from fastcore.docments import docments
    try: d = docments(live, full=True)
    except Exception: return ''
    args = [f'    {n}: {" ".join(d[n]["docment"].split())}' for n in names if n in d and d[n].get('docment')]
    ret = d.get('return', {}).get('docment') if 'return' in d else None
    out = ('Args:\n' + '\n'.join(args) + '\n') if args else ''
    return out + (f'\nReturns:\n    {" ".join(ret.split())}\n' if ret else '')


def _add(obj: griffe.Object, section: str):
    if not section: return
    text = (obj.docstring.value.rstrip() + '\n\n' if obj.docstring else '') + section
    obj.docstring = griffe.Docstring(text, lineno=obj.docstring.lineno if obj.docstring else None, parent=obj, parser='google',
                                   parser_options=dict(warn_missing_types=False))  # untyped parameters are fine


class Docments(griffe.Extension):
    def on_function_instance(self, *, func: griffe.Function, **kwargs):
        live = _runtime(func)
        if live is None or not callable(live): return
        _add(func, _section(live, [p.name for p in func.parameters if p.name not in ('self', 'cls')]))

    def on_class_members(self, *, cls: griffe.Class, **kwargs):
        live = _runtime(cls)
        if not inspect.isclass(live): return
        if dataclasses.is_dataclass(live): names = [f.name for f in dataclasses.fields(live)]
        else:
            try: names = [n for n in inspect.signature(live.__init__).parameters if n != 'self']
            except (TypeError, ValueError): return
        _add(cls, _section(live, names))
