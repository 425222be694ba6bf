"""SIGINT/SIGTERM at a random step of each stage (MAE pre-training, fine-tuning, semi-supervised, MIMIC) stops it with one
line saying what `last.pt` keeps; running it again resumes and ends with exactly the metrics of an uninterrupted run.

The child process is this file run as a script: it trains a stage's 'test' preset on CPU with deterministic algorithms
and one thread, printing `step n` after every optimizer step; at step `at` it waits until the parent's signal arrived."""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest

HERE = Path(__file__).resolve()
SECONDS = ('seconds', 'train_seconds')  # wall-clock times: the only values allowed to differ


def _stage(name: str, out: str) -> dict:
    if name == 'pretrain':
        from ssfer_lib.pretrain import pretrain, pretrain_config
        return pretrain(pretrain_config('test'), out, progress=False)
    if name == 'finetune':
        from ssfer_lib.finetune import finetune, finetune_config
        return finetune(finetune_config('test'), out, progress=False)
    if name == 'semi':
        from ssfer_lib.semi_train import semi_config, semi_train
        return semi_train(semi_config('ema_teacher', 'test'), out, progress=False)
    from ssfer_lib.mimic import mscl_config, mscl_experiment
    return mscl_experiment(mscl_config('test'), out, progress=False)


def _child(name: str, out: str, at: int) -> int:
    import torch
    from ssfer_lib.core import Interrupted, stop_requested
    torch.use_deterministic_algorithms(True); torch.set_num_threads(1)
    steps = [0]
    def hook(opt, args, kwargs):
        steps[0] += 1
        print(f'step {steps[0]}', flush=True)
        t0 = time.time()
        while steps[0] == at and not stop_requested() and time.time() - t0 < 120: time.sleep(0.01)  # the parent signals now
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(hook)
    try: m = _stage(name, out)
    except Interrupted as e:
        print(f'interrupted: {e}', flush=True); return 128 + e.signum
    print('metrics ' + json.dumps({k: v for k, v in m.items() if k not in SECONDS}, default=str), flush=True)
    return 0


def run_stage(name, out, cwd, at=0, sig=signal.SIGINT):
    "Run a stage in a child; with `at`, send `sig` when it reports step `at`. Returns (exit code, stdout lines)."
    log = Path(cwd)/f'stderr-{time.time_ns()}.txt'
    with open(log, 'w') as errf:  # a file, not a pipe: a full pipe would block the child
        p = subprocess.Popen([sys.executable, str(HERE), name, str(out), str(at)], cwd=cwd, stdout=subprocess.PIPE,
                             stderr=errf, text=True)
        lines = []
        for line in p.stdout:
            lines.append(line.rstrip('\n'))
            if at and lines[-1] == f'step {at}': p.send_signal(sig)
        p.wait(timeout=60)
    err = log.read_text()
    assert 'Traceback' not in err, err[-3000:]
    return p.returncode, lines


def metrics_of(lines):
    m = [l for l in lines if l.startswith('metrics ')]
    assert len(m) == 1, lines[-20:]
    return json.loads(m[0][len('metrics '):])


@pytest.mark.slow
@pytest.mark.parametrize('name, sig', [('pretrain', signal.SIGINT), ('finetune', signal.SIGTERM),
                                       ('semi', signal.SIGINT), ('mimic', signal.SIGTERM)])
