"""Review fixes of the data layer: face boxes of cached real datasets, short classes of a per-class split, macro-F1."""
import csv
import warnings
from pathlib import Path
import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torchvision.transforms import v2
from ssfer_lib.data import FERDataset
from ssfer_lib.datasets import make_dataset_split
from ssfer_lib.facemix import kappa_iou
from ssfer_lib.faceboxes import compute_boxes, fallback_box, paired_iou
from ssfer_lib.finetune import finetune_config, finetune_data
from ssfer_lib.synthfaces import SynthFaces

H, W, CACHE = 800, 1000, 224  # original images (height, width) and the cached side
FACE, BACKGROUND = 220, 40  # grey levels: the face box is painted bright, so its pixels show where it really is


def known_boxes(n: int = 16) -> np.ndarray:
    "n face boxes (x1, y1, x2, y2) of a 1000 × 800 image; rows 0 and 1 are the same box, row 2 is the reported one."
    rng = np.random.default_rng(0)
    x1, y1 = rng.uniform(0, 600, n).round(), rng.uniform(0, 380, n).round()
    b = np.stack([x1, y1, x1 + rng.uniform(150, 390, n).round(), y1 + rng.uniform(150, 410, n).round()], 1)
    b[1], b[2] = b[0], (5, 5, 305, 305)
    return b


