"""`ssfer run` rejects a bad option in the CLI process, before papermill starts a kernel: one line, exit 2, nothing written."""
import subprocess
import pytest
from conftest import BIN


def ssfer_run(tmp_path, notebook, *args, root=None):
    "Run `ssfer run` from `tmp_path` into `root` (default tmp_path/runs); returns the result and the files it left."
    root = root or tmp_path/'runs'
    before = set(tmp_path.rglob('*'))
    r = subprocess.run([str(BIN/'ssfer'), 'run', notebook, *args, '--root', str(root)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    return r, set(tmp_path.rglob('*')) - before


def assert_one_line_error(r, created, *culprit):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('ssfer: error:'), r.stderr[-2000:]
    for c in culprit: assert c in lines[0], (c, lines[0])
    assert r.stdout == ''
    assert not created, f'left behind: {sorted(map(str, created))}'


@pytest.mark.parametrize('args, culprit', [
    (('-p', 'preset', 'nope'), ("unknown preset 'nope'", 'choose one of: paper, demo, demo-full, test')),
    (('-p', 'mix', 'facemx'), ("unknown mix 'facemx'", "did you mean 'facemix'?", 'mixup', 'cutmix')),
    (('-p', 'kappa', 'ssmi'), ("unknown kappa 'ssmi'", "did you mean 'ssim'?", 'iou, psnr, ssim, fsim')),
    (('-p', 'epochs', 'many'), ('epochs', "'many'", 'as int')),
], ids=['preset', 'mix', 'kappa', 'epochs'])
def test_finetune_bad_option(tmp_path, args, culprit):
    r, created = ssfer_run(tmp_path, 'finetune', *args)
    assert_one_line_error(r, created, 'finetune.ipynb', *culprit)


def test_finetune_missing_init(tmp_path):
    missing = tmp_path/'no'/'such.pt'
    r, created = ssfer_run(tmp_path, 'finetune', '-p', 'init', str(missing))
    assert_one_line_error(r, created, 'init', str(missing), 'no such checkpoint file')


def test_root_under_a_regular_file(tmp_path):
    f = tmp_path/'a-file'; f.write_text('not a folder')
    r, created = ssfer_run(tmp_path, 'finetune', root=f/'runs')
    assert_one_line_error(r, created, f'{f} is a file, not a folder')
    assert f.read_text() == 'not a folder'


@pytest.mark.parametrize('args, culprit', [
    (('-p', 'algorithm', 'fixmach'), ('semi.ipynb', "unknown algorithm 'fixmach'", "did you mean 'fixmatch'?", 'ema_teacher')),
    (('-p', 'kappa', 'ssmi'), ("unknown parameter 'kappa' for semi.ipynb", 'algorithm')),  # stage 3 has no κ
], ids=['algorithm', 'kappa'])
def test_semi_bad_option(tmp_path, args, culprit):
    r, created = ssfer_run(tmp_path, 'semi', *args)
    assert_one_line_error(r, created, *culprit)
