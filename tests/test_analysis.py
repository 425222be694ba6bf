"""Tests of the analysis layer (SSFER §4.6–4.9): params/FLOPs by hand, grey wolf optimization and its resume,
Grad-CAM regions and region-restricted FGSM, k-fold, label-noise tables."""
import json
import math
import pytest
import torch
from torch import nn
from ssfer_lib.complexity import linear_macs, model_complexity, param_counts, torch_flops
from ssfer_lib.gwo import gwo_minimize


# ---------------------------------------------------------------- params and FLOPs (Table 6)
def test_tiny_vit_flops_equal_hand_count():
    S, P, L, d, K = 16, 4, 2, 48, 7  # image side, patch, blocks, width, classes
    n = (S // P) ** 2; T = n + 1  # patches, tokens (+ class token)
    conv = n * d * 3 * P * P  # patch embedding: one d-vector per patch from 3·P² pixels
    block = T * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)  # qkv, proj, fc1, fc2 on every token
    attn = 2 * T * T * d  # QKᵀ and AV over all heads
    head = d * K  # class token only
    macs = conv + L * block + head
    c = model_complexity('vit_tiny_patch16_224', img_size=S, num_classes=K, patch_size=P, depth=L, embed_dim=d, num_heads=3)
    assert round(c['macs_g'] * 1e9) == macs
    assert round(c['flops_g'] * 1e9) == 2 * (macs + L * attn)  # torch: 2 FLOPs per multiply-add, attention included
    # parameters by hand: conv, cls + pos, blocks, final norm, head
    blk = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    params = (3 * P * P * d + d) + (d + T * d) + L * blk + 2 * d + (d * K + K)
    assert round(c['params_m'] * 1e6) == params and round(c['params_leaf_m'] * 1e6) == params - d - T * d


def test_attention_counted_on_cpu():
    "torch's flop counter has no formula for the CPU flash-attention kernel: ours must count it."
    q = torch.randn(2, 3, 7, 8)
    class A(nn.Module):
        def forward(self, q): return nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch_flops(A(), q) == 2 * 2 * (2 * 3 * 7 * 7 * 8)


def test_linear_macs_and_leaf_params():
    m = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 16, 5))  # 6×6 → 4×4 outputs
    assert linear_macs(m, torch.zeros(1, 4, 6, 6)) == 6 * 16 * 2 * 9 + 96 * 5  # a group sees 4/2 input channels
    n = 6 * 2 * 9 + 6 + 96 * 5 + 5
    assert param_counts(m) == dict(params=n, params_leaf=n)


# ---------------------------------------------------------------- GWO (Table 16)
SPHERE = lambda p: sum(v * v for v in p.values())
BOX = {k: (-10.0, 10.0) for k in 'abc'}


def test_gwo_finds_sphere_minimum():
    r = gwo_minimize(SPHERE, BOX, budget=300, n_wolves=10, seed=1)
    assert r['n_evals'] == 300 and r['best_value'] < 1e-4  # from values up to 300 at the start
    assert all(abs(v) < 1e-2 for v in r['best'].values())
    shifted = gwo_minimize(lambda p: (p['a'] - 3) ** 2 + (p['b'] + 2) ** 2 + (p['c'] - 5) ** 2, BOX, 400, 10, seed=1)
    assert abs(shifted['best']['a'] - 3) < 0.05 and abs(shifted['best']['b'] + 2) < 0.05 and abs(shifted['best']['c'] - 5) < 0.05


def test_gwo_resume_equals_uninterrupted(tmp_path):
    state, calls = tmp_path/'gwo.json', []
    def dies(p):
        if len(calls) == 11: raise KeyboardInterrupt  # interrupted in the middle of the third pack
        calls.append(p); return SPHERE(p)
    with pytest.raises(KeyboardInterrupt): gwo_minimize(dies, BOX, budget=25, n_wolves=4, seed=7, state_path=state)
    assert len(json.loads(state.read_text())['evaluations']) == 11
    again = []
    resumed = gwo_minimize(lambda p: again.append(p) or SPHERE(p), BOX, budget=25, n_wolves=4, seed=7, state_path=state)
    assert len(again) == 14  # only the missing evaluations
    assert resumed == gwo_minimize(SPHERE, BOX, budget=25, n_wolves=4, seed=7)
    assert resumed != gwo_minimize(SPHERE, BOX, budget=25, n_wolves=4, seed=8)  # the seed matters
    # a finished state file returns the same result without evaluating anything
    assert gwo_minimize(lambda p: 1 / 0, BOX, budget=25, n_wolves=4, seed=7, state_path=state) == resumed
    with pytest.raises(ValueError, match='budget: 25 → 26'):
        gwo_minimize(SPHERE, BOX, budget=26, n_wolves=4, seed=7, state_path=state)


def test_gwo_log_scale_stays_in_bounds():
    seen = []
    gwo_minimize(lambda p: seen.append(p['lr']) or -math.log10(p['lr']), dict(lr=(1e-5, 1e-3)), 40, 5, log_scale=['lr'])
    assert all(1e-5 * (1 - 1e-9) <= v <= 1e-3 * (1 + 1e-9) for v in seen)
    assert min(seen) < 1.1e-5  # pushed to the lower bound (the objective decreases with lr)
