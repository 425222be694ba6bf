"""The bad-input matrix (issue 19, run level): each case is a command a new user might type with a broken dataset, a
misspelled name, a bad checkpoint or an unusable output folder. Every case asserts the one line `ssfer` prints (it
names the culprit: file and line, option, or field, with the closest valid name for a misspelling), exit code 2, and
that nothing finished was overwritten or left half-written: a finished run beside it keeps every byte, and no file
appears but those the case allows (a run folder's `run.json` and executed notebook, a complete split or image cache).

Cases covered elsewhere and not repeated here: `tests/test_cli_failfast.py` (finetune's unknown preset, mix and κ
metric with their suggestions, a wrong type for `epochs`, a missing `init` for finetune, a run root under a file) and
`tests/test_data.py` (the same data errors at function level, and more layouts). Kernel cases (`ssfer run` reaching
papermill) are slow: a kernel start and a stage import each."""
import contextlib, errno, fnmatch, io, os, subprocess
from pathlib import Path
import numpy as np
import pytest
import torch
from conftest import BIN
from test_data import fake_rafdb, write_img


# ---------------------------------------------------------------- fakes and helpers
def fake_ferplus(root, n=8):
    "A FERPlus tree (FER2013Train/Valid/Test with label.csv and grayscale PNGs), one image of each class per folder."
    for folder in ('FER2013Train', 'FER2013Valid', 'FER2013Test'):
        rows = []
        for i in range(n):
            name = f'fer{folder[7:]}{i:03d}.png'
            write_img(root/folder/name, (16, 16))
            rows.append(f'{name},"(0, 0, 16, 16)",' + ','.join('10' if j == i else '0' for j in range(10)))
        (root/folder/'label.csv').write_text('\n'.join(rows) + '\n')
    return root


def truncate(path, keep=0.9):
    "Cut a file to `keep` of its bytes, as a broken copy or download does."
    b = Path(path).read_bytes(); Path(path).write_bytes(b[:int(len(b) * keep)])
    return path


def finished_run(t):
    "A finished run that every case must leave untouched: metrics.json, last.pt and its checksum."
    from ssfer_lib.core import save_checkpoint, atomic_write_json
    d = t/'runs'/'finished'
    torch.manual_seed(0); save_checkpoint(d/'last.pt', epoch=3, step=30, model=torch.nn.Linear(4, 2))
    atomic_write_json(d/'metrics.json', {'metrics': {'test/acc': 0.75}})
    return d


def snapshot(root): return {p: p.read_bytes() for p in Path(root).rglob('*') if p.is_file()}


def assert_untouched(before, root, allowed=()):
    "Files present before are byte-identical; new files match `allowed` (globs on the path relative to `root`); no temp file."
    after = snapshot(root)
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, f'changed or removed: {changed}'
    new = [str(p.relative_to(root)) for p in after if p not in before]
    assert not [p for p in new if p.endswith('.tmp')], new
    assert not [p for p in new if not any(fnmatch.fnmatch(p, a) for a in allowed)], f'left behind: {new}'


def cli(t, monkeypatch, *argv):
    "`ssfer argv` in this process, from folder `t`: (exit code, stderr, stdout)."
    from ssfer_lib.cli import main
    monkeypatch.chdir(t)
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()) as out:
        try: rc = main([str(a) for a in argv])
        except SystemExit as e: rc = e.code
    return rc, err.getvalue(), out.getvalue()


def ssfer(t, *argv):
    "`ssfer argv` in a child process (for runs that start a kernel): (exit code, stderr without jupyter's TCP warning, stdout)."
    r = subprocess.run([str(BIN/'ssfer'), *map(str, argv)], cwd=t, capture_output=True, text=True, timeout=900)
    err = '\n'.join(l for l in r.stderr.splitlines() if 'Kernel is running over TCP' not in l)
    return r.returncode, err, r.stdout


def assert_one_line(rc, err, out, expected):
    assert rc == 2, (rc, err[-3000:])
    assert 'Traceback' not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('ssfer: error: '), err[-3000:]
    for e in expected: assert e in lines[0], (e, lines[0])
    assert out == '', out[-2000:]


# ---------------------------------------------------------------- the cases
CASES = {}  # name -> fn(tmp) -> (argv, expected parts of the line, allowed new files)
def case(fn): CASES[fn.__name__] = fn; return fn


