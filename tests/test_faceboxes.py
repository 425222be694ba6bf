"""Face boxes: providers on SynthFaces and FERPlus, boxes under flip/crop, the box cache, and a YOLO trained from scratch."""
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ssfer_lib.data import load_image
from ssfer_lib.faceboxes import BOX_PROVIDERS, box_quality, compute_boxes, detect_boxes, gt_provider, haar_provider, paired_iou, train_yolo
from ssfer_lib.synthfaces import SynthFaces
from ssfer_lib.transforms import as_box, unbox, weak_view

torch.set_num_threads(1)


def _synth(n=64, split='test', size=64):
    a = SynthFaces(n, split, size=size).arrays()
    return list(a['images']), torch.from_numpy(a['box'])


def _ferplus(root, n=64):
    lines = (root/'FER2013Test'/'label.csv').read_text().splitlines()[:n]
    names = [l.split(',')[0] for l in lines]
    gt = torch.tensor([[float(v) for v in l.split('"')[1].strip('()').split(',')] for l in lines])  # (x, y, w, h)
    gt[:, 2:] += gt[:, :2]
    return [load_image(root/'FER2013Test'/f) for f in names], gt


# ---- real detectors: quality against ground truth (numbers printed with -s) ----

# Haar (a frontal cascade trained on photographs) finds few drawn faces that fill the frame (16 % at 64 px);
# what it finds must still be well placed. YuNet finds most.
@pytest.mark.parametrize('provider,min_det,min_iou', [('haar', 0.05, 0.5), ('yunet', 0.6, 0.7)])
def test_detector_on_synthfaces(provider, min_det, min_iou, yunet_path):
    imgs, gt = _synth()
    kw = dict(model=yunet_path) if provider == 'yunet' else {}
    boxes, _, fb = detect_boxes(BOX_PROVIDERS[provider](**kw), imgs)
    q = box_quality(boxes, gt, fb)
    print(f'\n{provider} on SynthFaces test (64 images, 64 px): {q}')
    assert q['detection_rate'] >= min_det and q['mean_iou_detected'] >= min_iou, q
    assert q['n_fallback'] == int(fb.sum())


@pytest.mark.ferplus
@pytest.mark.parametrize('provider,min_det', [('haar', 0.3), ('yunet', 0.8)])
def test_detector_on_ferplus(provider, min_det, ferplus_root, yunet_path):
    imgs, gt = _ferplus(ferplus_root)
    kw = dict(model=yunet_path) if provider == 'yunet' else {}
    boxes, _, fb = detect_boxes(BOX_PROVIDERS[provider](**kw), imgs)
    q = box_quality(boxes, gt, fb)  # FERPlus's box is the whole 48-px aligned crop
    print(f'\n{provider} on FERPlus test (64 images, 48 px, upscaled to 96): {q}')
    assert q['detection_rate'] >= min_det, q
    assert q['mean_iou_detected'] >= 0.3, q


# ---- boxes follow flips and crops ----

def test_transformed_gt_box_is_exact():
    "The data layer's view moves the box exactly as the pixels: flip mirrors x, a crop shifts it."
    img = torch.zeros(3, 40, 60, dtype=torch.uint8)
    x, b = tv_tensors.Image(img), as_box((10, 5, 30, 25), (40, 60))
    fb = TF.horizontal_flip(b)
    torch.testing.assert_close(unbox(fb), torch.tensor([30., 5, 50, 25]))
    cb = TF.crop(b, top=4, left=8, height=30, width=40)
    torch.testing.assert_close(unbox(cb), torch.tensor([2., 1, 22, 21]))
    view = weak_view(60, scale=(1.0, 1.0), ratio=(1.5, 1.5), flip=1.0)  # full-image "crop", resized square, always flipped
    _, vb = view(x, b)
    torch.testing.assert_close(unbox(vb), torch.tensor([30., 5 * 1.5, 50, 25 * 1.5]))