def test_kill_at_a_random_step_and_resume(tmp_path, name, sig):
    rc, ref = run_stage(name, tmp_path/'straight', tmp_path)
    assert rc == 0, ref[-20:]
    total = sum(l.startswith('step ') for l in ref)
    epochs = json.loads((tmp_path/'straight'/'history.json').read_text())[-1]['epoch']
    at = random.randint(total // epochs + 1, total)  # after the first epoch, so that there is a checkpoint to resume from
    out = tmp_path/'killed'
    rc, lines = run_stage(name, out, tmp_path, at, sig)
    done = json.loads((out/'history.json').read_text())[-1]['epoch']
    assert rc == 128 + sig, (at, rc, lines[-5:])
    assert lines[-1] == (f'interrupted: {signal.Signals(sig).name} stopped training at step {at} ({done}/{epochs} epochs done); '
                         f'{out/"last.pt"} keeps epoch {done}, where the same run resumes'), (at, lines[-3:])
    assert done == min(at * epochs // total, epochs) and not (out/'metrics.json').exists(), (at, done)
    assert not list(out.glob('.*.tmp')), list(out.glob('.*.tmp'))  # no half-written file left
    rc, again = run_stage(name, out, tmp_path)  # the same command: resumes
    assert rc == 0, again[-20:]
    assert sum(l.startswith('step ') for l in again) == total - done * total // epochs  # the dropped partial epoch only
    a, b = metrics_of(ref), metrics_of(again)
    for m in (a, b):
        m.pop('encoder', None)  # a path into each run folder
        m.get('boxes', {}).pop('cached', None)  # the first run computed the box cache, the others read it
    assert a == b, (at, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})


@pytest.mark.slow
def test_ssfer_run_sigint_reaches_the_kernel_and_the_same_command_resumes(tmp_path):
    "Ctrl-C to `ssfer run` (papermill keeps the kernel out of the terminal's reach) stops `fit` cleanly; re-running resumes."
    from conftest import BIN
    cmd = [str(BIN/'ssfer'), 'run', 'finetune', '-p', 'preset', 'test', '-p', 'epochs', '20', '--root', 'runs']
    ssfer = lambda name, **kw: subprocess.Popen(cmd + ['--name', name], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, **kw)
    ref = ssfer('straight'); ref_out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, ref_out[-2000:]
    p, run = ssfer('stopped'), tmp_path/'runs'/'stopped'
    t0 = time.time()
    while not (run/'last.pt').exists() and p.poll() is None and time.time() - t0 < 600: time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, (p.returncode, err[-3000:])
    lines = [l for l in err.strip().splitlines() if 'Kernel is running over TCP' not in l]  # jupyter's harmless warning
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    done = json.loads((run/'history.json').read_text())[-1]['epoch']
    assert 0 < done < 20 and not (run/'metrics.json').exists(), done
    assert lines[0].startswith('ssfer: interrupted: finetune.ipynb: SIGINT stopped training at step '), lines[0]
    assert f'({done}/20 epochs done); {run.resolve()/"last.pt"} keeps epoch {done}, where the same run resumes; ' in lines[0], lines[0]
    assert lines[0].endswith('to resume, run the same command again: ssfer ' + ' '.join(cmd[1:]) + ' --name stopped'), lines[0]
    again = ssfer('stopped'); again_out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, again_out[-2000:]
    a, b = (json.loads((tmp_path/'runs'/n/'metrics.json').read_text())['metrics'] for n in ('straight', 'stopped'))
    for m in (a, b):
        for k in SECONDS: m.pop(k, None)
        m['boxes'].pop('cached')
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.mark.slow
def test_a_signal_between_two_cells_starts_no_further_cell(tmp_path):
    "An idle kernel ignores SIGINT, so `ssfer run` itself starts no further cell once it got one."
    import nbformat
    from conftest import BIN
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('out_dir = None', metadata={'tags': ['parameters']}),
        nbformat.v4.new_code_cell('import os, signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)  # as if idle\n'
                                  'os.kill(os.getppid(), signal.SIGINT); time.sleep(3)'),
        nbformat.v4.new_code_cell("open(os.path.join(out_dir, 'ran.txt'), 'w').write('the third cell ran')")])
    nbformat.write(nb, tmp_path/'toy.ipynb')
    r = subprocess.run([str(BIN/'ssfer'), 'run', str(tmp_path/'toy.ipynb'), '--root', 'runs', '--name', 'toy'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stderr.strip().splitlines() if 'Kernel is running over TCP' not in l]
    assert r.returncode == 130 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    assert lines[0].startswith('ssfer: interrupted: toy.ipynb: stopped before cell '), lines[0]
    assert lines[0].endswith(f'; to resume, run the same command again: ssfer run {tmp_path/"toy.ipynb"} --root runs --name toy'), lines[0]
    assert not (tmp_path/'runs'/'toy'/'ran.txt').exists()


if __name__ == '__main__':
    sys.exit(_child(sys.argv[1], sys.argv[2], int(sys.argv[3])))
