"""Integration tests of the data layer: real FERPlus counts, fake dataset trees, bad inputs, saved splits, SynthFaces on disk."""
from pathlib import Path
import cv2
import numpy as np
import pytest
import torch
from ssfer_lib.data import DataError, FERDataset
from ssfer_lib.readers import check_dataset, format_report, read_dataset
from ssfer_lib.splits import draw_split, make_split
from ssfer_lib.synthfaces import write_synthfaces
from ssfer_lib.transforms import eval_view, weak_view

FERPLUS = Path(__file__).parents[2]/'shared/data/ferplus'
needs_ferplus = pytest.mark.skipif(not FERPLUS.exists(), reason='shared FERPlus copy absent')

# Measured once on ../shared/data/ferplus (label.csv files) and cross-checked with a separate pandas implementation
# of the majority rule (votes <= 1 zeroed; keep when the top emotion has > 50% of the rest and is not unknown/NF).
# Class order: Neutral, Happiness, Surprise, Sadness, Anger, Disgust, Fear, Contempt.
FERPLUS_MAJORITY = {
    'train': [8733, 7284, 3136, 3022, 2098, 116, 536, 120],
    'valid': [1180, 862, 411, 348, 289, 25, 60, 16],
    'test': [1083, 892, 394, 382, 269, 16, 86, 15],
}


def counts(samples, n): return np.bincount([s.label for s in samples], minlength=n).tolist()


def write_img(path, shape=(8, 8, 3)):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))


# ---------------------------------------------------------------- real FERPlus
@needs_ferplus
@pytest.mark.parametrize('split', ['train', 'valid'])
def test_ferplus_majority_counts(split):
    for n in (8, 7):
        s = read_dataset('ferplus', FERPLUS, split, num_classes=n)
        assert counts(s, n) == FERPLUS_MAJORITY[split][:n]
        assert len(s) == sum(FERPLUS_MAJORITY[split][:n])


@needs_ferplus
def test_ferplus_test_sets():
    merged = [a + b for a, b in zip(FERPLUS_MAJORITY['valid'], FERPLUS_MAJORITY['test'])]
    assert counts(read_dataset('ferplus', FERPLUS, 'test'), 8) == merged  # the paper's Valid + Test (default)
    assert len(read_dataset('ferplus', FERPLUS, 'test')) == 6328
    assert counts(read_dataset('ferplus', FERPLUS, 'test', merge_test=False), 8) == FERPLUS_MAJORITY['test']
    assert counts(read_dataset('ferplus', FERPLUS, 'test', num_classes=7), 7) == merged[:7]


@needs_ferplus
def test_ferplus_soft_targets_and_dataset():
    s = read_dataset('ferplus', FERPLUS, 'valid', mode='probability')
    assert len(s) > len(read_dataset('ferplus', FERPLUS, 'valid'))  # soft labels keep ambiguous images
    t = np.array([x.meta['target'] for x in s[:50]])
    np.testing.assert_allclose(t.sum(1), 1, atol=1e-6)
    it = FERDataset(s[:4], eval_view(32), targets=True)[0]
    assert it['image'].shape == (3, 32, 32) and it['target'].shape == (8,)  # grayscale PNG -> 3 channels
    assert torch.equal(it['box'], torch.tensor([0., 0, 32, 32]))


# ---------------------------------------------------------------- fake trees
def fake_rafdb(root, n_train=14, n_test=7):
    lines = [f'train_{i:05d}.jpg {i % 7 + 1}' for i in range(1, n_train + 1)] + [f'test_{i:04d}.jpg {i % 7 + 1}' for i in range(1, n_test + 1)]
    (root/'EmoLabel').mkdir(parents=True)
    (root/'EmoLabel/list_patition_label.txt').write_text('\n'.join(lines) + '\n')
    for l in lines: write_img(root/'Image/aligned'/f'{Path(l.split()[0]).stem}_aligned.jpg')
    return root/'EmoLabel/list_patition_label.txt'


def test_rafdb_counts(tmp_path):
    fake_rafdb(tmp_path)
    r = check_dataset('rafdb', tmp_path)
    assert r['splits']['train']['n'] == 14 and r['splits']['test']['n'] == 7
    assert list(r['splits']['train']['per_class'].values()) == [2] * 7
    tr = read_dataset('rafdb', tmp_path, 'train')
    assert tr[0].label == 1 and tr[6].label == 0  # train_00001 has file label 2 -> Fear (1); train_00007 label 1 -> 0
    assert 'train: 14 images' in format_report(r)


