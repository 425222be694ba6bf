"""Stage 3 (DTM: class-balanced labeled batches, per-class thresholds, EMA network B) under `torchrun` (CPU, gloo), for
tests/test_ddp.py::test_semi_train_under_torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_semi_train.py OUT_DIR
Each rank runs the stage's entry point `semi_train` into OUT_DIR/run, then restores its own RNG state from `last.pt`
as a resumed run does, and records what it saw.
"""
import sys
from pathlib import Path
import torch
from ssfer_lib.core import init_distributed, load_weights, own_rng_state, set_rng_state
from ssfer_lib.semi_train import semi_config, semi_train

if __name__ == '__main__':
    out = Path(sys.argv[1]); torch.set_num_threads(1)
    rank, world = init_distributed('gloo')
    cfg = semi_config('dtm', 'test', epochs=2, device='cpu')
    m = semi_train(cfg, out/'run', progress=False)
    ck = load_weights(out/'run'/'last.pt')
    torch.manual_seed(1234)  # scramble, then restore as `load_checkpoint` does
    set_rng_state(own_rng_state(ck))
    restored = torch.equal(torch.get_rng_state(), ck['rng_ranks'][rank]['torch'])
    hist = ck['extra']['history']
    torch.save(dict(world=world, metrics_keys=sorted(m), n_rng=len(ck['rng_ranks']), rng=ck['rng_ranks'][rank]['torch'],
                    restored=restored, thresholds=ck['model']['thresholds'], taus=[[h[f'dtm/tau_{c}'] for c in range(7)] for h in hist],
                    steps=hist[-1]['step'], loss=[h['train/loss'] for h in hist]), out/f'rank{rank}.pt')
    torch.distributed.destroy_process_group()