def test_detected_boxes_follow_flip_and_crop(yunet_path):
    "A detector run on a flipped/cropped image finds the box the transform gives to the ground truth."
    imgs, gt = _synth(48)
    det = BOX_PROVIDERS['yunet'](model=yunet_path)
    found, _, fb = detect_boxes(det, imgs)
    good = [k for k in range(len(imgs)) if not fb[k] and paired_iou(found[k:k + 1], gt[k:k + 1]) > 0.7]
    assert len(good) >= 20, len(good)
    ious = []
    for k in good:
        x, b = tv_tensors.Image(torch.from_numpy(imgs[k]).permute(2, 0, 1)), as_box(gt[k], (64, 64))
        x, b = TF.horizontal_flip(x), TF.horizontal_flip(b)
        x, b = (TF.crop(t, top=4, left=6, height=56, width=54) for t in (x, b))
        box, _, fbk = detect_boxes(det, [x.as_subclass(torch.Tensor)])
        ious.append(np.nan if fbk[0] else paired_iou(box, unbox(b)[None]).item())  # nan: not detected after the crop
    ious = np.array(ious); found = ious[~np.isnan(ious)]
    print(f'\nyunet on {len(good)} flipped+cropped SynthFaces: found again {len(found)}, IoU with the transformed GT '
          f'median {np.median(found):.3f}, >= 0.5 for {np.mean(found >= 0.5):.0%}')
    # the crop cuts into faces that fill the frame, so some are not found again; those found must sit on the moved box
    assert len(found) >= len(good) / 2 and np.median(found) >= 0.7 and np.mean(found >= 0.5) >= 0.75


# ---- the box cache ----

def test_box_cache_is_reused(tmp_path):
    imgs, _ = _synth(20)
    ids = [f'synth/test/{k}' for k in range(20)]
    calls = []
    def counting(**kw):
        det = haar_provider(**kw)
        return lambda images, gt=None: calls.append(len(images)) or det(images, gt)
    with mock.patch.dict(BOX_PROVIDERS, {'haar': counting}):
        first = compute_boxes(imgs, ids, 'synth', 'haar', out_root=tmp_path, batch_size=8, progress=False)
        assert calls == [8, 8, 4] and not first.cached
        second = compute_boxes(imgs, ids, 'synth', 'haar', out_root=tmp_path, batch_size=8, progress=False)
    assert calls == [8, 8, 4], 'the detector ran again on the second call'
    assert second.cached and second.path == first.path and first.path.name.startswith('synth-haar-')
    torch.testing.assert_close(second.boxes, first.boxes)
    assert second.fallback.tolist() == first.fallback.tolist() and second.n_fallback == first.n_fallback
    other = compute_boxes(imgs, ids, 'synth', 'haar', {'min_neighbors': 5}, out_root=tmp_path, progress=False)
    assert other.path != first.path and not other.cached  # other options, other cache file


# ---- YOLO trained from scratch, then used as a provider ----

@pytest.mark.slow
def test_yolo_trained_from_scratch_is_a_provider(tmp_path):
    threads = torch.get_num_threads()
    a = SynthFaces(200, 'train', size=96).arrays()
    res = train_yolo(list(a['images']), a['box'], tmp_path/'yolo', epochs=30, imgsz=96, seed=0)
    assert torch.get_num_threads() == threads, 'ultralytics changed the torch thread count'
    assert Path(res['weights']).exists()
    imgs, gt = _synth(64, 'test', 96)
    fb = compute_boxes(imgs, [f't{k}' for k in range(64)], 'synth96', 'yolo', dict(weights=res['weights']),
                       out_root=tmp_path/'boxes', progress=False)
    q = box_quality(fb.boxes, gt, fb.fallback)
    print(f'\nYOLOv8n from scratch, 30 epochs on 160 SynthFaces (96 px): val mAP50 {res["map50"]:.3f}, '
          f'mAP50-95 {res["map50_95"]:.3f}; as a provider on 64 test images: {q}')
    assert torch.get_num_threads() == threads
    assert res['map50'] >= 0.5 and q['mean_iou'] >= 0.6 and q['detection_rate'] >= 0.8, (res, q)
    (tmp_path/'yolo_quality.json').write_text(json.dumps(dict(train=dict(res, weights=str(res['weights']), run_dir=str(res['run_dir'])), provider=q)))
