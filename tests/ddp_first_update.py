"""One optimizer step of each stage's task, for tests/test_ddp.py: 2 processes × batch B against 1 process × 2B.

    python tests/ddp_first_update.py OUT_DIR STAGE...                                          # one process, batch 2B
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_first_update.py OUT_DIR STAGE...  # 2 × B
STAGE: mae, finetune, mimic, semi. Each stage's task, model and optimizer come from the stage's own builders (tiny 'test'
presets); the data are fixed random tensors (no augmentation, so both runs see the same pixels) sharded by a
`DistributedSampler` (world size 1 in the single process: the same permutation), and `fit` runs one step. Everything
random inside a step is removed or made a function of the sample, so the two runs must agree:
- drop path off (every `drop_prob` set to 0);
- MAE: each image's mask is drawn from a generator seeded by the image's own content (`random_masking` patched), not from
  the process's RNG stream, whose draws depend on the batch split;
- fine-tuning with `mix='none'` (FaceMix and Mixup pair images within a process batch: the pairs differ with the split);
- MIMIC with method `ce` (its two-view CE branch without mixing; SupCon/MSCL terms contrast within a process batch);
- semi: the EMA teacher (pseudo-labels thresholded per sample, masked CE averaged over the batch) on its SemiLoader.
Writes OUT_DIR/<stage>_w<world>_r<rank>.pt: the task's state after the step, its epoch log and the samples seen.
"""
import sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from ssfer_lib.core import init_distributed, seed_everything
from ssfer_lib.train import fit

B = 4  # per process in the 2-process run; the 1-process run takes 2B
N = 24  # samples in each fixed data set
K = 7

class Fixed(Dataset):
    "Fixed random images (and labels); `two`: dict(weak, strong) pairs of two fixed images."
    def __init__(self, size, two=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(N, 3, size, size, generator=g), torch.randint(K, (N,), generator=g)
        self.x2, self.two = torch.randn(N, 3, size, size, generator=g), two
    def __len__(self): return N
    def __getitem__(self, i):
        a = dict(image=self.x[i], label=self.y[i], index=i)
        return dict(weak=a, strong=dict(image=self.x2[i], label=self.y[i], index=i)) if self.two else a

def loader(ds, world, rank, bs, seed=0):
    return DataLoader(ds, batch_size=bs, sampler=DistributedSampler(ds, world, rank, shuffle=True, seed=seed, drop_last=True), drop_last=True)

def no_drop_path(m):
    for mod in m.modules():
        if hasattr(mod, 'drop_prob'): mod.drop_prob = 0.0
    return m

def content_masking(x, mask_ratio, generator=None):
    "MAE's random_masking with each sample's noise seeded by its own tokens (the same whatever the batch split)."
    Bn, Np, D = x.shape
    Kp = round(Np * (1 - mask_ratio))
    noise = torch.stack([torch.rand(Np, generator=torch.Generator().manual_seed(int(abs(t.sum().item()) * 1e4) % 2**31)) for t in x.detach()])
    ids_shuffle = noise.argsort(dim=1); ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :Kp, None].expand(-1, -1, D))
    mask = torch.ones(Bn, Np); mask[:, :Kp] = 0
    return kept, mask.gather(1, ids_restore), ids_restore

def sgd(task):
    "Plain SGD (lr 1): the update is the gradient itself."
    # The stages' AdamW makes its first step lr·g/|g|, which turns the float rounding of a near-zero gradient into ±lr.
    return torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1.0)

def stage(name, world, rank):
    bs, accum = B * 2 // world, 1
    if name == 'finetune_accum':  # 2 processes × 2 micro-batches of B/2 (no_sync on the first) against 1 × 2B
        name, accum = 'finetune', 2 if world > 1 else 1
        bs = bs // accum
    if name == 'mae':
        import ssfer_lib.mae as mae
        from ssfer_lib.pretrain import build_mae, pretrain_config
        mae.random_masking = content_masking
        cfg = pretrain_config('test'); task = mae.MAEPretrain(no_drop_path(build_mae(cfg)))
        opt = sgd(task)
        ld = loader(Fixed(cfg.img_size), world, rank, bs)
    elif name == 'finetune':
        from ssfer_lib.facemix import none_task
        from ssfer_lib.finetune import finetune_config, finetune_model
        cfg = finetune_config('test', mix='none')
        model = no_drop_path(finetune_model(cfg, K)); task = none_task(model, K, label_smoothing=cfg.label_smoothing)
        opt = sgd(task)
        ld = loader(Fixed(cfg.img_size), world, rank, bs)
    elif name == 'mimic':
        from ssfer_lib.mimic import build_mscl_task, mscl_config, mscl_model
        cfg = mscl_config('test', method='ce')
        task = build_mscl_task(cfg, no_drop_path(mscl_model(cfg)))
        opt = sgd(task)
        ld = loader(Fixed(cfg.img_size, two=True), world, rank, bs)
    elif name == 'semi':
        from ssfer_lib.semi_train import SemiLoader, semi_config, semi_model
        from ssfer_lib.semi import SSL_ALGORITHMS
        cfg = semi_config('ema_teacher', 'test', tau=0.163)  # about half the untrained ViT's confidences (0.157–0.170) pass
        model = no_drop_path(semi_model(cfg, K)); task = SSL_ALGORITHMS['ema_teacher'](model, K, tau=cfg.tau, lambda_u=cfg.lambda_u, ema_decay=0.9)
        opt = sgd(task)
        ld = SemiLoader(loader(Fixed(cfg.img_size), world, rank, bs), loader(Fixed(cfg.img_size, two=True, seed=1), world, rank, bs * 2, seed=1))
    seen = []
    fwd = task.forward
    def forward(batch):  # records the samples each process trained on
        seen.append(_indices(batch)); return fwd(batch)
    task.forward = forward
    from torch.nn.parallel import DistributedDataParallel as DDP
    no_sync, calls = DDP.no_sync, []
    def counted(self): calls.append(1); return no_sync(self)
    DDP.no_sync = counted  # counts the micro-batches `fit` keeps local
    before = {k: v.detach().clone() for k, v in task.state_dict().items()}
    try: hist = fit(task, ld, optimizer=opt, epochs=1, steps_per_epoch=accum, accum_steps=accum, device='cpu', progress=False)
    finally: DDP.no_sync = no_sync
    return dict(state={k: v.detach().clone() for k, v in task.state_dict().items()}, log=hist[0], seen=sum(seen, []), no_sync=len(calls),
                moved=max((v - before[k]).abs().max().item() for k, v in task.state_dict().items() if v.is_floating_point()))

def _indices(batch):
    if 'index' in batch: return batch['index'].tolist()
    if 'weak' in batch: return batch['weak']['index'].tolist()
    return batch['labeled']['index'].tolist() + batch['unlabeled']['weak']['index'].tolist()

if __name__ == '__main__':
    out = Path(sys.argv[1]); torch.set_num_threads(1)
    rank, world = init_distributed('gloo')
    for name in sys.argv[2:]:
        seed_everything(0)  # the same initial weights on every rank and in both runs
        torch.save(stage(name, world, rank), out/f'{name}_w{world}_r{rank}.pt')  # weights_only-safe: tensors, dicts, lists
    if world > 1: torch.distributed.destroy_process_group()
