"""Stage 1 (MAE pre-training): the "Done when" checks of issue 5 on a 16-px, 2-block ViT."""
import json, math, os, signal, subprocess, sys
from pathlib import Path
import pytest
import torch
from ssfer_lib.core import load_weights
from ssfer_lib.mae import MAEPretrain, MaskedAutoencoder, patchify, random_masking, unpatchify
from ssfer_lib.pretrain import build_mae, pretrain_config
from ssfer_lib.vit import load_encoder, save_encoder
from ssfer_lib.train import build_optimizer, build_scheduler, fit

ROOT = Path(__file__).parents[1]

def tiny_mae(seed=0, **kw) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return build_mae(pretrain_config('test', **kw))

def batches(n=3, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(image=torch.randn(bs, 3, 16, 16, generator=g)) for _ in range(n)]

@pytest.mark.parametrize('n,r', [(16, 0.75), (10, 0.75), (196, 0.75), (196, 0.9), (49, 0.6), (7, 0.5)])
def test_masking_keeps_round_n_times_one_minus_r(n, r):
    x = torch.randn(5, n, 3)
    kept, mask, ids_restore = random_masking(x, r, torch.Generator().manual_seed(n))
    k = round(n * (1 - r))
    assert kept.shape == (5, k, 3)
    assert torch.equal(mask.sum(1), torch.full((5,), float(n - k)))
    for b in range(5):  # the kept tokens are exactly the unmasked ones (as sets of rows)
        vis = x[b][mask[b] == 0]
        assert torch.equal(vis[vis[:, 0].argsort()], kept[b][kept[b][:, 0].argsort()])
    assert torch.equal(ids_restore.sort(1).values, torch.arange(n).expand(5, n))

@pytest.mark.parametrize('shape,p', [((2, 3, 16, 16), 4), ((1, 3, 224, 224), 16), ((2, 1, 8, 12), 2)])
def test_unpatchify_inverts_patchify(shape, p):
    x = torch.randn(shape)
    grid = (shape[2] // p, shape[3] // p)
    assert torch.equal(unpatchify(patchify(x, p), p, grid), x)

@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_only_on_masked_patches(norm_pix):
    mae = tiny_mae(norm_pix_loss=norm_pix)
    imgs = batches(1)[0]['image']
    with torch.no_grad():
        latent, mask, ids = mae.forward_encoder(imgs, 0.75, torch.Generator().manual_seed(0))
        pred = mae.forward_decoder(latent, ids)
        base = mae.forward_loss(imgs, pred, mask)
        noisy = pred + torch.randn_like(pred) * 10 * (1 - mask)[..., None]   # perturb visible-patch predictions only
        assert torch.equal(mae.forward_loss(imgs, noisy, mask), base)
        moved = pred + (mask * 0.5)[..., None]                               # perturb masked-patch predictions
        assert not torch.equal(mae.forward_loss(imgs, moved, mask), base)
    # and no gradient reaches the prediction of a visible patch
    pred = pred.clone().requires_grad_(True)
    mae.forward_loss(imgs, pred, mask).backward()
    assert pred.grad[mask == 0].abs().max() == 0 and pred.grad[mask == 1].abs().max() > 0

def test_loop_checkpoint_loads_into_timm_classifier(tmp_path):
    task = MAEPretrain(tiny_mae())
    opt = build_optimizer(task.model, lr=1e-3, betas=(0.9, 0.95))
    fit(task, batches(), optimizer=opt, epochs=1, device='cpu', ckpt_dir=tmp_path, progress=False,
        extra=dict(vit=task.model.encoder_kwargs))
    ck = load_weights(tmp_path/'last.pt')
    enc_keys = {k.removeprefix('model.encoder.') for k in ck['model'] if k.startswith('model.encoder.')}
    clf = load_encoder('vit_tiny_patch16_224', tmp_path/'last.pt', num_classes=7, img_size=16, drop_path_rate=0.0)
    assert enc_keys == set(clf.state_dict()) - {'head.weight', 'head.bias'}        # no missing encoder key
    for k, v in clf.state_dict().items():
        if k in enc_keys: assert torch.equal(v, ck['model'][f'model.encoder.{k}']), k
    assert clf(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    # without saved ViT arguments the caller gives them; a wrong architecture is refused with the key lists
    save_encoder(tmp_path/'enc.pt', task.model)
    with pytest.raises(KeyError, match='missing keys 12'):
        load_encoder('vit_tiny_patch16_224', tmp_path/'enc.pt', img_size=16, depth=3)

def test_official_mae_layout_loads_and_interpolates(tmp_path):
    mae = tiny_mae()
    sd = {k.removeprefix('encoder.'): v for k, v in mae.state_dict().items()}   # the layout of mae_pretrain_vit_base.pth
    assert {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'norm.weight', 'mask_token',
            'decoder_embed.weight', 'decoder_pos_embed', 'decoder_blocks.0.mlp.fc1.weight', 'decoder_pred.bias'} <= set(sd)
    torch.save({'model': sd}, tmp_path/'mae_pretrain_vit_test.pth')
    kw = dict(patch_size=4, depth=2, embed_dim=48, num_heads=3, drop_path_rate=0.0)
    clf = load_encoder('vit_tiny_patch16_224', tmp_path/'mae_pretrain_vit_test.pth', img_size=16, **kw).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(clf.forward_features(x), mae.encoder.eval().forward_features(x))
    big = load_encoder('vit_tiny_patch16_224', tmp_path/'mae_pretrain_vit_test.pth', img_size=32, **kw)
    assert big.pos_embed.shape == (1, 1 + 64, 48) and torch.equal(big.pos_embed[0, 0], sd['pos_embed'][0, 0])
    sd['blocks.0.attn.qkv.weight'] = sd['blocks.0.attn.qkv.weight'][:, :8]; sd['extra.weight'] = torch.zeros(1)
    torch.save({'model': sd}, tmp_path/'bad.pth')
    with pytest.raises(KeyError, match=r"unexpected keys 1 \['extra.weight'\].*shape mismatches 1 \['blocks.0.attn.qkv.weight"):
        load_encoder('vit_tiny_patch16_224', tmp_path/'bad.pth', img_size=16, **kw)

def test_timm_weights_by_name_fail_clearly_when_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path/'hf')); monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    import huggingface_hub.constants as c; monkeypatch.setattr(c, 'HF_HUB_CACHE', str(tmp_path/'hf'))
    with pytest.raises(FileNotFoundError, match='not cached locally'):
        load_encoder('vit_base_patch16_224', 'timm:vit_base_patch16_224.mae')
    with pytest.raises(KeyError, match='no pretrained weights'):
        load_encoder('vit_base_patch16_224', 'timm:vit_base_patch16_224.nope')

