"""`ssfer predict`: a fine-tuned checkpoint classifies a folder of images exactly as `evaluate` does, smooths a video's
per-frame classes by the sliding-window vote, finds several faces with YuNet, and refuses bad input in one line."""
import contextlib, io, os, subprocess
from pathlib import Path
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader
from conftest import BIN
from ssfer_lib.cli import main
from ssfer_lib.data import FERDataset, load_image
from ssfer_lib.evaluate import evaluate, predict as predict_logits
from ssfer_lib.finetune import finetune, finetune_config
from ssfer_lib.predict import crop, face_finder, load_classifier, predict
from ssfer_lib.readers import read_dataset
from ssfer_lib.synthfaces import SynthFaces
from ssfer_lib.transforms import eval_view


def ssfer(*args):
    "The console script in a process of its own (exit status, stderr): once, for the end-to-end run."
    return subprocess.run([str(BIN/'ssfer'), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=os.environ | {'OMP_NUM_THREADS': '1'})


def cli(*args) -> tuple[int, str]:
    "`ssfer` in this process (what the console script calls; importing torch again costs seconds): (status, stderr)."
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(map(str, args)))
    return rc, err.getvalue()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A ViT fine-tuned for 3 epochs on 16-px SynthFaces (the `test` preset), and 42 test faces written by `ssfer data synth`."
    tmp = tmp_path_factory.mktemp('predict')
    finetune(finetune_config('test', epochs=3, box_root=str(tmp/'boxes')), tmp/'ft', progress=False)
    rc, err = cli('data', 'synth', '--out', tmp/'sf', '--n-train', 0, '--n-test', 42, '--n-unlabeled', 0, '--size', 16)
    assert rc == 0, err
    return tmp


def test_folder_accuracy_from_csv_equals_evaluate(run):
    ckpt, out = run/'ft'/'best.pt', run/'pred'
    r = ssfer('predict', ckpt, run/'sf'/'Image'/'aligned', '--faces', 'none', '--out', out)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out/'predictions.csv')
    clf = load_classifier(ckpt)
    samples = read_dataset('synthfaces', run/'sf', 'test')
    truth = {Path(s.path).name: clf.classes[s.label] for s in samples}
    assert sorted(df['file']) == sorted(truth) and df['face'].eq(0).all()
    acc_csv = float((df['class'] == df['file'].map(truth)).mean())
    loader = DataLoader(FERDataset(samples, eval_view(clf.img_size, clf.norm)), batch_size=256)
    assert acc_csv == evaluate(clf.model, loader, len(clf.classes))['acc']
    # the same class for every image, not only the same count of right ones
    want = predict_logits(clf.model, loader)['logits'].argmax(1).tolist()
    got = df.set_index('file').loc[[Path(s.path).name for s in samples], 'class'].tolist()
    assert got == [clf.classes[k] for k in want]
    assert len(list((out/'annotated').glob('*.jpg'))) == len(samples)


