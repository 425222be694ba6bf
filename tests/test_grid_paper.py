"""Paper scale: `max_steps` stops the training loop after N optimizer steps, so one paper-preset cell (ViT-B/16 at
224 px, the paper's code path) runs a few steps on a CPU through the grid."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch


def test_fit_stops_after_max_steps_and_still_evaluates_and_saves(tmp_path):
    from ssfer_lib.train import Supervised, fit
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = [dict(image=torch.randn(2, 4), label=torch.tensor([0, 1])) for _ in range(10)]  # 10 batches an epoch
    calls = []
    h = fit(Supervised(model), data, optimizer=torch.optim.SGD(model.parameters(), 0.1), epochs=5, device='cpu', progress=False,
            eval_fn=lambda t: calls.append(1) or {'test/acc': 0.5}, ckpt_dir=tmp_path, max_steps=3)
    assert [e['step'] for e in h] == [3] and len(calls) == 1, h  # one (short) epoch, evaluated
    assert json.loads((tmp_path/'history.json').read_text())[-1]['step'] == 3 and (tmp_path/'last.pt').exists()
    h = fit(Supervised(model), data, optimizer=torch.optim.SGD(model.parameters(), 0.1), epochs=2, device='cpu', progress=False,
            max_steps=15, accum_steps=2)  # 5 steps an epoch, 10 in all: a max_steps beyond the schedule changes nothing
    assert [e['step'] for e in h] == [5, 10]


def test_every_stage_config_and_experiment_notebook_takes_max_steps():
    from ssfer_lib.finetune import FinetuneConfig
    from ssfer_lib.mimic import MSCLConfig
    from ssfer_lib.pretrain import PretrainConfig
    from ssfer_lib.semi_train import SemiConfig
    from ssfer_lib.runner import EXPERIMENTS_DIR, notebook_parameters
    for cfg in (FinetuneConfig, MSCLConfig, PretrainConfig, SemiConfig): assert cfg().max_steps is None, cfg
    for nb in ('finetune', 'semi', 'pretrain_mae', 'mscl'):
        assert notebook_parameters(EXPERIMENTS_DIR/f'{nb}.ipynb')['max_steps'] is None, nb


@pytest.mark.slow
def test_one_paper_preset_cell_runs_a_few_steps_on_cpu(tmp_path):
    "The paper's FaceMix fine-tuning (ViT-B/16, 224 px, from the paper's MAE cell) for 2 steps, its MAE for 1, on CPU."
    code = 'import sys; from ssfer_lib.cli import main; sys.exit(main(sys.argv[1:]))'
    args = ['reproduce', '--preset', 'paper', '--set', 'stand_in', 'synthfaces', '--datasets', 'rafdb', '--tables', 'table_13',
            '--cells', '*finetune-*-r0.1-facemix-iou-L4-mae-*', '--root', str(tmp_path/'out'),
            '-p', 'max_steps', '2', '-p', 'batch_size', '4', '-p', 'n_train', '70', '-p', 'n_test', '14']
    import ssfer_lib  # the child imports the library under test
    env = os.environ | {'PYTHONPATH': str(Path(ssfer_lib.__file__).resolve().parents[1]), 'OMP_NUM_THREADS': '2'}
    r = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=3600)
    runs = tmp_path/'out'/'runs'
    ft = next(runs.glob('paper-finetune-synthfaces-r0.1-facemix-iou-L4-mae-s0*'))
    assert (ft/'metrics.json').exists(), r.stdout[-3000:] + r.stderr[-3000:] + (ft/'cell.log').read_text()[-3000:]
    cfg = json.loads((ft/'metrics.json').read_text())['provenance']['config']
    assert (cfg['model'], cfg['img_size'], cfg['max_steps'], cfg['mix'], cfg['kappa'], cfg['facemix_loss']) == \
        ('vit_base_patch16_224', 224, 2, 'facemix', 'iou', 'L4')
    assert cfg['init'].endswith('/encoder.pt') and 'paper-pretrain_mae-synthfaces' in cfg['init']
    assert json.loads((ft/'history.json').read_text())[-1]['step'] == 2
    mae = json.loads((runs/cfg['init'].split('/')[-2]/'metrics.json').read_text())['metrics']
    assert mae['steps'] == 2 and mae['epochs'] == 600, 'the paper schedule, stopped after max_steps'
    assert r.returncode == 0, r.stdout[-2000:]
    assert sum(1 for p in runs.iterdir()) == 2, 'only the selected cell and its upstream MAE ran'