def test_timm_weights_by_name_load_from_the_cache(monkeypatch, tmp_path):
    "A cached timm checkpoint (safetensors, timm key layout, no head) is read like any other."
    from safetensors.torch import save_file
    import ssfer_lib.vit as vit_mod  # encoder loading lives with the ViT
    mae = tiny_mae()
    save_file({k: v.contiguous() for k, v in mae.encoder.state_dict().items()}, str(tmp_path/'model.safetensors'))
    monkeypatch.setattr(vit_mod, '_timm_weights', lambda name: tmp_path/'model.safetensors')
    clf = load_encoder('vit_tiny_patch16_224', 'timm:vit_tiny_patch16_224.fake', img_size=32, patch_size=4, depth=2,
                       embed_dim=48, num_heads=3)
    assert torch.equal(clf.blocks[1].attn.proj.weight, mae.encoder.blocks[1].attn.proj.weight)
    assert clf.pos_embed.shape == (1, 1 + 64, 48)

def _run(ckpt_dir, crash_after=None):
    "3 epochs of 3 steps; `crash_after` epochs raise from on_epoch_end (after the checkpoint is saved)."
    torch.manual_seed(0)
    task = MAEPretrain(tiny_mae())
    opt = build_optimizer(task.model, lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    sched = build_scheduler(opt, epochs=3, steps_per_epoch=3, warmup_epochs=1, min_lr=0.0, warmup_lr=0.0)
    losses, orig = [], task.forward
    def forward(batch):
        out = orig(batch); losses.append(out['loss'].item()); return out
    task.forward = forward
    def crash(epoch, log):
        if epoch + 1 == crash_after: raise RuntimeError('simulated crash')
    try:
        hist = fit(task, batches(), optimizer=opt, scheduler=sched, epochs=3, device='cpu', ckpt_dir=ckpt_dir,
                   on_epoch_end=crash, progress=False)
    except RuntimeError: return losses, None, None
    return losses, hist, {k: v.clone() for k, v in task.state_dict().items()}

def test_resume_gives_the_same_loss_sequence(tmp_path):
    full, hist_a, state_a = _run(tmp_path/'a')
    first, none, _ = _run(tmp_path/'b', crash_after=1)
    assert none is None and (tmp_path/'b'/'last.pt').exists()
    rest, hist_b, state_b = _run(tmp_path/'b')
    assert len(first) == 3 and len(rest) == 6
    assert first + rest == full                                  # every step's loss, bit for bit
    assert [h['train/loss'] for h in hist_a] == [h['train/loss'] for h in hist_b]
    for k in state_a: assert torch.equal(state_a[k], state_b[k]), k

@pytest.mark.slow
def test_ddp_pretrain_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(ROOT/'tests'/'ddp_pretrain_mae.py'), str(tmp_path)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)   # its own process group: a hang kills the workers too
    try: _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.communicate(); pytest.fail('torchrun timed out')
    assert p.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in range(2))
    assert r0['world'] == r1['world'] == 2
    assert sorted(r0['seen'][:8] + r1['seen'][:8]) == list(range(16))  # epoch 1: the sampler split the data
    for k in r0['params']: assert torch.equal(r0['params'][k], r1['params'][k]), k   # gradients were all-reduced
    assert all(math.isfinite(l) for l in r0['losses']) and r0['losses'] == r1['losses']  # logged means over both ranks (all-reduced)
    clf = load_encoder('vit_tiny_patch16_224', tmp_path/'ckpt'/'last.pt', img_size=16, patch_size=4, depth=2,
                       embed_dim=48, num_heads=3)
    assert torch.equal(clf.blocks[0].attn.qkv.weight, r0['params']['model.encoder.blocks.0.attn.qkv.weight'])
    # the stage entry point under torchrun: rank 0 writes the outputs, the lr is scaled by the world size
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())['metrics']
    assert m['world_size'] == 2 and m['steps'] == 2 * 56 // 8 and m['lr'] == pytest.approx(1e-3 * 4 * 2 / 256)
    assert {'encoder.pt', 'loss.png', 'reconstruction.png'} <= {p.name for p in (tmp_path/'run').iterdir()}
    assert torch.load(tmp_path/'pretrain_rank1.pt', weights_only=True)['metrics_keys'] == []