@case
def missing_data_root(t):
    return (['data', 'check', 'rafdb', '--data-root', t/'nope'],
            [f'{t/"nope"}: missing root folder (expected the RAF-DB basic layout: EmoLabel/list_patition_label.txt'], ())

@case
def missing_data_root_of_a_run(t):
    return (['run', 'finetune', '-p', 'data', 'rafdb', '-p', 'data_root', 'nope', '--root', 'runs'],
            ["finetune.ipynb: data_root 'nope': no such folder"], ())

@case
def ferplus_folder_given_as_rafdb(t):
    fer = fake_ferplus(t/'fer')
    return (['data', 'check', 'rafdb', '--data-root', fer],
            [f'{fer}/EmoLabel/list_patition_label.txt: missing file (wrong layout? expected the RAF-DB basic layout'], ())

@case
def truncated_jpeg_in_train(t):
    fake_rafdb(t/'raf'); truncate(t/'raf/Image/aligned/train_00003_aligned.jpg')
    return (['data', 'check', 'rafdb', '--data-root', t/'raf', '--decode'],
            [f'{t}/raf/EmoLabel/list_patition_label.txt:3: unreadable or corrupt image {t}/raf/Image/aligned/train_00003_aligned.jpg'], ())

@case
def truncated_jpeg_in_test(t):
    fake_rafdb(t/'raf'); truncate(t/'raf/Image/aligned/test_0002_aligned.jpg')
    return (['data', 'check', 'rafdb', '--data-root', t/'raf', '--decode'],
            [f'{t}/raf/EmoLabel/list_patition_label.txt:16: unreadable or corrupt image {t}/raf/Image/aligned/test_0002_aligned.jpg'], ())

@case
def truncated_png_in_train(t):
    fer = fake_ferplus(t/'fer'); truncate(fer/'FER2013Train/ferTrain004.png')
    return (['data', 'check', 'ferplus', '--data-root', fer, '--decode'],
            [f'{fer}/FER2013Train/label.csv:5: unreadable or corrupt image {fer}/FER2013Train/ferTrain004.png'], ())

@case
def truncated_png_in_test(t):
    fer = fake_ferplus(t/'fer'); truncate(fer/'FER2013Test/ferTest001.png')
    return (['data', 'check', 'ferplus', '--data-root', fer, '--decode'],
            [f'{fer}/FER2013Test/label.csv:2: unreadable or corrupt image {fer}/FER2013Test/ferTest001.png'], ())

@case
def label_out_of_range(t):
    lab = fake_rafdb(t/'raf'); lab.write_text(lab.read_text().replace('train_00004.jpg 5', 'train_00004.jpg 9'))
    return (['data', 'check', 'rafdb', '--data-root', t/'raf'], [f'{lab}:4: label 9 out of range 1..7'], ())

@case
def unparsable_label_line(t):
    lab = fake_rafdb(t/'raf'); lab.write_text(lab.read_text().replace('train_00002.jpg 3', 'train_00002.jpg happy'))
    return (['data', 'check', 'rafdb', '--data-root', t/'raf'], [f"{lab}:2: label 'happy' is not an integer"], ())

@case
def a_class_with_no_labeled_sample_after_the_split(t):
    fake_rafdb(t/'raf')
    return (['split', 'rafdb', '--data-root', t/'raf', '--kind', 'per_class', '--value', '0', '--root', 'splits'],
            ["class 'Surprise' gets no labeled image from a per_class split of 0: ask for at least 1 label per class"], ())

@case
def unknown_dataset(t):
    return (['data', 'check', 'rafbd', '--data-root', t], ["unknown dataset 'rafbd' (did you mean 'rafdb'?); choose one of: adience"], ())

@case
def unknown_dataset_of_a_run(t):
    return (['run', 'semi', '-p', 'data', 'fereplus', '--root', 'runs'],
            ["semi.ipynb: unknown data 'fereplus' (did you mean 'ferplus'?); choose one of: "], ())

@case
def unknown_preset(t):
    return (['run', 'mscl', '-p', 'preset', 'tset', '--root', 'runs'],
            ["mscl.ipynb: unknown preset 'tset' (did you mean 'test'?); choose one of: paper, demo, demo-full, test"], ())

@case
def unknown_method(t):
    return (['run', 'mscl', '-p', 'method', 'mscll', '--root', 'runs'],
            ["mscl.ipynb: unknown method 'mscll' (did you mean 'mscl'?); choose one of: ce, ce+mix, sscl, scl, mscl"], ())

