"""Notebook 07 in a real browser: JupyterLab, Run All, the explorer's widgets, another study.

papermill runs a notebook without a front end, so it never renders a widget nor sends a
selection back to the kernel. Here a headless Chromium (Debian's ``/usr/bin/chromium``, driven by
playwright; playwright's own browsers are not used) opens notebook 07 in JupyterLab on the
session's smoke artifacts (``smoke_runs`` in conftest: the notebooks 00-05, run once per session
and shared with ``test_notebooks.py``), runs every cell, and uses the widgets as a student would.
Everything it writes goes to a temporary folder: a copy of the notebook with the smoke
parameters, the server's settings and runtime files, the browser profile, notebook 07's metrics.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cxrlib.constants import CHEXPERT_LABELS, POSITIVE
from cxrlib.utils import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
# What Chromium needs here: root (no sandbox), no GPU, and no network of its own (QUIC, updates,
# sync, first-run pages). The fresh profile folder is playwright's `user_data_dir` (playwright
# refuses --user-data-dir among the arguments).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NOTEBOOK = REPO_ROOT / "notebooks" / "07-explorer.ipynb"
RUN_ALL_TIMEOUT_S = 300  # Run All of notebook 07 under smoke (8 s in `make smoke`) on a busy CPU
STEP_TIMEOUT_MS = 60_000  # one widget round trip (the kernel draws a figure)
PLAYWRIGHT_MISSING = "playwright is not installed (pip install -e .[dev])"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium), as .ci/run does",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _artifacts_view(src: Path, dst: Path) -> Path:
    """``dst`` with links to the smoke artifacts: notebook 07 reads them and writes its metrics
    into ``dst/metrics``, so the shared folder (and notebook 07's own smoke test) is untouched."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name not in ("metrics", "notebooks", "figures"):
            (dst / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return dst


def _prepare_notebook(target: Path, out: Path, figures: Path) -> None:
    """A copy of notebook 07 with the smoke parameters injected (papermill's own route, no run)."""
    import papermill as pm

    pm.execute_notebook(
        str(NOTEBOOK),
        str(target),
        parameters={
            "PRESET": "smoke",
            "DEVICE": "cpu",
            "OUTPUT_DIR": str(out),
            "FIGURE_DIR": str(figures),
        },
        prepare_only=True,
        progress_bar=False,
    )


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a free localhost port with a token, rooted in ``tmp_path/lab``."""
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install -e .[dev])")
    lab, port, token = tmp_path / "lab", _free_port(), secrets.token_hex(16)
    lab.mkdir()
    env = dict(os.environ)
    env.update(
        {  # nothing read from or written to the user's Jupyter folders
            "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={lab}",
            # no network: no news feed, no update check, no PyPI extension manager
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--ServerApp.terminals_enabled=False",
            *(["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
        ],
        cwd=lab,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: the server and its kernels
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("JupyterLab did not answer within 90 s")
            time.sleep(0.5)
        yield {"url": url, "token": token, "root": lab}
    finally:
        _stop(server, url, token)
        log.close()


def _stop(server: subprocess.Popen, url: str, token: str) -> None:
    """Shut the server down with its kernels (the REST call), else end its process group."""
    try:
        request = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        server.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)  # the kernels run in the server's group
            server.wait()


@pytest.fixture
def page(tmp_path):
    """A page in a headless system Chromium with a fresh profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            yield page
        finally:
            context.close()


def _expected_views(out: Path) -> tuple[dict, dict]:
    """Per test study, its reference report (as notebook 07 picks the record) and its labels."""
    from cxrlib import evaluate
    from cxrlib.data.datasets import load_datasets

    records = evaluate.load_records(out / "inference" / "reports_cot_single.jsonl")
    reference = {}
    for rec in sorted(records, key=lambda r: r["views"][0] not in ("PA", "AP")):
        reference.setdefault(rec["study_id"], rec["reference"])
    studies = load_datasets(out / "data").studies
    return reference, {s["study_id"]: s["labels"] for s in studies if s["study_id"] in reference}


def _words(text: str) -> str:
    """``text`` without whitespace (the notebook wraps long lines, also after hyphens)."""
    return "".join(text.split())


def _run_all(page) -> None:
    """Run > Run All Cells, then wait for the last cell's output; fail on the first error."""
    page.locator(".jp-Notebook").wait_for()
    # the project's kernel, started and idle (a Run All sent while it connects can be lost)
    idle = re.compile(r"Python \(m4cxr\) \| Idle")
    page.locator("#jp-main-statusbar").get_by_text(idle).wait_for(timeout=120_000)
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
    for attempt in range(2):
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:  # a cell queued ([*]) or run ([1]) shows that Run All reached the kernel
            expect(prompts.first).to_have_text(re.compile(r"\[(\*|\d+)\]"), timeout=30_000)
            break
        except AssertionError:
            if attempt:
                raise
    summary = page.locator(".jp-OutputArea-output", has_text="What this run shows")
    errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
    deadline = time.monotonic() + RUN_ALL_TIMEOUT_S
    while summary.count() == 0:
        failed = errors.all_text_contents()  # Run All stops at a failed cell
        assert not failed, f"a cell of notebook 07 failed in JupyterLab:\n{failed[0][-3000:]}"
        assert time.monotonic() < deadline, f"Run All did not finish in {RUN_ALL_TIMEOUT_S} s"
        page.wait_for_timeout(1000)


def expect(locator):
    """playwright's waiting assertions (imported late: the module must load without playwright)."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=STEP_TIMEOUT_MS)
    return playwright_expect(locator)


def _options(select) -> list[str]:
    """The option labels of a <select> (closed, its options have no rendered text)."""
    return select.evaluate("s => [...s.options].map(o => o.textContent.trim())")


def _shown(view) -> tuple[str, str]:
    """The study view's text and its figure (the PNG's data URL). DOM text, not rendered text:
    JupyterLab skips rendering cells scrolled out of view."""
    image = view.locator("img").first
    return view.text_content(), image.get_attribute("src")


def test_explorer_widgets_follow_the_selection(smoke_runs, jupyterlab, page, tmp_path):
    smoke_runs.upto("05-cot-inference")
    assert smoke_runs.status["05-cot-inference"] == "ok", smoke_runs.status["05-cot-inference"]
    out = _artifacts_view(smoke_runs.root, tmp_path / "out")
    target = jupyterlab["root"] / NOTEBOOK.name
    _prepare_notebook(target, out, tmp_path / "figures")
    reference, labels = _expected_views(out)
    assert len(reference) >= 2, "the smoke test split needs two studies to switch between"

    page.goto(f"{jupyterlab['url']}/lab/tree/{NOTEBOOK.name}?token={jupyterlab['token']}")
    _run_all(page)

    # section 2's box: the finding and study selectors, a status line and the study view
    browse = page.locator(".widget-vbox").filter(has=page.locator(".widget-dropdown select"))
    browse = browse.filter(has_text="finding").last
    finding, study = browse.locator(".widget-dropdown select").all()
    status = browse.locator("div.widget-label")  # the Label widget (descriptions are <label>s)
    view = browse.locator(".widget-output")
    shown = view.locator(".jp-OutputArea-output")
    expect(shown).to_have_count(2)  # the study's figure and its text
    ids = _options(study)
    assert ids == list(reference), (
        f"the study selector lists {ids}, notebook 05 wrote {list(reference)}"
    )
    expect(status).to_have_text(f"all {len(ids)} test studies")

    # the first study is shown; pick another and the view must follow
    text_before, image_before = _shown(view)
    assert study.input_value() == ids[0]
    assert _words(reference[ids[0]]) in _words(text_before)
    study.select_option(ids[1])
    page.wait_for_function(
        "([el, src]) => { const img = el.querySelector('img'); return img && img.src !== src; }",
        arg=[view.element_handle(), image_before],
        timeout=STEP_TIMEOUT_MS,
    )
    expect(shown).to_have_count(2)
    text_after, image_after = _shown(view)
    assert image_after != image_before
    assert _words(reference[ids[1]]) in _words(text_after), "the view shows another study's report"
    if _words(reference[ids[0]]) != _words(reference[ids[1]]):
        assert text_after != text_before

    # a finding that no test study has: say so, list no study, show nothing (issue 15 item 10)
    absent = [
        f for f in CHEXPERT_LABELS[1:] if all(ls.get(f) != POSITIVE for ls in labels.values())
    ]
    if absent:
        finding.select_option(absent[0])
        expect(status).to_have_text(f"no test study has {absent[0]}")
        assert _options(study) == [], f"{absent[0]} should list no study"
        expect(shown).to_have_count(0)
    # a finding some test study has lists exactly those studies, and shows the first
    present = [f for f in CHEXPERT_LABELS[1:] if f not in absent]
    if present:
        wanted = [sid for sid in reference if labels[sid].get(present[0]) == POSITIVE]
        finding.select_option(present[0])
        expect(status).to_have_text(f"{len(wanted)} test studies with {present[0]}")
        assert _options(study) == wanted, f"{present[0]} should list {wanted}"
        expect(shown).to_have_count(2)
        assert _words(reference[wanted[0]]) in _words(view.text_content())
    assert absent and present, "the smoke test split no longer has both kinds of finding"