def test_affectnet_csv_layout(tmp_path):
    head = 'subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n'
    for split, name in (('train', 'training.csv'), ('test', 'validation.csv')):
        rows = [f'{e}/{split}{i}.jpg,1,2,3,4,"",{e},0,0' for i, e in enumerate([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1])]
        (tmp_path/name).write_text(head + '\n'.join(rows) + '\n')
        for r in rows: write_img(tmp_path/'Manually_Annotated_Images'/r.split(',')[0])
    r7, r8 = check_dataset('affectnet7', tmp_path), check_dataset('affectnet8', tmp_path)
    assert r7['splits']['train']['n'] == 8 and r8['splits']['test']['n'] == 9
    assert r7['splits']['train']['per_class']['Happiness'] == 2 and r8['splits']['train']['per_class']['Contempt'] == 1
    assert r7['splits']['train']['notes'] == {'expression 7': 1, 'expression 8': 1, 'expression 9': 1, 'expression 10': 1}
    assert read_dataset('affectnet8', tmp_path, 'train')[0].box == (1., 2., 4., 6.)


def test_affectnet_npy_layout(tmp_path):
    for split, d in (('train', 'train_set'), ('test', 'val_set')):
        for i, e in enumerate([0, 1, 2, 3, 4, 5, 6, 7, 9]):
            write_img(tmp_path/d/'images'/f'{i}.jpg')
            (tmp_path/d/'annotations').mkdir(parents=True, exist_ok=True)
            np.save(tmp_path/d/'annotations'/f'{i}_exp.npy', np.array(str(e)))
    assert counts(read_dataset('affectnet7', tmp_path, 'train'), 7) == [1] * 7
    assert counts(read_dataset('affectnet8', tmp_path, 'test'), 8) == [1] * 8
    (tmp_path/'val_set/annotations/3_exp.npy').unlink()
    with pytest.raises(DataError, match=r'3_exp\.npy: missing file \(annotation of 3\.jpg\)'): read_dataset('affectnet7', tmp_path, 'test')


HEADER = 'Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other'


def fake_affwild2(root):
    for split, d in (('train', 'Train_Set'), ('test', 'Validation_Set')):
        ann = root/'6th_ABAW_Annotations/EXPR_Recognition_Challenge'/d
        ann.mkdir(parents=True)
        for v in range(2):
            video = f'{split}_v{v}'
            labels = list(range(8)) + [-1, 3]
            (ann/f'{video}.txt').write_text(HEADER + '\n' + '\n'.join(map(str, labels)) + '\n')
            for k in range(1, len(labels) + 1):
                if k != 10: write_img(root/'cropped_aligned'/video/f'{k:05d}.jpg')  # frame 10 has no face image
    return root


def test_affwild2(tmp_path):
    fake_affwild2(tmp_path)
    r = check_dataset('affwild2', tmp_path)
    assert r['splits']['train']['n'] == 16 and r['splits']['test']['n'] == 16
    assert r['splits']['train']['notes'] == {'label -1': 2, 'no frame image': 2}
    s = read_dataset('affwild2', tmp_path, 'test')
    assert [(x.label, x.meta['frame']) for x in s[:3]] == [(0, 1), (1, 2), (2, 3)] and s[0].meta['video'] == 'test_v0'


def fake_adience(root):
    head = 'user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score'
    ages = ['(0, 2)', '(4, 6)', '(8, 12)', '(15, 20)', '(25, 32)', '(38, 43)', '(48, 53)', '(60, 100)', 'None', '13']
    for k in range(5):
        rows = [f'u{k}\timg{i}.jpg\t{i}\t{a}\t{"fm"[i % 2] if i < 9 else "u"}\t0\t0\t1\t1\t0\t0\t0' for i, a in enumerate(ages)]
        (root/f'fold_{k}_data.txt').write_text(head + '\n' + '\n'.join(rows) + '\n')
        for i in range(len(ages)): write_img(root/'aligned'/f'u{k}'/f'landmark_aligned_face.{i}.img{i}.jpg')
    return root


def test_adience(tmp_path):
    fake_adience(tmp_path)
    assert counts(read_dataset('adience', tmp_path, 'fold2'), 8) == [1] * 8  # None and 13 (between groups) skipped
    assert len(read_dataset('adience', tmp_path, 'train', test_fold=1)) == 32
    assert {x.meta['fold'] for x in read_dataset('adience', tmp_path, 'test', test_fold=1)} == {1}
    g = check_dataset('adience', tmp_path, splits=('fold0',), task='gender')
    assert g['splits']['fold0']['per_class'] == {'female': 5, 'male': 4}


