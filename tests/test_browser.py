"""A real browser: JupyterLab (headless, localhost, random port and token) opens the FaceMix playground in headless
Chromium (Debian's `chromium`, driven by playwright), runs all cells, waits for the kernel, checks that no cell shows an
error and saves outputs/screenshots/facemix_playground.png (the mixed image and its κ; $SSFER_SCREENSHOTS names another
folder, e.g. a temporary one when the committed screenshot should stay as it is)."""
import os, secrets, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest
from conftest import REPO, BIN

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
NOTEBOOK = '01_facemix_playground.ipynb'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    "JupyterLab serving a copy of the notebook (its autosave never touches the repository)."
    if CHROMIUM is None: pytest.skip('chromium not installed (apt-get install -y chromium; .ci/run does it when apt-get exists)')
    pytest.importorskip('playwright.sync_api', reason='the playwright package is not installed')
    shutil.copy(REPO/'nbs'/'explore'/NOTEBOOK, tmp_path/NOTEBOOK)
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}  # the kernel's inline backend shows the figures
    env |= dict(PYTHONPATH=str(REPO), OMP_NUM_THREADS='1', JUPYTER_CONFIG_DIR=str(tmp_path/'.jupyter'),
                JUPYTER_RUNTIME_DIR=str(tmp_path/'.runtime'))
    tracker = tmp_path/'settings'/'@jupyterlab'/'notebook-extension'/'tracker.jupyterlab-settings'
    tracker.parent.mkdir(parents=True)
    tracker.write_text('{"windowingMode": "none"}')  # every cell in the page (JupyterLab 4 renders only the visible ones)
    proc = subprocess.Popen([str(BIN/'jupyter'), 'lab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
                             '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={tmp_path}',
                             '--LabApp.expose_app_in_browser=True', '--ServerApp.allow_root=True',
                             f'--LabApp.user_settings_dir={tmp_path/"settings"}', f'--LabApp.workspaces_dir={tmp_path/"ws"}'],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path/'lab.log', 'w'))
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(120):
            try: urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=2); break
            except OSError: time.sleep(0.5)
        else: pytest.fail('JupyterLab did not start: ' + (tmp_path/'lab.log').read_text()[-2000:])
        yield url, token, tmp_path/'lab.log'
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()

STATE = """() => { const w = window.jupyterapp.shell.currentWidget, cells = [...w.content.model.cells].filter(c => c.type === 'code');
                   return {kernel: w.sessionContext.session?.kernel?.status ?? 'none', run: cells.filter(c => c.executionCount > 0).length,
                           cells: cells.length, dialog: document.querySelector('.jp-Dialog')?.innerText ?? ''}; }"""


def _wait_for_kernel(page, lab_log, timeout: float, all_cells_run: bool):
    "Poll until the notebook's kernel is idle (and every code cell has an execution count); a kernel dialog is accepted."
    deadline, s = time.time() + timeout, {}
    while time.time() < deadline:
        s = page.evaluate(STATE)
        if s['dialog']: page.keyboard.press('Enter')  # JupyterLab asks which kernel: its default (the notebook's)
        elif s['kernel'] == 'idle' and (s['run'] == s['cells'] or not all_cells_run): return
        page.wait_for_timeout(1000)
    pytest.fail(f'after {timeout:.0f} s {s["run"]} of {s["cells"]} code cells had run, kernel {s["kernel"]}, '
                f'dialog {s["dialog"]!r}; JupyterLab log: ' + lab_log.read_text()[-2000:])


def test_facemix_playground_in_jupyterlab(lab):
    shot = Path(os.environ.get('SSFER_SCREENSHOTS') or REPO/'outputs'/'screenshots')/'facemix_playground.png'
    from playwright.sync_api import sync_playwright
    url, token, lab_log = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox', '--disable-gpu'])
        page = browser.new_page(viewport={'width': 1280, 'height': 1000})
        page.goto(f'{url}/lab/tree/{NOTEBOOK}?token={token}')
        page.wait_for_selector('.jp-NotebookPanel .jp-Cell', timeout=120_000)
        page.wait_for_function('() => window.jupyterapp && window.jupyterapp.commands.hasCommand("notebook:run-all-cells")', timeout=60_000)
        _wait_for_kernel(page, lab_log, timeout=240, all_cells_run=False)  # this notebook's kernel is up (slow on a busy machine)
        page.evaluate('() => { window.jupyterapp.commands.execute("notebook:run-all-cells"); }')  # not awaited: the cells are polled
        _wait_for_kernel(page, lab_log, timeout=300, all_cells_run=True)
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
        errors = [t for t in page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
                  if 'Traceback' in t or 'Error' in t]
        assert not errors, errors[0][:3000]
        static = page.locator('.jp-CodeCell').filter(has_text="fig = show_pair(i, j, lam, 'iou')")
        assert static.locator('.jp-OutputArea img').count() == 1  # the static figure below it
        assert 'L4' in static.locator('.jp-OutputArea').inner_text()  # and the table of losses
        static.scroll_into_view_if_needed()  # the mixed image with its κ
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        browser.close()
    assert shot.stat().st_size > 20_000
