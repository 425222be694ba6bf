"""Stage 2 with MIMIC's term (`mix='facemix+mscl'`) under `torchrun` (CPU, gloo), for tests/test_mscl.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_finetune.py OUT_DIR
Each rank runs the stage's entry point `finetune` into OUT_DIR/run and records what it returned.
"""
import sys
from pathlib import Path
import torch
from ssfer_lib.core import init_distributed
from ssfer_lib.finetune import finetune, finetune_config

if __name__ == '__main__':
    out = Path(sys.argv[1]); torch.set_num_threads(1)
    rank, world = init_distributed('gloo')
    cfg = finetune_config('test', mix='facemix+mscl', proj_dim=16, epochs=2, device='cpu', box_root=str(out/'boxes'))
    m = finetune(cfg, out/'run', progress=False)
    torch.save(dict(world=world, keys=sorted(m)), out/f'rank{rank}.pt')
    torch.distributed.destroy_process_group()