def _window_vote(labels: list[int], window: int) -> list[int]:
    "The vote written out plainly: frames i - w//2 .. i + (w-1)//2; a frame keeps its class when it is among the most frequent, else the smallest most frequent class."
    out = []
    for i, own in enumerate(labels):
        seen = labels[max(0, i - window // 2): i + (window - 1) // 2 + 1]
        counts = {c: seen.count(c) for c in set(seen)}
        top = max(counts.values())
        out.append(own if counts[own] == top else min(c for c, n in counts.items() if n == top))
    return out


def test_video_smoothed_where_the_window_vote_says(run):
    clf = load_classifier(run/'ft'/'best.pt')
    imgs = [load_image(s.path) for s in read_dataset('synthfaces', run/'sf', 'test')]
    cls = predict(clf, imgs).argmax(1).tolist()
    a = 0; b = next(k for k in range(len(imgs)) if cls[k] != cls[a])  # two faces the network tells apart
    seq = [a] * 6 + [b] + [a] * 5 + [b, b] + [a] * 6 + [b] * 6  # flips of one and two frames, then a lasting change
    w = cv2.VideoWriter(str(run/'clip.avi'), cv2.VideoWriter_fourcc(*'FFV1'), 10, (16, 16))  # lossless: frames = images
    for k in seq: w.write(np.ascontiguousarray(imgs[k][..., ::-1]))
    w.release()
    rc, err = cli('predict', run/'ft'/'best.pt', run/'clip.avi', '--faces', 'none', '--window', 5, '--out', run/'vpred')
    assert rc == 0, err
    df = pd.read_csv(run/'vpred'/'predictions.csv')
    assert df['frame'].tolist() == list(range(len(seq))) and (df['file'] == 'clip.avi').all()
    per_frame = [clf.classes.index(c) for c in df['class']]
    assert per_frame == [cls[k] for k in seq]
    vote = _window_vote(per_frame, 5)
    changed = [i for i, (p, v) in enumerate(zip(per_frame, vote)) if p != v]
    assert changed == [6, 12, 13]  # the brief flips are voted away, the lasting change is kept
    assert [clf.classes.index(c) for c in df['smoothed']] == vote
    assert (run/'vpred'/'annotated'/'clip.avi.mp4').stat().st_size > 0


def test_yunet_finds_two_faces_each_classified_from_its_crop(run, yunet_path):
    a, find = SynthFaces(20, 'test', 128, seed=0).arrays(), face_finder('yunet', yunet_path)
    clf = load_classifier(run/'ft'/'best.pt')
    side = lambda i, j: np.concatenate([a['images'][i], np.full((128, 64, 3), 128, np.uint8), a['images'][j]], 1)  # [128, 320, 3]
    found = [k for k in range(20) if find(a['images'][k])]  # YuNet sees some of the drawn faces: a pair it sees side by side
    pair = next(((i, j) for i, j in zip(found, found[1:]) if len(find(side(i, j))) == 2), None)
    assert pair is not None, f'YuNet finds no pair of SynthFaces faces side by side (alone: {found})'
    canvas = side(*pair)
    cv2.imwrite(str(run/'two.png'), canvas[..., ::-1])
    rc, err = cli('predict', run/'ft'/'best.pt', run/'two.png', '--faces', 'yunet', '--face-model', yunet_path, '--out', run/'ypred')
    assert rc == 0, err
    df = pd.read_csv(run/'ypred'/'predictions.csv').sort_values('x0')
    assert len(df) == 2 and sorted(df['face']) == [0, 1]
    for (_, row), k, dx in zip(df.iterrows(), pair, (0, 192)):
        box, gt = row[['x0', 'y0', 'x1', 'y1']].to_numpy(float), a['box'][k] + [dx, 0, dx, 0]
        lt, rb = np.maximum(box[:2], gt[:2]), np.minimum(box[2:], gt[2:])
        inter = np.prod(np.clip(rb - lt, 0, None))
        assert inter / (np.prod(box[2:] - box[:2]) + np.prod(gt[2:] - gt[:2]) - inter) > 0.5  # the face it is next to
        p = predict(clf, [crop(canvas, box)])[0].numpy()
        np.testing.assert_allclose(row[[f'p_{c}' for c in clf.classes]].to_numpy(float), p, atol=1e-5)


@pytest.mark.parametrize('case', ['checkpoint', 'image', 'video'])
def test_bad_input_is_one_line_and_exit_2(run, case, tmp_path):
    bad = tmp_path/'in'; bad.mkdir()
    (bad/'face.jpg').write_bytes(b'not a jpeg'); (tmp_path/'clip.mp4').write_bytes(b'not a video')
    ckpt, inp, want = run/'ft'/'best.pt', bad, f'{bad/"face.jpg"}: unreadable or corrupt image'
    if case == 'checkpoint': ckpt, want = tmp_path/'missing.pt', f'checkpoint not found: {tmp_path/"missing.pt"}'
    if case == 'video': inp, want = tmp_path/'clip.mp4', f'{tmp_path/"clip.mp4"}: unreadable video'
    rc, err = cli('predict', ckpt, inp, '--faces', 'none', '--out', tmp_path/'out')
    assert rc == 2 and err.startswith(f'ssfer: error: {want}') and err.count('\n') == 1, err
    assert not (tmp_path/'out'/'predictions.csv').exists()