def test_synthfaces_on_disk(tmp_path):
    write_synthfaces(tmp_path, n_train=70, n_test=14, n_unlabeled=5, size=24)
    r = check_dataset('rafdb', tmp_path, decode=True)
    assert r['splits']['train']['n'] == 70 and r['splits']['test']['n'] == 14
    u = read_dataset('synthfaces', tmp_path, 'unlabeled')
    assert len(u) == 5 and all(s.label == -1 and s.box is not None for s in u)
    tr = read_dataset('rafdb', tmp_path, 'train')
    it = FERDataset(tr, weak_view(16))[3]
    assert tr[3].box is not None and it['image'].shape == (3, 16, 16) and it['label'] == tr[3].label


# ---------------------------------------------------------------- bad inputs: one-line messages naming file and line
def test_bad_missing_root_and_file(tmp_path):
    with pytest.raises(DataError, match='missing root folder'): check_dataset('rafdb', tmp_path/'nope')
    with pytest.raises(DataError, match=r'list_patition_label\.txt: missing file \(wrong layout\? expected the RAF-DB'):
        check_dataset('rafdb', tmp_path)
    lab = fake_rafdb(tmp_path)
    (tmp_path/'Image/aligned/test_0002_aligned.jpg').unlink()
    with pytest.raises(DataError, match=r'list_patition_label\.txt:16: missing file .*test_0002_aligned\.jpg'): check_dataset('rafdb', tmp_path)


def test_bad_wrong_layout(tmp_path):
    fake_rafdb(tmp_path)
    (tmp_path/'Image/aligned').rename(tmp_path/'Image/original')
    with pytest.raises(DataError, match=r'wrong layout: found Image/\{original\}; expected the RAF-DB basic layout'): check_dataset('rafdb', tmp_path)
    with pytest.raises(DataError, match='wrong layout, no FER2013Train/Valid/Test folders'): check_dataset('ferplus', tmp_path)
    with pytest.raises(DataError, match=r'no EXPR\*/Train_Set annotation folder found \(wrong layout'): check_dataset('affwild2', tmp_path)
    with pytest.raises(DataError, match=r'training\.csv: missing file \(wrong layout\? expected the AffectNet layout'): check_dataset('affectnet7', tmp_path)


def test_bad_corrupt_image(tmp_path):
    fake_rafdb(tmp_path)
    (tmp_path/'Image/aligned/train_00003_aligned.jpg').write_bytes(b'\xff\xd8\xff garbage')
    with pytest.raises(DataError, match=r'list_patition_label\.txt:3: unreadable or corrupt image'): check_dataset('rafdb', tmp_path)


def test_bad_label_out_of_range(tmp_path):
    lab = fake_rafdb(tmp_path)
    lab.write_text(lab.read_text().replace('train_00004.jpg 5', 'train_00004.jpg 9'))
    with pytest.raises(DataError, match=r'list_patition_label\.txt:4: label 9 out of range 1\.\.7'): check_dataset('rafdb', tmp_path)
    fake_affwild2(tmp_path/'aw')
    txt = tmp_path/'aw/6th_ABAW_Annotations/EXPR_Recognition_Challenge/Train_Set/train_v1.txt'
    txt.write_text(txt.read_text().replace('\n5\n', '\nsad\n'))
    with pytest.raises(DataError, match=r"train_v1\.txt:7: label 'sad' is not an integer"): check_dataset('affwild2', tmp_path/'aw')


def test_bad_empty_class(tmp_path):
    lab = fake_rafdb(tmp_path)
    lab.write_text('\n'.join(l for l in lab.read_text().splitlines() if not (l.startswith('test') and l.endswith(' 4'))) + '\n')
    with pytest.raises(DataError, match=r"\(test\): empty class 'Happiness', no labeled images"): check_dataset('rafdb', tmp_path)


def test_bad_duplicate_entry(tmp_path):
    lab = fake_rafdb(tmp_path)
    lab.write_text(lab.read_text() + 'test_0003.jpg 3\n')
    with pytest.raises(DataError, match=r'list_patition_label\.txt:22: duplicate entry test_0003_aligned\.jpg \(also listed at .*:17\)'):
        check_dataset('rafdb', tmp_path)