def face_image(path: Path, box, hw=(H, W)):
    "A JPEG with a bright rectangle exactly where the face box is."
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((*hw, 3), BACKGROUND, np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    img[y1:y2, x1:x2] = FACE
    cv2.imwrite(str(path), img)


def fake_affectnet(root: Path, boxes: np.ndarray) -> Path:
    "AffectNet in its original CSV layout (training.csv, validation.csv, Manually_Annotated_Images/)."
    head = ['subDirectory_filePath', 'face_x', 'face_y', 'face_width', 'face_height', 'facial_landmarks', 'expression',
            'valence', 'arousal']
    for name, bxs in (('training.csv', boxes), ('validation.csv', np.tile([[10, 10, 90, 70]], (7, 1)))):
        rows = []
        for i, (x1, y1, x2, y2) in enumerate(bxs):
            rel = f'{i % 3 + 1}/{name[0]}{i:04d}.jpg'
            face_image(root/'Manually_Annotated_Images'/rel, (x1, y1, x2, y2), (H, W) if name == 'training.csv' else (80, 100))
            rows.append([rel, int(x1), int(y1), int(x2 - x1), int(y2 - y1), '', i % 7, 0.1, 0.2])
        with open(root/name, 'w', newline='') as f: csv.writer(f).writerows([head] + rows)
    return root


def fake_rafdb(root: Path, boxes: np.ndarray) -> Path:
    "RAF-DB basic layout (EmoLabel/list_patition_label.txt, Image/aligned/) with the optional boxes.csv."
    lines, rows = [], [('image', 'x1', 'y1', 'x2', 'y2', 'label')]
    for i, b in enumerate(boxes):
        rel = f'Image/aligned/train_{i:05d}_aligned.jpg'
        face_image(root/rel, b); lines.append(f'train_{i:05d}.jpg {i % 7 + 1}'); rows.append((rel, *b, i % 7 + 1))
    for i in range(7):
        face_image(root/f'Image/aligned/test_{i:04d}_aligned.jpg', (10, 10, 90, 70), (80, 100)); lines.append(f'test_{i:04d}.jpg {i + 1}')
    (root/'EmoLabel').mkdir(parents=True)
    (root/'EmoLabel/list_patition_label.txt').write_text('\n'.join(lines) + '\n')
    with open(root/'boxes.csv', 'w', newline='') as f: csv.writer(f).writerows(rows)
    return root


@pytest.fixture(params=['affectnet7', 'rafdb'])
def cached_real(request, tmp_path, monkeypatch):
    "finetune_data on a fake real dataset of 1000 × 800 images cached at 224 px, every output under tmp_path."
    monkeypatch.chdir(tmp_path)  # stage_datasets caches decoded images under ./outputs/cache
    boxes = known_boxes()
    root = (fake_affectnet if request.param == 'affectnet7' else fake_rafdb)(tmp_path/request.param, boxes)
    cfg = finetune_config('test', data=request.param, data_root=str(root), img_size=CACHE, split_kind='ratio', split_value=0.5,
                          box_provider='gt', split_root=str(tmp_path/'splits'), box_root=str(tmp_path/'boxes'))
    return finetune_data(cfg), boxes


def test_gt_boxes_of_a_cached_real_dataset_land_on_the_face(cached_real):
    d, known = cached_real
    lab = d['labeled']
    assert lab.cache['images'].shape[1:3] == (CACHE, CACHE) and (lab.cache['hw'] == (H, W)).all()
    assert d['boxes']['n_fallback'] == 0, d['boxes']  # (the original code replaced 15 of 16 by the fallback)
    raw = FERDataset(lab.samples, None, lab.cache, lab.boxes)  # no view: the box and pixels of the cached image
    expect = known * [CACHE / W, CACHE / H, CACHE / W, CACHE / H]
    for j in range(len(known)):
        item = raw[j]
        np.testing.assert_allclose(item['box'].numpy(), expect[j], atol=1.0, err_msg=f'sample {j}: {lab.samples[j].path}')
        x1, y1, x2, y2 = (int(round(v)) for v in item['box'].numpy())
        face = item['image'][:, y1 + 2:y2 - 2, x1 + 2:x2 - 2].float()
        assert face.mean() > FACE - 10, (j, face.mean())  # the box covers the bright face in the cached pixels


def test_kappa_of_cached_real_boxes(cached_real):
    d, known = cached_real
    raw = FERDataset(d['labeled'].samples, None, d['labeled'].cache, d['labeled'].boxes)
    b = torch.stack([raw[j]['box'] for j in range(4)])
    assert kappa_iou(b[:1], b[1:2]).item() == 0.0  # samples 0 and 1 have the same face box
    iou = paired_iou(torch.tensor(known[[0, 2]], dtype=torch.float32), torch.tensor(known[[3, 3]], dtype=torch.float32))
    np.testing.assert_allclose(kappa_iou(b[[0, 2]], b[[3, 3]]).numpy(), (1 - iou).numpy(), atol=0.02)  # κ = 1 − IoU of the true boxes


def test_views_carry_the_box_the_same_with_and_without_cache(cached_real):
    d, known = cached_real
    lab = d['labeled']
    view = v2.Compose([v2.Resize((64, 64), antialias=True), v2.RandomHorizontalFlip(1.0)])
    s = [64 / W, 64 / H, 64 / W, 64 / H]
    expect = np.stack([64 - known[:, 2] * s[2], known[:, 1] * s[1], 64 - known[:, 0] * s[0], known[:, 3] * s[3]], 1)  # flipped
    cached, uncached = FERDataset(lab.samples, view, lab.cache, lab.boxes), FERDataset(lab.samples, view, None, lab.boxes)
    for j in (0, 2, 5):
        np.testing.assert_allclose(cached[j]['box'].numpy(), expect[j], atol=0.3)
        np.testing.assert_allclose(uncached[j]['box'].numpy(), expect[j], atol=0.3)


def test_ferplus_without_boxes_gets_the_fallback_in_every_frame(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path/'ferplus'
    for folder, n in (('FER2013Train', 16), ('FER2013Valid', 8), ('FER2013Test', 8)):
        (root/folder).mkdir(parents=True)
        rows = []
        for i in range(n):
            cv2.imwrite(str(root/folder/f'fer{i:07d}.png'), np.full((48, 48), 100, np.uint8))
            rows.append([f'fer{i:07d}.png', '(0, 0, 48, 48)'] + [10 if k == i % 8 else 0 for k in range(10)])
        with open(root/folder/'label.csv', 'w', newline='') as f: csv.writer(f).writerows(rows)
    d = finetune_data(finetune_config('test', data='ferplus', data_root=str(root), img_size=32, split_kind='all',
                                      split_root=str(tmp_path/'splits'), box_root=str(tmp_path/'boxes')))
    assert d['boxes']['n_fallback'] == 16
    np.testing.assert_allclose(d['labeled'].boxes, np.tile(fallback_box(48, 48), (16, 1)), atol=0.05)  # original pixels
    raw = FERDataset(d['labeled'].samples, None, d['labeled'].cache, d['labeled'].boxes)
    np.testing.assert_allclose(raw[0]['box'].numpy(), fallback_box(32, 32), atol=0.02)  # cached pixels


def test_synthfaces_boxes_are_the_generators(tmp_path):
    d = finetune_data(finetune_config('test', box_root=str(tmp_path/'boxes')))  # 56 images generated at 16 px
    truth = SynthFaces(56, 'train', 16, 0, 200).arrays()['box']
    np.testing.assert_allclose(d['labeled'].boxes, truth, atol=0.01)


def test_compute_boxes_warns_about_gt_in_another_frame(tmp_path):
    imgs = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.warns(UserWarning, match=r'2 of 3 ground-truth boxes of toy do not fit their images .*\(first: a\)'):
        fb = compute_boxes(imgs, ['a', 'b', 'c'], 'toy', 'gt', gt=[[5, 5, 305, 305], [100, 80, 600, 700], [2, 2, 30, 30]],
                           out_root=tmp_path, progress=False)
    assert fb.n_fallback == 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # boxes that fit: silent
        compute_boxes(imgs, ['a', 'b', 'c'], 'fits', 'gt', gt=[[5, 5, 30, 30], [0, 0, 32, 32], [2, 2, 30, 30]], out_root=tmp_path,
                      progress=False)


# --- a per-class split on a class smaller than the value asked


def rafdb_labels(root: Path, per_class: list[int]) -> Path:
    "A RAF-DB label list (the reader does not open the images) with `per_class[c]` training images of class c."
    (root/'EmoLabel').mkdir(parents=True); (root/'Image/aligned').mkdir(parents=True)
    labels = [c for c, n in enumerate(per_class) for _ in range(n)]
    (root/'EmoLabel/list_patition_label.txt').write_text(''.join(f'train_{i:05d}.jpg {c + 1}\n' for i, c in enumerate(labels)))
    return root


def test_per_class_split_warns_for_a_short_class(tmp_path):
    root = rafdb_labels(tmp_path/'raf', [60, 5, 60, 60, 60, 60, 60])  # Fear (class 2 in the file) has 5 images
    msg = "class 'Fear' has 5 images, fewer than the 50 labels per class asked: all 5 are labeled"
    with pytest.warns(UserWarning) as rec:
        df, _ = make_dataset_split('rafdb', root, 'per_class', 50, 0, root=tmp_path/'splits')
    assert [str(w.message) for w in rec if 'labels per class' in str(w.message)] == [msg]
    assert df[df.label == 1].labeled.sum() == 5 and df.labeled.sum() == 6 * 50 + 5
    with pytest.warns(UserWarning, match=msg):  # a reused split is still short
        make_dataset_split('rafdb', root, 'per_class', 50, 0, root=tmp_path/'splits')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # every class large enough: silent
        make_dataset_split('rafdb', root, 'per_class', 5, 0, root=tmp_path/'splits')


def test_cli_split_prints_the_warning(tmp_path, capsys):
    from ssfer_lib.cli import main
    root = rafdb_labels(tmp_path/'raf', [60, 5, 60, 60, 60, 60, 60])
    assert main(['split', 'rafdb', '--data-root', str(root), '--kind', 'per_class', '--value', '50', '--root', str(tmp_path/'splits')]) == 0
    err = capsys.readouterr().err
    assert err == "ssfer: warning: class 'Fear' has 5 images, fewer than the 50 labels per class asked: all 5 are labeled\n", err


# --- macro-F1: one definition, ABAW's all-classes mean and the present-classes variant


def test_macro_f1_absent_class_counts_zero_and_present_only():
    from ssfer_lib.evaluate import classification_metrics, macro_f1
    t, p = [0, 0, 1, 1], [0, 1, 1, 1]  # F1: class 0 2/3, class 1 4/5, class 2 (no sample, no prediction) 0
    assert macro_f1(t, p, 3) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert macro_f1(t, p, 3, present_only=True) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert classification_metrics(t, p, 3)['macro_f1'] == pytest.approx(22 / 45)
    rng = np.random.default_rng(1)
    for _ in range(30):
        a, b = rng.integers(0, 5, 50), rng.integers(0, 8, 50)  # classes 5..7 never true, sometimes predicted
        assert macro_f1(a, b, 8) == pytest.approx(f1_score(a, b, labels=range(8), average='macro', zero_division=0))
        assert macro_f1(a, b, 8, present_only=True) == pytest.approx(
            f1_score(a, b, labels=np.unique(a), average='macro', zero_division=0))
        assert classification_metrics(a, b, 8)['macro_f1'] == macro_f1(a, b, 8)


def test_one_macro_f1_in_the_library():
    import ssfer_lib.evaluate
    lib = Path(ssfer_lib.evaluate.__file__).parent
    defs = [p.name for p in lib.glob('*.py') if 'def macro_f1(' in p.read_text()]
    assert defs == ['evaluate.py'], defs