@case
def unknown_kappa_metric_of_a_stage_without_one(t):
    return (['run', 'mscl', '-p', 'kappa', 'iou', '--root', 'runs'], ["unknown parameter 'kappa' for mscl.ipynb; its parameters: preset"], ())

@case
def unknown_notebook_parameter(t):
    return (['run', 'finetune', '-p', 'epoch', '3', '--root', 'runs'],
            ["unknown parameter 'epoch' for finetune.ipynb (did you mean 'epochs'?); its parameters: preset"], ())

@case
def unknown_reader_option(t):
    fer = fake_ferplus(t/'fer')
    return (['data', 'check', 'ferplus', '--data-root', fer, '--opt', 'mod', 'probability'],
            ["unknown option 'mod' for ferplus (did you mean 'mode'?); its options: mode, num_classes, merge_test"], ())

@case
def unknown_command_line_flag(t):
    return (['run', 'finetune', '--epochs', '3'], ['unrecognized arguments: --epochs 3 (see ssfer --help)'], ())

@case
def a_value_of_the_wrong_type(t):
    return (['run', 'mscl', '-p', 'proj_dim', 'wide', '--root', 'runs'], ["mscl.ipynb: proj_dim: cannot read 'wide' as int"], ())

@case
def init_that_does_not_exist(t):
    return (['run', 'semi', '-p', 'init', 'stage2/best.pt', '--root', 'runs'],
            ["semi.ipynb: init 'stage2/best.pt': no such checkpoint file (give 'scratch', 'timm:<name>' or an existing file)"], ())

@case
def run_folder_blocked_by_a_file(t):
    (t/'runs').mkdir(exist_ok=True); (t/'runs'/'mine').write_text('a file where the run folder goes')
    return (['run', 'finetune', '-p', 'preset', 'test', '--root', 'runs', '--name', 'mine'], ["File exists: 'runs/mine'"], ())

@case
def split_folder_blocked_by_a_file(t):
    fake_rafdb(t/'raf'); (t/'outputs').write_text('a file where the outputs folder goes')
    return (['split', 'rafdb', '--data-root', t/'raf', '--kind', 'per_class', '--value', '1'],
            ["Not a directory: 'outputs/splits'"], ())

@case
def unwritable_run_root(t):
    if os.geteuid() == 0: pytest.skip('root writes into read-only folders')
    (t/'ro').mkdir(); (t/'ro').chmod(0o500)
    return (['run', 'finetune', '-p', 'preset', 'test', '--root', 'ro/runs'],
            [f'run root ro/runs: cannot create anything in {t/"ro"} (no write permission)'], ())


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input(tmp_path, monkeypatch, name):
    argv, expected, allowed = CASES[name](tmp_path)
    finished_run(tmp_path); before = snapshot(tmp_path)
    assert_one_line(*cli(tmp_path, monkeypatch, *argv), expected)
    assert_untouched(before, tmp_path, allowed)


def test_more_labels_per_class_than_a_class_has_warns_naming_each_class(tmp_path, monkeypatch):
    fake_rafdb(tmp_path/'raf')  # 2 training images per class
    finished_run(tmp_path); before = snapshot(tmp_path)
    rc, err, out = cli(tmp_path, monkeypatch, 'split', 'rafdb', '--data-root', tmp_path/'raf', '--kind', 'per_class', '--value', '5', '--root', 'splits')
    assert rc == 0 and out == 'splits/rafdb-per_class5-seed0.csv: 14 labeled / 14 images\n', (rc, err, out)
    classes = ('Surprise', 'Fear', 'Disgust', 'Happiness', 'Sadness', 'Anger', 'Neutral')
    assert err.splitlines() == [f"ssfer: warning: class '{c}' has 2 images, fewer than the 5 labels per class asked: all 2 are labeled"
                                for c in classes], err
    assert_untouched(before, tmp_path, ('splits/rafdb-per_class5-seed0.*',))


