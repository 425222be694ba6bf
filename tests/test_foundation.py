"""Foundation: atomic writes survive a killed process, the CLI's contract, papermill runs into run directories."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import nbformat, pytest
from conftest import BIN, REPO
from ssfer_lib.core import atomic_write_json, read_metrics, write_metrics, provenance


def ssfer(*args, cwd=None):
    return subprocess.run([str(BIN/'ssfer'), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_atomic_write_survives_sigkill(tmp_path):
    "A process killed (SIGKILL) in the middle of a large atomic write leaves the previous file whole."
    target = tmp_path/'metrics.json'
    atomic_write_json(target, {'acc': 0.5})
    child = textwrap.dedent(f'''
        import time
        from ssfer_lib.core import atomic_write
        def slow(f):
            for i in range(10_000):
                f.write(b'x' * 1000); f.flush(); time.sleep(0.001)
        atomic_write({str(target)!r}, slow)
    ''')
    p = subprocess.Popen([sys.executable, '-c', child])
    deadline = time.time() + 60
    while not any(x.name.endswith('.tmp') and x.stat().st_size > 10_000 for x in tmp_path.iterdir()):
        assert time.time() < deadline and p.poll() is None, 'child never started writing'
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert json.loads(target.read_text()) == {'acc': 0.5}


def test_finished_result_is_never_overwritten(tmp_path):
    write_metrics(tmp_path, {'acc': 0.9}, provenance({'x': 1}, seed=0))
    with pytest.raises(FileExistsError, match='already holds a finished result'):
        write_metrics(tmp_path, {'acc': 0.1}, provenance({'x': 1}, seed=0))
    m = read_metrics(tmp_path)
    assert m['metrics'] == {'acc': 0.9}
    prov = m['provenance']
    assert prov['config'] == {'x': 1} and prov['seed'] == 0 and prov['finished'] is not None
    assert prov['git']['commit'] is None or len(prov['git']['commit']) == 40
    assert prov['packages']['torch']


def test_cli_help_and_version():
    for cmd in ['--help', 'version --help', 'run --help', 'reproduce --help']:
        r = ssfer(*cmd.split())
        assert r.returncode == 0 and 'usage: ssfer' in r.stdout, (cmd, r.stderr)
    r = ssfer('version')
    assert r.returncode == 0 and r.stdout.startswith('ssfer ') and 'torch' in r.stdout


def _toy_notebook(path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('epochs = 2\nout_dir = None', metadata={'tags': ['parameters']}),
        nbformat.v4.new_code_cell(
            'from ssfer_lib.core import write_metrics, provenance\n'
            "write_metrics(out_dir, {'score': epochs * 10}, provenance({'epochs': epochs}, seed=0))")])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, path)


@pytest.mark.slow
def test_ssfer_run_writes_run_dir_and_refuses_to_overwrite(tmp_path):
    _toy_notebook(tmp_path/'toy.ipynb')
    r = ssfer('run', str(tmp_path/'toy.ipynb'), '-p', 'epochs', '3', '--name', 't', '--root', str(tmp_path/'runs'))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['score'] == 30
    run = tmp_path/'runs'/'t'
    assert (run/'toy.ipynb').exists() and (run/'run.json').exists()
    assert read_metrics(run)['provenance']['config'] == {'epochs': 3}
    r = ssfer('run', str(tmp_path/'toy.ipynb'), '-p', 'epochs', '3', '--name', 't', '--root', str(tmp_path/'runs'))
    assert r.returncode == 2 and 'already finished' in r.stderr and 'Traceback' not in r.stderr
    r = ssfer('run', str(tmp_path/'toy.ipynb'), '-p', 'epochs', '4', '--name', 't', '--root', str(tmp_path/'runs'))
    assert r.returncode == 2 and 'other parameters (epochs: 3 → 4)' in r.stderr and 'Traceback' not in r.stderr
    assert read_metrics(run)['metrics']['score'] == 30
    r = ssfer('run', str(tmp_path/'toy.ipynb'), '-p', 'epochs', '4', '--name', 't', '--root', str(tmp_path/'runs'), '--force')
    assert r.returncode == 0 and read_metrics(run)['metrics']['score'] == 40
    assert json.loads((run/'metrics.previous.json').read_text())['metrics']['score'] == 30


def test_cli_errors_are_one_line(tmp_path):
    _toy_notebook(tmp_path/'toy.ipynb')
    r = ssfer('run', str(tmp_path/'toy.ipynb'), '-p', 'epoch', '3', '--root', str(tmp_path/'runs'))
    assert r.returncode == 2 and r.stderr.strip() == "ssfer: error: unknown parameter 'epoch' for toy.ipynb (did you mean 'epochs'?); its parameters: epochs, out_dir"
    r = ssfer('reproduce', '--preset', 'nope')
    assert r.returncode == 2 and r.stderr.strip() == "ssfer: error: unknown preset 'nope'; choose one of: demo, demo-full, ferplus-cpu, paper, smoke"
