"""GPU options of every stage (`StageConfig.compile`, `channels_last`, `fused_optimizer`), run on CPU with a tiny ViT: each
trains, and none changes what is computed beyond float rounding. Also: the training views (`CropView`) give the pixels
of the torchvision v2 pipeline they replace."""
import random
import shutil

import numpy as np
import pytest
import torch

from ssfer_lib.train import Supervised, build_optimizer, fit
from ssfer_lib.vit import create_vit

torch.set_num_threads(1)


def _vit():
    torch.manual_seed(0)  # no stochastic depth, no dropout: eager and compiled draw no random numbers
    return create_vit('vit_tiny_patch16_224', num_classes=3, img_size=8, patch_size=4, depth=1, embed_dim=16, num_heads=2,
                      drop_path_rate=0.0)


def _batches(n=2, b=8):
    g = torch.Generator().manual_seed(1)
    return [dict(image=torch.randn(b, 3, 8, 8, generator=g), label=torch.randint(3, (b,), generator=g)) for _ in range(n)]


def _fit(fused=None, **kw):
    "Per-step losses and the parameters after `fit` of the tiny ViT on two batches."
    task = Supervised(_vit()); losses = []
    class Logged(Supervised):
        def forward(self, batch):
            out = super().forward(batch); losses.append(out['loss'].detach().item()); return out
    task = Logged(task.model)
    opt = build_optimizer(task.model, lr=1e-3, fused=fused, device='cpu')
    fit(task, _batches(), optimizer=opt, epochs=1, device='cpu', progress=False, **kw)
    return losses, torch.cat([p.detach().flatten() for p in task.model.parameters()]), task.model


def test_fused_adamw_first_update_equals_default():
    "torch supports fused AdamW on CPU since 2.4; its first update equals the foreach one (our CPU default) within 1e-6."
    base, fused = _fit(fused=False), _fit(fused=True)
    assert base[0][0] == fused[0][0]  # the same first loss: the optimizer acts after it
    def first_update(f):
        m = _vit(); o = build_optimizer(m, lr=1e-3, fused=f, device='cpu')
        Supervised(m)(_batches(1)[0])['loss'].backward(); o.step()
        return torch.cat([p.detach().flatten() for p in m.parameters()])
    p0 = torch.cat([p.detach().flatten() for p in _vit().parameters()])
    loop = first_update(False); f = first_update(True)
    assert (loop - p0).abs().max() > 1e-4  # the update is not empty
    torch.testing.assert_close(f, loop, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused[1], base[1], atol=1e-5, rtol=0)  # and after two steps


def test_fused_none_is_foreach_on_cpu_and_fused_on_cuda():
    m = _vit()
    assert build_optimizer(m, lr=1e-3, device='cpu').defaults['foreach'] is True
    assert build_optimizer(m, lr=1e-3, device='cuda').defaults['fused'] is True  # decided by the training device
    with pytest.raises(ValueError, match='applies to adam and adamw'):
        build_optimizer(m, lr=1e-3, opt='sgd', fused=True)


def test_channels_last_same_losses():
    base, cl = _fit(), _fit(channels_last=True)
    w = cl[2].patch_embed.proj.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()  # the option took effect
    np.testing.assert_allclose(cl[0], base[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cl[1], base[1], atol=1e-5, rtol=0)


def _compile_works() -> str | None:
    "None when torch.compile can build CPU kernels here, else why not."
    if shutil.which('gcc') is None and shutil.which('cc') is None: return 'torch.compile on CPU needs a C compiler (no gcc/cc on PATH)'
    try: torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as e: return f'torch.compile fails on this machine: {type(e).__name__}: {str(e)[:200]}'
    return None


@pytest.mark.slow  # compiling even this one-block ViT takes 30-80 s on a shared 2-core CPU
def test_compile_same_losses(monkeypatch):
    why = _compile_works()
    if why: pytest.skip(why)
    compiled, real = [], torch.compile
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: compiled.append(m) or real(m, **kw))
    base = _fit(); assert not compiled
    comp = _fit(compile=True); assert len(compiled) == 1  # fit compiled the task's forward once
    np.testing.assert_allclose(comp[0], base[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(comp[1], base[1], atol=1e-4, rtol=0)


def test_stage_configs_carry_the_options():
    from ssfer_lib.finetune import FinetuneConfig
    from ssfer_lib.mimic import MSCLConfig
    from ssfer_lib.pretrain import PretrainConfig
    from ssfer_lib.semi_train import SemiConfig
    for cls in (FinetuneConfig, MSCLConfig, PretrainConfig, SemiConfig):
        c = cls()
        assert (c.compile, c.channels_last, c.fused_optimizer) == (False, False, None), cls


@pytest.mark.parametrize('strong,direct', [(False, True), (True, True), (False, False)])
def test_training_views_equal_the_v2_pipeline(strong, direct, monkeypatch):
    "The dataset's weak/strong views (CropView) give the v2 pipeline's pixels for the same seeds (direct uint8 resize or torchvision's kernel)."
    import ssfer_lib.transforms
    monkeypatch.setattr(ssfer_lib.transforms, '_UINT8_RESIZE', direct and ssfer_lib.transforms._UINT8_RESIZE)
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from ssfer_lib.transforms import NORMS, RandAugmentV2, as_box, normalize, strong_view, unbox, weak_view
    view = strong_view(16) if strong else weak_view(16)
    ref = v2.Compose([v2.RandomResizedCrop(16, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), antialias=True), v2.RandomHorizontalFlip(0.5)]
                     + ([view.randaug] if strong else []) + [normalize('fer')])
    g = torch.Generator().manual_seed(0)
    for k in range(20):
        img = torch.randint(0, 256, (24, 20, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
        box = [2., 3., 15., 18.]
        torch.manual_seed(k); random.seed(k); np.random.seed(k); a, ab = ref(tv_tensors.Image(img), as_box(box, (24, 20)))
        torch.manual_seed(k); random.seed(k); np.random.seed(k); c, cb = view(img, torch.tensor(box))
        assert torch.equal(a.as_subclass(torch.Tensor), c), k
        torch.testing.assert_close(cb, unbox(ab), atol=1e-4, rtol=0)