# ---------------------------------------------------------------- disk full while writing a checkpoint
def full_disk_after(monkeypatch, n_bytes: int):
    "From now on, every file opened by `atomic_write` raises ENOSPC once `n_bytes` were written to it."
    real = os.fdopen
    class Full(io.FileIO):
        def write(self, b):
            if self.tell() + len(b) > n_bytes: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)
    monkeypatch.setattr(os, 'fdopen', lambda fd, mode='r', *a, **kw: io.BufferedWriter(Full(fd, 'w')) if 'w' in mode else real(fd, mode, *a, **kw))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from ssfer_lib.core import load_checkpoint, save_checkpoint
    torch.manual_seed(0); a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    p = save_checkpoint(tmp_path/'last.pt', epoch=1, step=10, model=a)
    before = snapshot(tmp_path)
    full_disk_after(monkeypatch, 4096)
    with pytest.raises(OSError, match=rf'No space left on device while writing {p} \(the previous file, if any, is unchanged\)') as e:
        save_checkpoint(p, epoch=2, step=20, model=b)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert_untouched(before, tmp_path)  # no temp file; last.pt and its checksum as they were
    c = torch.nn.Linear(64, 64)
    assert load_checkpoint(p, model=c)['epoch'] == 1 and torch.equal(c.weight, a.weight)


def test_disk_full_during_training_stops_with_the_last_epoch_intact(tmp_path, monkeypatch):
    "The loop's second checkpoint hits a full disk: the error names the file; the first epoch's checkpoint resumes."
    from ssfer_lib.core import load_weights
    from ssfer_lib.train import Supervised, fit
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)); batches = [dict(image=x[i:i + 8], label=(x[i:i + 8, 0] > 0).long()) for i in range(0, 32, 8)]
    torch.manual_seed(0); task = Supervised(torch.nn.Linear(8, 2)); opt = torch.optim.SGD(task.parameters(), lr=0.1)
    def after(epoch, log):
        if epoch == 0: full_disk_after(monkeypatch, 256)
    with pytest.raises(OSError, match=rf'No space left on device while writing {tmp_path}/last\.pt'):
        fit(task, batches, optimizer=opt, epochs=3, device='cpu', ckpt_dir=tmp_path, on_epoch_end=after, progress=False)
    monkeypatch.undo()
    assert load_weights(tmp_path/'last.pt')['epoch'] == 1 and not list(tmp_path.glob('.*.tmp'))
    assert len(fit(task, batches, optimizer=opt, epochs=3, device='cpu', ckpt_dir=tmp_path, progress=False)) == 3  # resumes


def test_disk_full_in_the_cli_is_one_line(tmp_path, monkeypatch):
    fake_rafdb(tmp_path/'raf'); finished_run(tmp_path); before = snapshot(tmp_path)
    full_disk_after(monkeypatch, 16)
    rc, err, out = cli(tmp_path, monkeypatch, 'split', 'rafdb', '--data-root', tmp_path/'raf', '--kind', 'per_class', '--value', '1', '--root', 'splits')
    monkeypatch.undo()
    assert_one_line(rc, err, out, ['[Errno 28] No space left on device while writing splits/rafdb-per_class1-seed0.csv'])
    assert_untouched(before, tmp_path)