def test_bad_header(tmp_path):
    fake_affwild2(tmp_path)
    txt = tmp_path/'6th_ABAW_Annotations/EXPR_Recognition_Challenge/Validation_Set/test_v0.txt'
    txt.write_text('Neutral,Happy\n1\n')
    with pytest.raises(DataError, match=r'test_v0\.txt:1: expected the header "Neutral,Anger'): check_dataset('affwild2', tmp_path)


def test_messages_are_one_line(tmp_path):
    lab = fake_rafdb(tmp_path)
    lab.write_text('train_00001.jpg\n')
    with pytest.raises(DataError) as e: check_dataset('rafdb', tmp_path)
    assert '\n' not in str(e.value) and 'list_patition_label.txt:1: expected "<image> <label>"' in str(e.value)


# ---------------------------------------------------------------- splits
def test_split_same_seed_identical_csv(tmp_path):
    y = np.random.default_rng(0).integers(0, 7, 500)
    paths = [f'i{i}.jpg' for i in range(500)]
    for kind, value in (('ratio', 0.01), ('per_class', 10), ('total', 100), ('kfold', 5), ('noise', 0.2)):
        _, a = make_split('toy', paths, y, kind, value, seed=1, root=tmp_path/'a')
        _, b = make_split('toy', paths, y, kind, value, seed=1, root=tmp_path/'b')
        assert a.read_bytes() == b.read_bytes(), kind
        _, c = make_split('toy', paths, y, kind, value, seed=2, root=tmp_path/'c')
        assert a.read_bytes() != c.read_bytes(), kind


@pytest.mark.parametrize('kind,value', [('ratio', 0.01), ('ratio', 0.25), ('per_class', 10), ('per_class', 250), ('total', 400), ('total', 7)])
def test_split_at_least_one_per_class(kind, value):
    y = np.repeat(np.arange(7), [500, 300, 40, 12, 3, 150, 900])
    s = draw_split(y, kind, value, seed=0)
    per = s[s.labeled == 1].groupby('label').size()
    assert len(per) == 7 and per.min() >= 1
    if kind == 'total': assert per.sum() == value


def test_kfold_disjoint_and_covering():
    y = np.random.default_rng(1).integers(0, 7, 333)
    s = draw_split(y, 'kfold', 5, seed=0)
    folds = [set(s.index[s.fold == k]) for k in range(5)]
    assert sum(len(f) for f in folds) == len(y) and set().union(*folds) == set(range(len(y)))
    assert all(not (folds[i] & folds[j]) for i in range(5) for j in range(i + 1, 5))


def test_ferplus_fer2013new_layout(tmp_path):
    votes = {'Training': [[0, 10, 0, 0, 0, 0, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0, 0, 4, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]],
             'PublicTest': [[0, 0, 9, 1, 0, 0, 0, 0, 0, 0]], 'PrivateTest': [[0, 0, 0, 0, 0, 0, 8, 2, 0, 0]]}
    folders = {'Training': 'FER2013Train', 'PublicTest': 'FER2013Valid', 'PrivateTest': 'FER2013Test'}
    rows, k = ['Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF'], 0
    for usage, vs in votes.items():
        for v in vs:
            rows.append(f'{usage},fer{k:07d}.png,' + ','.join(map(str, v)))
            write_img(tmp_path/folders[usage]/f'fer{k:07d}.png', (48, 48)); k += 1
    rows.append('Training,,0,0,0,0,0,0,0,0,0,10')  # an image FERPlus removed
    (tmp_path/'fer2013new.csv').write_text('\n'.join(rows) + '\n')
    tr = read_dataset('ferplus', tmp_path, 'train')
    assert counts(tr, 8) == [1, 1, 0, 0, 0, 0, 0, 0] and tr.notes == {'no majority, unknown or NF': 1}  # 6 of 10 is a majority; NF dropped
    assert Path(tr[0].path).name == 'fer0000000.png'
    assert counts(read_dataset('ferplus', tmp_path, 'test'), 8) == [0, 0, 1, 0, 0, 0, 1, 0]
    (tmp_path/'fer2013new.csv').write_text('\n'.join(rows[:2] + ['Validation,fer0000009.png,0,0,0,0,0,0,0,0,0,10']) + '\n')
    with pytest.raises(DataError, match=r"fer2013new\.csv:3: unknown usage 'Validation'"): read_dataset('ferplus', tmp_path, 'valid')
