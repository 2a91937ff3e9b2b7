"""The wheel works by itself: built from this checkout, installed into a fresh venv elsewhere.

The venv has only the wheel (``pip install --no-deps --no-index``); its dependencies come from
the running interpreter's site-packages through one ``.pth`` line, which adds that folder to
``sys.path`` without running its ``.pth`` files, so the checkout's editable install stays off.
The commands run from a temporary folder without ``PYTHONPATH``: every module and every data
file (shipped editor, probe set, default config, key-statistics corpus) must come from the
installed wheel. No network: the build uses the installed setuptools (no build isolation).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tests.daemon.harness import FT_OPTIONS, fact, save_editable_tiny_model

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def _source_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a clean clone would build from."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        # `make test` and CI always run in a git checkout; a skip here would hide the wheel check.
        pytest.fail("building the wheel from a copy of the sources needs git and a checkout")
    listed = subprocess.run(
        [git, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


class Installed:
    """A venv outside the checkout with the wheel installed, and an environment to run it in."""

    def __init__(self, venv: Path, work: Path, env: dict[str, str]) -> None:
        self.venv = venv
        self.work = work
        self.env = env
        self.python = str(venv / "bin" / "python")
        self.factkeeper = str(venv / "bin" / "factkeeper")
        self.site = Path(
            subprocess.run(
                [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run(list(args), self.work, self.env, timeout)

    def script(self, code: str, *args: str) -> dict:
        """Run ``code`` with the venv's python; it prints one JSON object last."""
        path = self.work / "script.py"
        path.write_text(textwrap.dedent(code))
        out = self.run(self.python, str(path), *args).stdout
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = (base / name for name in ("src", "dist", "venv", "work"))
    for name in _source_files():
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    work.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env["FACTKEEPER_HOME"] = str(base / "home")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
          str(src)], base, env, timeout=300)  # fmt: skip
    (wheel,) = dist.glob("factkeeper-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, env)
    _run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
          str(wheel)], base, env)  # fmt: skip
    installed = Installed(venv, work, env)
    deps = sysconfig.get_paths()["purelib"]
    (installed.site / "_factkeeper_test_deps.pth").write_text(deps + "\n")
    return installed


def test_version_runs_from_the_wheel(installed: Installed) -> None:
    out = installed.run(installed.factkeeper, "version").stdout
    assert out.splitlines()[0] == f"factkeeper {VERSION}"
    assert "torch " in out and "(not installed)" not in out


def test_runtime_data_comes_from_the_installed_package(installed: Installed) -> None:
    """Modules, shipped editor, probes, default config and corpus all live in site-packages."""
    found = installed.script(
        """
        import json
        import daemon, editing, monitoring, editors
        from daemon.config import default_config_text, load_settings
        from editing.emsedit.checkpoint import default_checkpoint, load_editor
        from editing.keystats import DEFAULT_CORPUS, file_sha256
        from monitoring.probes.load import bundled_probe_path, load_probe_set

        checkpoint = default_checkpoint("smollm2")
        editor = load_editor(checkpoint)
        print(json.dumps({
            "modules": [m.__file__ for m in (daemon, editing, monitoring, editors)],
            "checkpoint": str(checkpoint),
            "editor_modules": [m["name"] for m in editor.meta["modules"]],
            "probes": str(bundled_probe_path()),
            "n_probes": len(load_probe_set(None)),
            "corpus": str(DEFAULT_CORPUS),
            "corpus_sha256": file_sha256(DEFAULT_CORPUS),
            "default_config": default_config_text(),
            "default_method": load_settings(None, env={}).editor.method,
        }))
        """
    )
    site = str(installed.site)
    paths = [*found["modules"], found["checkpoint"], found["probes"], found["corpus"]]
    for path in paths:
        assert path.startswith(site + os.sep), f"{path} is not from the installed wheel"
        assert not path.startswith(str(ROOT) + os.sep)
    assert found["editor_modules"], "the shipped editor names no modules"
    assert found["n_probes"] == 300
    assert found["corpus_sha256"].startswith("4cd0f6876d07a413")
    assert found["default_config"] == (ROOT / "configs" / "default.yaml").read_text()
    assert found["default_method"] == "memory"
    config_default = installed.run(installed.factkeeper, "config", "default").stdout
    assert config_default == found["default_config"]


def test_ask_answers_like_the_checkout(installed: Installed, tmp_path: Path) -> None:
    from editing.generation import greedy_generate
    from editing.models import load_model

    model_dir = save_editable_tiny_model(tmp_path / "tiny")
    prompt = "The capital of Zorblax0 is"
    out = installed.run(
        installed.factkeeper, "ask", prompt, "--model", str(model_dir), "--max-new-tokens", "4"
    ).stdout
    lm = load_model(str(model_dir))
    [expected] = greedy_generate(lm.model, lm.tokenizer, [prompt], 4)
    assert out == expected + "\n"


def test_one_edit_through_the_daemons_applier(installed: Installed, tmp_path: Path) -> None:
    """The installed daemon's applier makes one edit take with FT-L tuned for the tiny model
    (the default method, the fact memory, needs a model that knows facts: tests/editing)."""
    model_dir = save_editable_tiny_model(tmp_path / "tiny")
    config = tmp_path / "factkeeper.yaml"
    config.write_text(json.dumps({"editor": {"method": "ft", "options": FT_OPTIONS}}))
    event = fact(0)
    done = installed.script(
        """
        import json, sys
        import torch
        from daemon.ingest.applier import EditApplier
        from daemon.config import load_settings
        from daemon.ingest.events import parse_event
        from daemon.service import build_editor
        from editing.generation import greedy_generate
        from editing.models import load_model

        model_dir, config, raw = sys.argv[1:4]
        settings = load_settings(__import__("pathlib").Path(config))
        lm = load_model(model_dir)
        before = {k: v.clone() for k, v in lm.model.state_dict().items()}
        event = parse_event(raw.encode())
        outcome = EditApplier(lm, build_editor(settings)).apply([event])
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
        [answer] = greedy_generate(lm.model, lm.tokenizer, [event.prompt], 3)
        print(json.dumps({
            "method": settings.editor.method,
            "applied": outcome.applied_ids,
            "failed": outcome.failed,
            "changed": changed,
            "answer": answer,
        }))
        """,
        str(model_dir),
        str(config),
        json.dumps(event),
    )
    assert done["method"] == "ft"
    assert done["applied"] == [event["id"]], done["failed"]
    assert done["changed"], "the edit changed no weight"
    assert done["answer"].strip().startswith(event["target_new"])