# ---------------------------------------------------------------- checkpoints given as `init`
def test_checkpoint_messages(tmp_path):
    "load_weights (every checkpoint read: init, resume, best.pt) in one line per problem; the pickle is never run."
    from ssfer_lib.core import CheckpointError, load_weights, save_weights
    p = save_weights(tmp_path/'enc.pt', {'model': {'w': torch.ones(64)}})
    b = bytearray(p.read_bytes()); b[len(b) // 2] ^= 0xFF; p.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match=rf'checkpoint {p} does not match the sha256 recorded in enc\.pt\.sha256 when it was saved'):
        load_weights(p)
    t = truncate(save_weights(tmp_path/'t.pt', {'model': {'w': torch.ones(64)}})); (tmp_path/'t.pt.sha256').unlink()
    with pytest.raises(CheckpointError, match=rf'checkpoint {t} is truncated or not a torch file'): load_weights(t)
    with pytest.raises(CheckpointError, match=rf'checkpoint {evil_pickle(tmp_path)} is not weights-only: loading it would unpickle Python objects \(posix\.mkdir\)'):
        load_weights(tmp_path/'evil.pt')
    assert not (tmp_path/'pwned').exists()


class _Evil:
    def __init__(self, path): self.path = path
    def __reduce__(self): return (os.mkdir, (self.path,))  # unpickling it would create a folder


def evil_pickle(t):
    "A checkpoint that is not weights-only: unpickling it would create the folder `t/pwned`."
    torch.save({'model': _Evil(str(t/'pwned'))}, t/'evil.pt')
    return t/'evil.pt'


def other_architecture(t):
    "An encoder of another ViT (wider) than finetune's test preset."
    from ssfer_lib.core import save_weights
    from ssfer_lib.vit import create_vit
    m = create_vit('vit_tiny_patch16_224', num_classes=0, img_size=16, patch_size=4, depth=2, embed_dim=24, num_heads=2)
    return save_weights(t/'wide.pt', {'model': m.state_dict()})


def damaged(t):
    from ssfer_lib.core import save_weights
    from ssfer_lib.vit import create_vit
    p = save_weights(t/'enc.pt', {'model': create_vit('vit_tiny_patch16_224', num_classes=0, img_size=16, patch_size=4, depth=2,
                                                      embed_dim=48, num_heads=3).state_dict()})
    b = bytearray(p.read_bytes()); b[len(b) // 2] ^= 0xFF; p.write_bytes(bytes(b))
    return p


def truncated_checkpoint(t):
    torch.save({'model': {'w': torch.ones(256)}}, t/'t.pt')
    return truncate(t/'t.pt', 0.5)


def rafdb_with_truncated_train_jpeg(t):
    fake_rafdb(t/'raf'); truncate(t/'raf/Image/aligned/train_00005_aligned.jpg')
    return t/'raf'


def ferplus_with_truncated_test_png(t):
    fake_ferplus(t/'fer'); truncate(t/'fer/FER2013Test/ferTest003.png')
    return t/'fer'


KERNEL_CASES = {  # `ssfer run finetune -p preset test` with: name -> fn(tmp) -> (extra -p pairs, expected parts of the line)
    'init_of_another_architecture': lambda t: (['init', other_architecture(t)], [
        f'KeyError: "checkpoint {t}/wide.pt does not fit vit_tiny_patch16_224', 'shape mismatches']),
    'truncated_init': lambda t: (['init', truncated_checkpoint(t)], [
        f'CheckpointError: checkpoint {t}/t.pt is truncated or not a torch file']),
    'non_weights_only_init': lambda t: (['init', evil_pickle(t)], [
        f'CheckpointError: checkpoint {t}/evil.pt is not weights-only: loading it would unpickle Python objects (posix.mkdir)']),
    'damaged_init': lambda t: (['init', damaged(t)], [
        f'CheckpointError: checkpoint {t}/enc.pt does not match the sha256 recorded in enc.pt.sha256 when it was saved']),
    'ferplus_folder_run_as_rafdb': lambda t: (['data', 'rafdb', 'data_root', fake_ferplus(t/'fer')], [
        f'DataError: {t}/fer/EmoLabel/list_patition_label.txt: missing file (wrong layout? expected the RAF-DB basic layout']),
    'truncated_jpeg_in_train_run': lambda t: (['data', 'rafdb', 'data_root', rafdb_with_truncated_train_jpeg(t)], [
        f'DataError: {t}/raf/Image/aligned/train_00005_aligned.jpg: unreadable or corrupt image (truncated)']),
    'truncated_png_in_test_run': lambda t: (['data', 'ferplus', 'data_root', ferplus_with_truncated_test_png(t)], [
        f'DataError: {t}/fer/FER2013Test/ferTest003.png: unreadable or corrupt image (truncated)']),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(KERNEL_CASES))
def test_bad_input_found_inside_a_run(tmp_path, name):
    "Found by the stage in the kernel: still one line (naming the cell and the executed notebook), exit 2, nothing else kept."
    pairs, expected = KERNEL_CASES[name](tmp_path)
    finished_run(tmp_path); before = snapshot(tmp_path)
    p = [a for k, v in zip(pairs[::2], pairs[1::2]) for a in ('-p', k, v)]
    rc, err, out = ssfer(tmp_path, 'run', 'finetune', '-p', 'preset', 'test', *p, '--root', 'runs', '--name', 'bad')
    assert_one_line(rc, err, out, ['ssfer: error: finetune.ipynb failed in cell ', *expected,
                                   f'(executed notebook with the traceback: runs/bad/finetune.ipynb)'])
    complete_caches = ('outputs/splits/*', 'outputs/cache/*.npz', 'outputs/boxes/*.csv')  # written whole before the failure
    assert_untouched(before, tmp_path, ('runs/bad/run.json', 'runs/bad/finetune.ipynb', *complete_caches))
    assert not (tmp_path/'pwned').exists()
