"""GPU readiness without a GPU: the pinned GPU stack resolves for Python 3.12 on manylinux x86_64
(pip's resolver), one megatron-core version everywhere, and bench/gpu_check.py runs (CPU, toy sizes).

MEGATRON_VR1_OFFLINE=1 skips the resolver test; it also skips (with the reason) when the package
index cannot be reached at all, and fails on any resolution error (a pin that cannot install)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQ = REPO / "requirements-gpu.txt"
RESOLVE_TIMEOUT = 600
# glibc 2.35 (Ubuntu 22.04, NGC images) down to manylinux2014: what a GPU node accepts
PLATFORMS = [f"manylinux_2_{i}_x86_64" for i in range(35, 16, -1)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                       "manylinux1_x86_64"]
# pip 23.2 downloads every wheel it resolved (GBs: torch, vLLM, the CUDA libraries) even with
# --dry-run; with fast-deps it reads the metadata by HTTP range requests, and this makes the
# final "download the rest" step a no-op. Any other pip runs unpatched: slower, same answer.
_PIP = """
import sys
try:
    from pip._internal.operations.prepare import RequirementPreparer
    from pip._internal.req.req_install import InstallRequirement
    from pip._internal.utils.direct_url_helpers import direct_url_from_link

    _prepare, _get_dist = RequirementPreparer.prepare_linked_requirement, InstallRequirement.get_dist

    def prepare(self, req, parallel_builds=False):  # remember the metadata-only distribution
        dist = _prepare(self, req, parallel_builds)
        req._vr1_dist = dist
        return dist

    def metadata_only(self, reqs, parallel_builds=False):  # instead of downloading the wheels
        for req in reqs:
            if req.download_info is None and req.link is not None:
                req.download_info = direct_url_from_link(req.link, req.source_dir)

    def get_dist(self):
        try:
            return _get_dist(self)
        except AssertionError:
            if getattr(self, "_vr1_dist", None) is None:
                raise
            return self._vr1_dist

    RequirementPreparer.prepare_linked_requirement = prepare
    RequirementPreparer.prepare_linked_requirements_more = metadata_only
    InstallRequirement.get_dist = get_dist
except Exception:
    pass
from pip._internal.cli.main import main
sys.exit(main())
"""
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError",
                  "Max retries exceeded", "Connection refused", "No route to host", "ReadTimeoutError")
RESOLUTION_ERRORS = ("ResolutionImpossible", "No matching distribution", "Could not find a version",
                     "conflicting dependencies", "requires a different Python")


def pins(path: Path = REQ) -> dict[str, str]:
    """name -> version of every `name==version` line (extras dropped, names normalised)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return out


def _index_reachable() -> str | None:
    """None when pypi.org answers, else why not."""
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=30).close()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def test_gpu_pins_resolve_for_python312_manylinux():
    if os.environ.get("MEGATRON_VR1_OFFLINE") == "1":
        pytest.skip("MEGATRON_VR1_OFFLINE=1")
    tmp = Path(tempfile.mkdtemp(prefix="vr1-gpu-resolve-"))
    try:
        # --ignore-requires-python: pip 23.2 checks Requires-Python against the interpreter that
        # runs it (3.11 here), not --python-version; the cp312 wheel tags still select 3.12 builds.
        cmd = [sys.executable, "-c", _PIP, "install", "--dry-run", "--ignore-installed", "--ignore-requires-python",
               "--only-binary=:all:", "--python-version", "3.12", *[a for p in PLATFORMS for a in ("--platform", p)],
               "--target", str(tmp / "target"), "--cache-dir", str(tmp / "cache"), "--use-feature=fast-deps",
               "--disable-pip-version-check", "-r", str(REQ)]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=RESOLVE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pip's resolver took over {RESOLVE_TIMEOUT} s", pytrace=False)
        out = r.stdout[-6000:] + r.stderr[-6000:]
        if r.returncode != 0:
            if any(e in out for e in RESOLUTION_ERRORS):
                pytest.fail(f"requirements-gpu.txt does not resolve for Python 3.12 / manylinux x86_64:\n{out}",
                            pytrace=False)
            why = _index_reachable()
            if why is not None or any(e in out for e in NETWORK_ERRORS):
                pytest.skip(f"the package index cannot be reached ({why or 'network error'}); not a pin problem")
            pytest.fail(f"pip failed ({r.returncode}):\n{out}", pytrace=False)
        # pip's "Would install name-version ..." line (its --report needs the downloaded wheels)
        line = next(x for x in r.stdout.splitlines() if x.startswith("Would install "))
        resolved = {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in (w.rsplit("-", 1) for w in line.split()[2:])}
        print(f"resolved {len(resolved)} packages in {time.time() - t0:.0f} s")
        for name, version in pins().items():
            assert name in resolved, f"{name} pinned but not resolved"
            assert resolved[name] == version, (name, version, resolved[name])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_one_megatron_core_version_everywhere():
    import importlib.metadata as md

    pin = pins()["megatron-core"]
    assert re.search(r"^megatron-core==\d+\.\d+\.\d+$", REQ.read_text(), re.M), "scripts/setup.sh greps this line"
    installed = md.version("megatron-core").split("+")[0]
    assert installed == pin, f"installed megatron-core {installed} != requirements-gpu.txt {pin} (run scripts/setup.sh)"
    import megatron.core

    assert getattr(megatron.core, "__version__", pin).split("+")[0] == pin
    for doc in (REPO / "README.md", REPO / "docs" / "gpu.md"):
        text = doc.read_text()
        assert f"megatron-core {pin}" in text or f"megatron-core=={pin}" in text, f"{doc.name} does not name megatron-core {pin}"
        named = set(re.findall(r"megatron-core[ =]=?\s*(\d+\.\d+\.\d+)", text))
        assert named <= {pin}, f"{doc.name} names other megatron-core versions: {named - {pin}}"
    # the transformer-engine core and its source-built PyTorch extension stay on one version
    te_torch = re.search(r"transformer-engine-torch==(\S+)", REQ.read_text())
    assert te_torch and te_torch.group(1) == pins()["transformer-engine"]


def test_gpu_check_cpu_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert report["mode"] == "cpu-smoke" and report["ok"]
    assert list(report["sections"]) == ["parity", "grpo", "mfu", "resync", "te_fp8", "vllm"]
    for name, s in report["sections"].items():
        assert s["status"] == "ok" or (s["status"] == "skipped" and s["reason"].startswith("skipped: ")), (name, s)
    for name in ("parity", "grpo", "mfu", "resync"):
        assert report["sections"][name]["status"] == "ok", name
    assert report["sections"]["mfu"]["result"]["mfu"] == "n/a" and report["sections"]["resync"]["result"]["embedding_equal"]
    assert "| mfu | ok |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_records_a_failing_section(tmp_path, monkeypatch):
    """A section that raises is recorded with its traceback, the others still run, exit status 1."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", torch.cuda.is_available)  # --cpu-smoke replaces it: restore
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))

    monkeypatch.setattr(gpu_check, "section_parity", lambda ctx: 1 / 0)
    monkeypatch.setattr(gpu_check, "init_single_rank", lambda cuda: None)
    monkeypatch.setattr(gpu_check, "tiny_checkpoints", lambda work: (None, None))
    rc = gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--only", "parity", "te_fp8"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and not report["ok"]
    assert report["sections"]["parity"]["status"] == "failed" and "ZeroDivisionError" in report["sections"]["parity"]["error"]
    assert report["sections"]["grpo"]["reason"] == "skipped: not selected (--only)"
    assert report["sections"]["te_fp8"]["status"] == "skipped"
