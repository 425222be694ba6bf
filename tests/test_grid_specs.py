"""The table specs against paper/tables.yaml: every published number has a spec cell, every spec cell finds its number."""
from ssfer_lib.tables import TABLES, paper_tables, table_spec


def test_every_paper_table_has_one_spec():
    ids = [t.id for t in TABLES.values()]
    assert len(ids) == len(set(ids)), 'one spec per table'
    assert set(paper_tables()) <= set(ids), sorted(set(paper_tables()) - set(ids))


def test_no_orphan_and_no_missing_rows():
    "A row the paper produced itself (`source: ours`) is declared by its spec; every declared paper row exists."
    for tid, t in paper_tables().items():
        spec = table_spec(tid)
        declared = {r.key: r for r in spec.rows}
        keys = {r['key'] for r in t['rows']}
        missing = [k for k in declared if k not in keys and not declared[k].ours_only]
        assert not missing, f'{tid}: spec rows not in the paper: {missing}'
        if spec.needs: continue  # the whole table waits for a feature: every row is shown with its paper value
        orphans = [r['key'] for r in t['rows'] if r['source'] == 'ours' and r['key'] not in declared]
        assert not orphans, f'{tid}: rows of the paper\'s own method without a spec row: {orphans}'
        for r in t['rows']:  # a reported row is shown as reported (or declared with our run beside it)
            if r['source'] == 'reported' and r['key'] in declared: assert declared[r['key']].reported, (tid, r['key'])


ANALYSIS = ('ssfer-t01', 'ssfer-t03', 'ssfer-t05', 'ssfer-t06', 'ssfer-t07', 'ssfer-t08', 'ssfer-t09', 'ssfer-t16')


def test_every_paper_value_of_the_analysis_tables_is_used_by_a_spec():
    "No orphan: each published number of SSFER Tables 1, 3, 5–9, 16 is a cell of a declared row (ours beside it) or of a reported row."
    for tid in ANALYSIS:
        spec, t = table_spec(tid), paper_tables()[tid]
        assert not spec.needs, (tid, spec.needs)
        declared = {r.key: r for r in spec.rows}
        for prow in t['rows']:
            row = declared.get(prow['key'])
            if row is None:  # not declared: shown with its published values, as reported
                assert prow['source'] == 'reported', (tid, prow['key'])
                continue
            for col in t['columns']:
                if prow['values'].get(col['key']) is None: continue
                f = row.fields.get(col['key'])
                ours = (col.get('dataset') and (row.steps or row.needs)) or (f is not None and (f.steps or row.steps or row.needs or f.minus))
                assert ours, (tid, prow['key'], col['key'])
                if f is not None and f.minus: assert all(k in row.fields for k in f.minus), (tid, prow['key'])


def test_runnable_rows_reach_every_paper_column_they_have_values_for():
    "Each runnable row's paper values sit in columns with a dataset and a label setting the grid can run, or in its fields."
    from ssfer_lib.tables import label_code, split_params
    for tid, t in paper_tables().items():
        spec = table_spec(tid)
        if spec.needs: continue
        for row in spec.rows:
            if not row.steps or row.ours_only: continue
            prow = next(r for r in t['rows'] if r['key'] == row.key)
            for col in t['columns']:
                if prow['values'].get(col['key']) is None or col['key'] in row.fields: continue
                assert col.get('dataset'), (tid, row.key, col['key'])
                code = row.labels or label_code(col.get('labels')) or spec.paper_labels
                assert code and split_params(code), (tid, row.key, col['key'])


def test_no_two_cells_of_a_preset_compute_the_same_thing():
    "Cells are shared by id; two ids with the same full config (same key) would compute one run twice."
    from ssfer_lib.reproduce import grid_datasets, load_preset, plan_grid
    for name in ('demo', 'smoke', 'paper'):
        p = load_preset(name)
        plan = plan_grid(p, '/tmp/nowhere', grid_datasets(p))
        keys = [c.key for c in plan.grid.cells.values()]
        assert len(keys) == len(set(keys)), name
        assert all(s.cell or s.reason or next(r for r in plan.rows[s.table] if r.key == s.row).reported for s in plan.slots)


def test_every_paper_value_of_a_runnable_row_finds_its_cell_in_the_paper_grid():
    "In the paper preset, each published number of a row we run sits in a slot with a cell (or says what it needs)."
    from ssfer_lib.reproduce import grid_datasets, load_preset, plan_grid
    p = load_preset('paper')
    plan = plan_grid(p, '/tmp/nowhere', grid_datasets(p))
    slots = {(s.table, s.row, s.column.key): s for s in plan.slots}
    for spec in plan.tables:
        t = paper_tables().get(spec.id)
        if not t or spec.needs: continue
        for row in plan.rows[spec.name]:
            if not row.steps or row.ours_only: continue
            prow = next(r for r in t['rows'] if r['key'] == row.key)
            for col, v in prow['values'].items():
                if v is None or (col in row.fields and row.fields[col].minus): continue  # a derived number has no run
                s = slots.get((spec.name, row.key, col))
                assert s is not None, (spec.id, row.key, col)
                assert s.cell or s.reason.startswith('not run yet — needs'), (spec.id, row.key, col, s.reason)
