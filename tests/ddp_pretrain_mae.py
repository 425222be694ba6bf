"""A tiny MAE pre-training under `torchrun` (CPU, gloo) for tests/test_mae.py::test_ddp_pretrain.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_pretrain_mae.py OUT_DIR
Each rank writes OUT_DIR/rank<r>.pt with its final parameters and the images it saw (a bare `fit` run), then the
stage's own entry point `pretrain` runs distributed into OUT_DIR/run.
"""
import sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from ssfer_lib.core import init_distributed, seed_everything
from ssfer_lib.mae import MAEPretrain
from ssfer_lib.pretrain import build_mae, pretrain, pretrain_config, pretrain_lr
from ssfer_lib.train import build_optimizer, build_scheduler, fit

class Images(Dataset):
    "16 fixed random 16-px images; `index` records which ones a rank saw."
    def __init__(self, n=16): self.x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return dict(image=self.x[i], index=i)

class Counting(MAEPretrain):
    "The MAE task, also counting the images seen on this rank."
    def forward(self, batch):
        self.seen.extend(batch['index'].tolist()); return super().forward(batch)

if __name__ == '__main__':
    out = Path(sys.argv[1]); torch.set_num_threads(1)
    rank, world = init_distributed('gloo')
    seed_everything(0 + rank)  # different masks per rank; the same initial weights come from DDP's broadcast
    cfg = pretrain_config('test', batch_size=4, epochs=3, warmup_epochs=1)
    ds = Images(); sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    task = Counting(build_mae(cfg)); task.seen = []
    opt = build_optimizer(task.model, lr=pretrain_lr(cfg.blr, cfg.batch_size, cfg.accum_steps, world),
                          weight_decay=cfg.weight_decay, betas=cfg.betas)
    sched = build_scheduler(opt, epochs=cfg.epochs, steps_per_epoch=len(loader), warmup_epochs=cfg.warmup_epochs, min_lr=0.0, warmup_lr=0.0)
    hist = fit(task, loader, optimizer=opt, scheduler=sched, epochs=cfg.epochs, device='cpu', ckpt_dir=out/'ckpt', progress=False)
    torch.save(dict(params={k: v.detach().clone() for k, v in task.state_dict().items()}, seen=task.seen,
                    losses=[h['train/loss'] for h in hist], world=world), out/f'rank{rank}.pt')
    metrics = pretrain(pretrain_config('test', epochs=2, batch_size=4, device='cpu'), out/'run', progress=False)
    torch.save(dict(metrics_keys=sorted(metrics)), out/f'pretrain_rank{rank}.pt')
    torch.distributed.destroy_process_group()
