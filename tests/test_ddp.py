"""Every stage under torchrun (2 CPU processes, gloo): 2 processes × batch B make the same first update as 1 process × 2B.

The worker is tests/ddp_first_update.py (its docstring says what is fixed so that the two runs must agree)."""
import os, signal, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ['mae', 'finetune', 'finetune_accum', 'mimic', 'semi']

def _run(cmd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)  # its own process group: a hang kills the workers too
    try: _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.communicate(); pytest.fail(f'timed out: {cmd}')
    assert p.returncode == 0, err[-3000:]

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    script = str(ROOT/'tests'/'ddp_first_update.py')
    _run([sys.executable, script, str(out), *STAGES])
    _run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', script, str(out), *STAGES])
    load = lambda s, w, r: torch.load(out/f'{s}_w{w}_r{r}.pt', weights_only=True)
    return {s: (load(s, 1, 0), load(s, 2, 0), load(s, 2, 1)) for s in STAGES}

@pytest.mark.slow
@pytest.mark.parametrize('stage', STAGES)
def test_two_processes_make_the_one_process_update(runs, stage):
    one, r0, r1 = runs[stage]
    # the DistributedSampler split the 2B samples of the one-process batch between the ranks
    assert sorted(r0['seen'] + r1['seen']) == sorted(one['seen']) and not set(r0['seen'][:4]) & set(r1['seen'][:4])
    assert one['moved'] > 1e-3 and r0['moved'] > 1e-3  # the step changed the weights: a real update is compared
    for k, v in one['state'].items():
        assert torch.equal(r0['state'][k], r1['state'][k]), k  # every rank holds the same student, teacher (EMA), buffers
        torch.testing.assert_close(r0['state'][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f'{stage} {k}: {m}')
    # every rank logs the epoch means over all processes' batches, which are the one-process means
    for k, v in one['log'].items():
        if k.startswith('train/'):
            assert r0['log'][k] == r1['log'][k], k
            assert r0['log'][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    if stage == 'semi':  # pseudo-label counts are summed over ranks too, and some pseudo-labels were used
        pl = lambda log: {k: v for k, v in log.items() if k.startswith('pl/')}
        assert pl(r0['log']) == pytest.approx(pl(one['log']), nan_ok=True) and pl(r0['log']) == pytest.approx(pl(r1['log']), nan_ok=True)
        assert 0 < one['log']['train/mask_rate'] < 1
    if stage == 'finetune_accum':  # DDP's no_sync on the micro-batch that does not step, and only there
        assert r0['no_sync'] == r1['no_sync'] == 1
    else: assert r0['no_sync'] == 0

@pytest.mark.slow
def test_semi_train_under_torchrun(tmp_path):
    "The stage-3 entry point (DTM) under torchrun: sharded loaders, the same thresholds/teacher everywhere, per-rank RNG."
    _run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
          str(ROOT/'tests'/'ddp_semi_train.py'), str(tmp_path)])
    r0, r1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in range(2))
    assert r0['world'] == r1['world'] == 2
    assert 'test/acc' in r0['metrics_keys'] and r1['metrics_keys'] == []  # rank 0 evaluates and writes
    import json
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())['metrics']
    # 126 unlabeled images, 16 per process and step: 3 steps per epoch on each of the 2 processes (one process: 7)
    assert r0['steps'] == m['steps'] == 2 * (126 // (16 * 2))
    assert torch.equal(r0['thresholds'], r1['thresholds']) and r0['taus'] == r1['taus']  # all-reduced statistics
    assert r0['loss'] == r1['loss']  # the logged epoch means are over both processes
    # every rank's RNG is in last.pt (they differ: seed + rank) and each rank restores its own
    assert r0['n_rng'] == 2 and not torch.equal(r0['rng'], r1['rng']) and r0['restored'] and r1['restored']
